"""QA end to end through the CLI: ``peftkit finetune`` then ``peftkit predict`` from the run directory alone.

The fast tests use the tiny random BERT (seconds) and check the plumbing: files, metrics, evaluation loss,
predictions reproduced by a reloaded run, and the error for bad data. The slow test trains LoRA on the real
MiniLM with the shipped recipe and requires the training-set F1 to pass 80 (of 100).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from peftkit.metrics.squad import squad_metrics
from tests.conftest import FIXTURES, REPO, minilm_path, run_cli

FIXTURE = REPO / "data" / "qa_fixture"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_recipe(path: Path, model: Path, dataset: Path, output_dir: Path, task: str, train: str) -> Path:
    path.write_text(
        f"""
[model]
name_or_path = "{model}"

[task]
type = "qa"
{task}

[data]
dataset = "{dataset}"

[adapter]
method = "lora"
r = 4
alpha = 8
target_modules = ["query", "value"]

[train]
output_dir = "{output_dir}"
report_to = []
{train}
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def tiny_run(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of LoRA on the tiny BERT, v2 fixture (unanswerable questions), windows of 64 tokens."""
    folder = tmp_path_factory.mktemp("qa-tiny")
    recipe = write_recipe(
        folder / "qa_tiny.toml",
        tiny_bert_dir,
        FIXTURE / "v2",
        folder / "run",
        task="max_length = 64\ndoc_stride = 16\nversion_2_with_negative = true",
        train="num_train_epochs = 1\nper_device_train_batch_size = 16\nlearning_rate = 1e-3",
    )
    result = run_cli("finetune", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run"


def test_finetune_writes_qa_predictions_and_metrics(tiny_run: Path) -> None:
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for split, rows in (("validation", 16), ("test", 19)):
        split_metrics = metrics[split]
        assert {"exact_match", "f1", "HasAns_exact", "NoAns_exact", "HasAns_total", "NoAns_total"} <= set(
            split_metrics
        )
        assert split_metrics["loss"] > 0  # evaluation features carry labels, so there is an eval loss
        examples = read_jsonl(FIXTURE / "v2" / f"{split}.jsonl")
        predictions = read_jsonl(tiny_run / f"predictions_{split}.jsonl")
        assert len(predictions) == len(examples) == rows
        assert [p["reference"] for p in predictions] == [e["answers"]["text"] for e in examples]
        for prediction, example in zip(predictions, examples, strict=True):
            assert prediction["prediction"] in example["context"]  # a span of its context, or ""
        scores = squad_metrics(
            [p["prediction"] for p in predictions], [p["reference"] for p in predictions], True
        )
        assert scores["f1"] == pytest.approx(split_metrics["f1"])
    adapter_config = json.loads((tiny_run / "adapter_config.json").read_text())
    # a plain PeftModel: peft's QUESTION_ANS wrapper drops token_type_ids (see peftkit.tasks.qa)
    assert adapter_config["task_type"] is None and "qa_outputs" in adapter_config["modules_to_save"]


def test_predict_from_the_run_directory_reproduces_test_predictions(tiny_run: Path, tmp_path: Path) -> None:
    examples = read_jsonl(FIXTURE / "v2" / "test.jsonl")
    records = tmp_path / "records.jsonl"
    records.write_text(
        "".join(json.dumps({"question": e["question"], "context": e["context"]}) + "\n" for e in examples)
    )
    output = tmp_path / "answers.jsonl"
    result = run_cli("predict", str(tiny_run), "--input", str(records), "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    answers = read_jsonl(output)
    trained = read_jsonl(tiny_run / "predictions_test.jsonl")
    assert [a["prediction"] for a in answers] == [t["prediction"] for t in trained]
    for answer, example in zip(answers, examples, strict=True):
        assert set(answer) == {"prediction", "start", "end", "score"}
        if answer["prediction"]:
            assert example["context"][answer["start"] : answer["end"]] == answer["prediction"]
        else:
            assert answer["start"] is None and answer["end"] is None


def test_bad_answer_start_stops_finetune_with_the_example_id(tiny_bert_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(FIXTURES / "qa" / "bad_answer_start.jsonl", data / "train.jsonl")
    shutil.copy(FIXTURES / "qa" / "bad_answer_start.jsonl", data / "validation.jsonl")
    recipe = write_recipe(tmp_path / "bad.toml", tiny_bert_dir, data, tmp_path / "run", "", "")
    result = run_cli("finetune", str(recipe))
    assert result.returncode == 2
    assert "2 answer(s) do not match their context" in result.stderr
    assert "example 'moon-off-by-one': answer 'maria' at answer_start=266" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_minilm_lora_learns_the_fixture_and_predicts_from_a_fresh_process(tmp_path: Path) -> None:
    """The shipped recipe on the real MiniLM; validation is the training file, so its F1 is train-set F1."""
    minilm_path()  # skips without the wheel
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(FIXTURE / "train.jsonl", data / "train.jsonl")
    shutil.copy(FIXTURE / "train.jsonl", data / "validation.jsonl")
    shutil.copy(FIXTURE / "test.jsonl", data / "test.jsonl")
    run_dir = tmp_path / "run"
    started = time.time()
    result = run_cli(
        "finetune",
        str(REPO / "recipes" / "qa_lora.toml"),
        "--set",
        f'data.dataset="{data}"',
        "--set",
        f'train.output_dir="{run_dir}"',
        "--set",
        "train.report_to=[]",
    )
    elapsed = time.time() - started
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = json.loads((run_dir / "log_history.json").read_text())
    per_epoch = [(round(h["epoch"]), round(h["eval_f1"], 1)) for h in history if "eval_f1" in h]
    print(f"\nfinetune {elapsed:.0f} s; train-set F1 per epoch {per_epoch}; test {metrics['test']}")
    assert metrics["validation"]["f1"] > 80.0, per_epoch
    assert elapsed < 900

    train = read_jsonl(FIXTURE / "train.jsonl")
    records = tmp_path / "records.jsonl"
    records.write_text(
        "".join(json.dumps({"question": e["question"], "context": e["context"]}) + "\n" for e in train)
    )
    output = tmp_path / "answers.jsonl"
    started = time.time()
    result = run_cli("predict", str(run_dir), "--input", str(records), "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    answers = read_jsonl(output)
    scores = squad_metrics([a["prediction"] for a in answers], [e["answers"]["text"] for e in train])
    print(f"predict {time.time() - started:.0f} s (fresh process): train-set {scores}")
    assert scores["f1"] == pytest.approx(metrics["validation"]["f1"])
