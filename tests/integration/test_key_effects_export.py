"""[export] keys: the defaults of ``peftkit merge`` and ``peftkit export`` when their flags are not given."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.integration.key_effects_common import cli_ok, finetune_raw, quick_train, read_json, write_csv

MISSING = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"ONNX export needs {', '.join(MISSING)}")
def test_export_table_sets_the_merge_and_export_defaults(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """dtype and max_shard_size shape the merged weights; formats picks the bundle's formats."""
    write_csv(tmp_path / "train.csv", 24)
    write_csv(tmp_path / "validation.csv", 8, offset=1)
    raw = {
        "model": {"name_or_path": str(tiny_bert_dir)},
        "task": {"type": "seq_cls", "max_length": 32},
        "data": {"train_file": "train.csv", "validation_file": "validation.csv"},
        "adapter": {"r": 4},
        "train": quick_train(),
        # the tiny BERT's weights are ~4 MB in float32, ~2 MB in bfloat16
        "export": {"dtype": "bfloat16", "max_shard_size": "500KB", "formats": ["safetensors", "onnx"]},
    }
    run = finetune_raw(raw, tmp_path)

    # --samples only sizes the parity checks (few here, for speed); no flag that [export] sets is given
    cli_ok("merge", str(run), "--out", str(tmp_path / "merged"), "--samples", "4")
    report = read_json(tmp_path / "merged" / "merge_report.json")
    assert report["dtype"] == "bfloat16" and report["max_shard_size"] == "500KB"
    assert read_json(tmp_path / "merged" / "config.json")["dtype"] == "bfloat16"
    index = read_json(tmp_path / "merged" / "model.safetensors.index.json")
    assert len(set(index["weight_map"].values())) > 1  # the default 2GB would write one file

    cli_ok("export", str(run), "--out", str(tmp_path / "bundle"), "--samples", "4")
    manifest = read_json(tmp_path / "bundle" / "peftkit_export.json")
    assert manifest["formats"] == ["safetensors", "onnx"]
    assert (tmp_path / "bundle" / "model.onnx").is_file()
