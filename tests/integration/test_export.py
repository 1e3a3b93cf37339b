"""``peftkit export``: safetensors and ONNX bundles from a run directory or a merged folder.

The ONNX tests need the ``export`` extra (onnx, onnxscript, onnxruntime) and are skipped without it. The key
check: ONNX Runtime, run here independently of peftkit's own parity check, gives the same labels on the test
split as the merged PyTorch model and as the adapter model did during training.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import invoke_cli
from tests.integration.test_merge_tasks import _token_cls_run, train_seq_cls

MISSING = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
needs_onnx = pytest.mark.skipif(
    bool(MISSING), reason=f"ONNX export needs {', '.join(MISSING)}: pip install 'peftkit[export]'"
)


@pytest.fixture(scope="module")
def run(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_seq_cls(tmp_path_factory.mktemp("export"), tiny_bert_dir)


@needs_onnx
def test_onnx_bundle_gives_the_same_labels_as_pytorch_on_the_test_split(run: Path, tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "bundle"
    result = invoke_cli("export", str(run), "--format", "safetensors", "--format", "onnx", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "onnx: max |Δlogit|" in result.output and 'pipeline("text-classification"' in result.output
    for name in ("model.onnx", "model.safetensors", "config.json", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "peftkit_export.json").read_text())
    assert manifest["formats"] == ["safetensors", "onnx"] and manifest["onnx"]["passed"]
    assert manifest["onnx"]["sample"]["split"] == "test"
    for name, info in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == info["sha256"], name
    assert "## ONNX" in (out / "README.md").read_text()

    lines = (run.parent / "test.csv").read_text().splitlines()[1:]
    texts = [line.rsplit(",", 1)[0] for line in lines]
    tokenizer = AutoTokenizer.from_pretrained(out)
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="np")
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: encoded[i.name] for i in session.get_inputs()}
    (onnx_logits,) = session.run(["logits"], feed)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        torch_logits = model(**{k: torch.from_numpy(v) for k, v in encoded.items()}).logits.numpy()
    labels = model.config.id2label
    onnx_labels = [labels[int(i)] for i in onnx_logits.argmax(-1)]
    assert onnx_labels == [labels[int(i)] for i in torch_logits.argmax(-1)]
    assert np.abs(onnx_logits - torch_logits).max() < 1e-4
    saved = [
        json.loads(line)["prediction"] for line in (run / "predictions_test.jsonl").read_text().splitlines()
    ]
    assert onnx_labels == saved, "the same labels the adapter model gave during training"
    assert len(set(saved)) == 2, "the test split exercises both labels"


@needs_onnx
def test_onnx_only_bundle_from_a_merged_folder(run: Path, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    assert invoke_cli("merge", str(run), "--out", str(merged)).exit_code == 0
    out = tmp_path / "onnx"
    result = invoke_cli("export", str(merged), "--format", "onnx", "--out", str(out))
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert "model.onnx" in names and not [n for n in names if n.endswith(".safetensors")]
    assert {"config.json", "tokenizer.json", "README.md", "peftkit_export.json"} <= names
    assert "holds no PyTorch weights" in (out / "README.md").read_text()
    again = invoke_cli("export", str(merged), "--format", "onnx", "--out", str(out))
    assert again.exit_code == 2 and "already exists" in again.output


def test_safetensors_bundle_is_pipeline_ready_and_can_be_recast(run: Path, tmp_path: Path) -> None:
    from transformers import pipeline

    merged = tmp_path / "merged"
    assert invoke_cli("merge", str(run), "--out", str(merged)).exit_code == 0
    out = tmp_path / "bf16"
    result = invoke_cli(
        "export", str(merged), "--format", "safetensors", "--dtype", "bfloat16", "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    report = json.loads((out / "merge_report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["recast_from"] == "float32"
    classify = pipeline("text-classification", model=str(out))
    assert classify("win free prize cash 9")[0]["label"] in {"ham", "spam"}
    half = tmp_path / "half-again"
    refused = invoke_cli("export", str(out), "--dtype", "float16", "--out", str(half))
    assert refused.exit_code == 2 and "round twice" in refused.output and not half.exists()


def test_export_refuses_what_is_not_a_run_or_a_merged_model(tmp_path: Path) -> None:
    (tmp_path / "random").mkdir()
    result = invoke_cli("export", str(tmp_path / "random"), "--out", str(tmp_path / "b"))
    assert result.exit_code == 2 and "neither a run directory" in result.output


@needs_onnx
def test_token_classification_onnx_parity(tiny_bert_dir: Path, tmp_path: Path) -> None:
    run = _token_cls_run(tmp_path / "ner", tiny_bert_dir)
    out = tmp_path / "bundle"
    result = invoke_cli("export", str(run), "--format", "onnx", "--out", str(out))
    assert result.exit_code == 0, result.output
    onnx = json.loads((out / "peftkit_export.json").read_text())["onnx"]
    assert onnx["passed"] and onnx["agreement"] == 1.0 and onnx["max_abs_diff"] < 1e-3
    assert onnx["sample"]["split"] == "test" and onnx["predictions_compared"] > 100  # one per real token
