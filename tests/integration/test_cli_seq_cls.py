"""The CLI end to end on a tiny model: finetune → files → predict (fresh process) → evaluate; user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

RECIPE = """
[model]
name_or_path = "{model}"

[task]
type = "seq_cls"
max_length = 32

[data]
train_file = "train.csv"
validation_file = "validation.csv"
test_file = "test.csv"

[adapter]
r = 4
alpha = 8

[train]
num_train_epochs = 2
per_device_train_batch_size = 8
learning_rate = 1e-3
logging_steps = 2
output_dir = "{out}"
"""

WORDS = {"spam": "win free prize cash claim now", "ham": "see you at home for dinner later"}


def write_split(path: Path, n: int, offset: int) -> None:
    lines = ["text,label"]
    for i in range(n):
        label = "spam" if (i + offset) % 3 == 0 else "ham"
        words = WORDS[label].split()
        lines.append(f"{' '.join(words[: 2 + (i % 4)])} {i},{label}")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("cli")
    write_split(work / "train.csv", 48, 0)
    write_split(work / "validation.csv", 12, 1)
    write_split(work / "test.csv", 12, 2)
    recipe = work / "recipe.toml"
    recipe.write_text(RECIPE.format(model=tiny_bert_dir, out=work / "run"))
    result = run_cli("finetune", str(recipe), cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, work / "run"


def test_run_directory_has_every_artifact(trained: tuple[Path, Path]) -> None:
    _, run = trained
    for name in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        "labels.json",
        "peftkit_run.json",
        "metrics.json",
        "predictions_validation.jsonl",
        "predictions_test.jsonl",
        "log_history.json",
        "plots/loss.png",
        "plots/f1_macro.png",
    ]:
        assert (run / name).is_file(), name
    assert list(run.glob("checkpoint-*")), "Trainer checkpoints are kept for resuming"
    assert list((run / "runs").rglob("events.out.tfevents.*")), "TensorBoard logs"
    assert not list(run.glob("*.bin")), "no pickles in the run folder: weights are safetensors"
    assert not list(run.rglob("*model*.bin")), "checkpoint weights are safetensors too"
    labels = json.loads((run / "labels.json").read_text())
    assert labels == {"labels": ["ham", "spam"], "task": "seq_cls"}
    config = json.loads((run / "config.json").read_text())
    assert config["id2label"] == {"0": "ham", "1": "spam"}
    meta = json.loads((run / "peftkit_run.json").read_text())
    assert meta["status"] == "completed" and meta["seed"] == 42
    assert meta["versions"]["torch"] and meta["versions"]["peft"]
    from peftkit.lock import lock_differences

    assert meta["lock_differences"] == lock_differences()  # {} on the locked stack; else each package named
    assert meta["recipe"]["adapter"] == {"method": "lora", "r": 4, "lora_alpha": 8}
    assert set(meta["data"]) == {"train", "validation", "test"}
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert "classifier" in adapter["modules_to_save"]  # the new head is trained and saved in full
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"train", "validation", "test", "trainable_params", "peak_rss_mb"} <= set(metrics)
    assert {"accuracy", "f1_macro", "mcc", "f1_spam"} <= set(metrics["test"])


def test_predict_reproduces_test_predictions_in_a_fresh_process(trained: tuple[Path, Path]) -> None:
    work, run = trained
    out = work / "preds.jsonl"
    result = run_cli("predict", str(run), "--input", str(work / "test.csv"), "--output", str(out), cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = [json.loads(line) for line in out.read_text().splitlines()]
    saved = [json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in predicted] == [s["prediction"] for s in saved]
    assert all(0.5 <= p["score"] <= 1 and set(p["scores"]) == {"ham", "spam"} for p in predicted)


def test_reloaded_adapter_gives_the_same_logits_as_peft_alone(trained: tuple[Path, Path]) -> None:
    """The run folder loads with plain PeftModel.from_pretrained and the labels come with it."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    _, run = trained
    meta = json.loads((run / "peftkit_run.json").read_text())
    config = AutoConfig.from_pretrained(run)
    base = AutoModelForSequenceClassification.from_pretrained(
        meta["recipe"]["model"]["name_or_path"], config=config
    )
    model = PeftModel.from_pretrained(base, run).eval()
    tokenizer = AutoTokenizer.from_pretrained(run)
    with torch.no_grad():
        logits = model(**tokenizer(["win free prize cash 3"], return_tensors="pt")).logits
    assert model.config.id2label == {0: "ham", 1: "spam"}
    assert logits.shape == (1, 2)


def test_evaluate_command_matches_training_metrics(trained: tuple[Path, Path]) -> None:
    work, run = trained
    result = run_cli("evaluate", str(run), "--split", "test", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((run / "metrics.json").read_text())["test"]
    assert f"accuracy={saved['accuracy']:.4f}" in result.stdout


def test_second_run_without_overwrite_is_refused(trained: tuple[Path, Path]) -> None:
    work, run = trained
    before = sorted(p.name for p in run.iterdir())
    result = run_cli("finetune", str(work / "recipe.toml"), cwd=work)
    assert result.returncode == 2
    assert "a run already exists there. Nothing was changed. Use --overwrite" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in run.iterdir()) == before


def test_broken_recipe_exit_code_2_without_traceback(tmp_path: Path, tiny_bert_dir: Path) -> None:
    recipe = tmp_path / "broken.toml"
    recipe.write_text(
        f'[model]\nname_or_path = "{tiny_bert_dir}"\n[task]\ntype = "seq_clas"\n'
        '[data]\ntrain_file = "nope.csv"\n[adapter]\nrnk = 4\n[train]\nlearning_rate = "high"\n'
    )
    for command in ("validate", "finetune"):
        result = run_cli(command, str(recipe), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert f"error: {recipe}: the recipe has 4 problems:" in result.stderr
        for key in ("task.type", "data.train_file", "adapter.rnk", "train.learning_rate"):
            assert f"{recipe}: {key}: " in result.stderr


def test_predict_on_missing_run_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"text": "x"}\n')
    result = run_cli(
        "predict",
        str(tmp_path / "nope"),
        "--input",
        str(tmp_path / "in.jsonl"),
        "--output",
        "o",
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'nope'}: no such run directory" in result.stderr
    (tmp_path / "empty").mkdir()
    result = run_cli("predict", "empty", "--input", "in.jsonl", "--output", "o", cwd=tmp_path)
    assert result.returncode == 2 and "empty/peftkit_run.json: not found" in result.stderr


def test_help_does_not_import_torch() -> None:
    code = "import sys; from peftkit.cli import main; assert 'torch' not in sys.modules; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "ok", result.stderr
    result = run_cli("--help", cwd=REPO)
    assert result.returncode == 0 and "finetune" in result.stdout


def test_recipes_list_show_copy(tmp_path: Path) -> None:
    result = run_cli("recipes", "list", cwd=tmp_path)
    assert "seq_cls_lora" in result.stdout
    result = run_cli("recipes", "copy", "seq_cls_lora", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0
    copied = tmp_path / "seq_cls_lora.toml"
    assert (tmp_path / json.loads(json.dumps("x"))).name == "x"
    validated = run_cli("validate", str(copied), cwd=tmp_path)
    assert validated.returncode == 0, validated.stderr  # data paths were rebased to the new folder
    again = run_cli("recipes", "copy", "seq_cls_lora", str(tmp_path), cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr
    missing = run_cli("recipes", "show", "seq_cls_lor", cwd=tmp_path)
    assert missing.returncode == 2 and "did you mean 'seq_cls_lora'?" in missing.stderr
