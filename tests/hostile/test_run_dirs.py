"""Hostile run directories (issue 19): a run someone sends you, or one changed after peftkit wrote it.

Each case copies one small trained run (a tiny random BERT, a few steps), damages the copy, and runs the
public command on it: ``predict``, ``evaluate``, ``merge`` and ``export`` must exit 2 naming what changed
(the SHA-256 and base-model fingerprint recorded in peftkit_run.json at training), and must not honour a
``trust_remote_code`` the run records unless ``--trust-remote-code`` is on the command line.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, invoke_cli, save_tiny_bert
from tests.hostile.common import assert_clear_error

RECIPE = """
[model]
name_or_path = "{model}"

[task]
type = "seq_cls"
max_length = 32

[data]
dataset = "{data}"
max_train_samples = 32
max_eval_samples = 16
max_test_samples = 16

[adapter]
method = "lora"
r = 4
target_modules = ["query", "value"]

[train]
max_steps = 2
per_device_train_batch_size = 8
per_device_eval_batch_size = 16
logging_steps = 1
eval_strategy = "no"
save_strategy = "no"
report_to = []
output_dir = "{out}"
"""

COMMANDS = ("predict", "evaluate", "merge", "export")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A completed run whose base model lives in its own folder (so a case can swap it)."""
    from peftkit.recipe import load_recipe
    from peftkit.training import finetune

    work = tmp_path_factory.mktemp("hostile-runs")
    base = save_tiny_bert(work / "base")
    recipe = work / "sms.toml"
    recipe.write_text(RECIPE.format(model=base, data=REPO / "data" / "sms_spam", out=work / "run"))
    finetune(load_recipe(recipe))
    texts = work / "texts.jsonl"
    texts.write_text('{"text": "win a free prize now"}\n{"text": "see you at lunch"}\n')
    return {"work": work, "base": base, "run": work / "run", "texts": texts}


def copy_run(trained: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the run (checkpoints left out) that a case may damage."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    return run


def command(name: str, run: Path, trained: dict[str, Path], tmp_path: Path, *extra: str) -> Any:
    args = {
        "predict": [
            "predict",
            str(run),
            "--input",
            str(trained["texts"]),
            "--output",
            str(tmp_path / "p.jsonl"),
        ],
        "evaluate": ["evaluate", str(run), "--split", "test"],
        "merge": ["merge", str(run), "--out", str(tmp_path / "merged"), "--samples", "4"],
        "export": ["export", str(run), "--out", str(tmp_path / "bundle"), "--samples", "4"],
    }[name]
    return invoke_cli(*args, *extra)


def flip_tensor_byte(path: Path) -> None:
    """Change one byte inside the first tensor's data; the header (shapes, offsets) stays intact."""
    data = bytearray(path.read_bytes())
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    name = sorted(k for k in header if k != "__metadata__")[0]
    at = 8 + header_size + header[name]["data_offsets"][0] + 1
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.hostile("clear_error")
@pytest.mark.parametrize("name", COMMANDS)
def test_flipped_adapter_byte_is_named(trained: dict[str, Path], tmp_path: Path, name: str) -> None:
    run = copy_run(trained, tmp_path)
    flip_tensor_byte(run / "adapter_model.safetensors")
    result = command(name, run, trained, tmp_path)
    assert_clear_error(result, "adapter_model.safetensors", "integrity check failed")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "bundle").exists()


@pytest.mark.hostile("clear_error")
@pytest.mark.parametrize("name", COMMANDS)
def test_swapped_base_model_is_named(trained: dict[str, Path], tmp_path: Path, name: str) -> None:
    """The base folder the run records now holds a same-shaped BERT with other weights."""
    import torch
    from transformers import BertModel

    run = copy_run(trained, tmp_path)
    other = tmp_path / "other-base"
    shutil.copytree(trained["base"], other)
    model = BertModel.from_pretrained(other)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    model.save_pretrained(other)
    record = json.loads((run / "peftkit_run.json").read_text())
    record["recipe"]["model"]["name_or_path"] = str(other)  # as if the recorded folder had been replaced
    (run / "peftkit_run.json").write_text(json.dumps(record))
    result = command(name, run, trained, tmp_path)
    assert_clear_error(result, "model.name_or_path", str(other), "not the ones this run was trained on")


@pytest.mark.hostile("clear_error")
def test_deleted_tokenizer_file_is_named(trained: dict[str, Path], tmp_path: Path) -> None:
    """Without tokenizer.json transformers would build a 5-token tokenizer and predict from [UNK]s."""
    run = copy_run(trained, tmp_path)
    (run / "tokenizer.json").unlink()
    assert_clear_error(command("predict", run, trained, tmp_path), "tokenizer.json", "missing")


@pytest.mark.hostile("clear_error")
def test_swapped_labels_are_named_by_merge(trained: dict[str, Path], tmp_path: Path) -> None:
    run = copy_run(trained, tmp_path)
    labels = json.loads((run / "labels.json").read_text())
    labels["labels"] = labels["labels"][::-1]
    (run / "labels.json").write_text(json.dumps(labels))
    assert_clear_error(command("merge", run, trained, tmp_path), "labels.json")
    assert not (tmp_path / "merged").exists()


@pytest.mark.hostile("clear_error")
@pytest.mark.parametrize("name", COMMANDS)
def test_recorded_trust_remote_code_is_not_honoured(
    trained: dict[str, Path], tmp_path: Path, name: str
) -> None:
    run = copy_run(trained, tmp_path)
    record = json.loads((run / "peftkit_run.json").read_text())
    record["recipe"]["model"]["trust_remote_code"] = True
    (run / "peftkit_run.json").write_text(json.dumps(record))
    result = command(name, run, trained, tmp_path)
    assert_clear_error(result, "model.trust_remote_code", "--trust-remote-code")


@pytest.mark.hostile("success")
def test_trust_remote_code_flag_is_the_users_choice(trained: dict[str, Path], tmp_path: Path) -> None:
    """With the flag the same run predicts (the tiny BERT ships no code, so nothing runs)."""
    run = copy_run(trained, tmp_path)
    record = json.loads((run / "peftkit_run.json").read_text())
    record["recipe"]["model"]["trust_remote_code"] = True
    (run / "peftkit_run.json").write_text(json.dumps(record))
    result = command("predict", run, trained, tmp_path, "--trust-remote-code")
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2


@pytest.mark.hostile("success")
def test_untouched_run_loads_and_old_runs_warn(
    trained: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The intact copy predicts; a run without an integrity record (an older peftkit) loads with a warning."""
    run = copy_run(trained, tmp_path)
    record = json.loads((run / "peftkit_run.json").read_text())
    assert "adapter_model.safetensors" in record["integrity"]["files"]
    assert "tokenizer.json" in record["integrity"]["files"] and "labels.json" in record["integrity"]["files"]
    assert record["integrity"]["base_model"]["files"]["model.safetensors"]
    assert command("predict", run, trained, tmp_path).exit_code == 0
    del record["integrity"]
    (run / "peftkit_run.json").write_text(json.dumps(record))
    with caplog.at_level("WARNING", logger="peftkit.runs"):
        assert command("predict", run, trained, tmp_path).exit_code == 0
    assert "no integrity record" in caplog.text


@pytest.mark.hostile("clear_error")
def test_changed_file_of_a_merged_folder_is_named_by_export(trained: dict[str, Path], tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    result = invoke_cli("merge", str(trained["run"]), "--out", str(merged), "--samples", "4")
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in json.loads((merged / "merge_report.json").read_text())["integrity"]["files"]
    flip_tensor_byte(merged / "model.safetensors")
    result = invoke_cli("export", str(merged), "--out", str(tmp_path / "bundle"), "--samples", "4")
    assert_clear_error(result, "model.safetensors", "integrity check failed")
