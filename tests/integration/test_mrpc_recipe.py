"""The shipped sentence-pair recipe (GLUE MRPC layout) through ``peftkit finetune`` on a local fixture in the
same layout: integer labels named by label_list, and a test split without labels (-1 everywhere, as GLUE
ships it) that is predicted, not scored, with the adapter saved."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from peftkit.recipe import recipes_dir
from tests.conftest import invoke_cli

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "mrpc"
RECIPE = recipes_dir() / "seq_cls_pair_mrpc_lora.toml"
QUICK = (
    "train.max_steps=2",
    "train.per_device_train_batch_size=8",
    "train.eval_strategy='no'",
    "train.save_strategy='no'",
    "train.load_best_model_at_end=false",
    "train.report_to=['none']",
)


def finetune(recipe: Path, model: Path, out: Path, *extra: str) -> Any:
    sets = [f"model.name_or_path='{model}'", f"train.output_dir='{out}'", *QUICK, *extra]
    return invoke_cli("finetune", str(recipe), *[arg for s in sets for arg in ("--set", s)])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_mrpc_recipe_trains_on_pairs_and_predicts_the_unlabelled_test_split(
    tmp_path: Path, tiny_bert_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="peftkit"):
        result = finetune(RECIPE, tiny_bert_dir, out, f"data.dataset='{FIXTURE}'")
    assert result.exit_code == 0, result.output
    # the adapter is saved, with label_list naming the integer labels 0/1 in the head's config
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert json.loads((out / "labels.json").read_text())["labels"] == ["not_equivalent", "equivalent"]
    assert json.loads((out / "config.json").read_text())["id2label"] == {
        "0": "not_equivalent",
        "1": "equivalent",
    }
    # validation is scored against the named references; test (label -1 everywhere) is predicted only
    validation = read_jsonl(out / "predictions_validation.jsonl")
    truth = [
        "not_equivalent" if r["label"] == 0 else "equivalent"
        for r in read_jsonl(FIXTURE / "validation.jsonl")
    ]
    assert [r["reference"] for r in validation] == truth
    test = read_jsonl(out / "predictions_test.jsonl")
    assert len(test) == len(read_jsonl(FIXTURE / "test.jsonl"))
    assert all("reference" not in r and r["prediction"] in ("not_equivalent", "equivalent") for r in test)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "f1_macro" in metrics["validation"] and "test" not in metrics
    meta = json.loads((out / "peftkit_run.json").read_text())
    assert meta["status"] == "completed"
    assert meta["data"]["test"]["labelled"] is False and meta["data"]["validation"]["labelled"] is True
    said = [r.getMessage() for r in caplog.records if "no labels" in r.getMessage()]
    assert len(said) == 1 and "predictions_test.jsonl" in said[0] and "no test metrics" in said[0]
    summary = result.output[result.output.index("Run directory:") :]
    assert "validation: " in summary and "test: " not in summary  # the summary shows no test scores


def test_a_failing_evaluation_after_training_keeps_the_saved_adapter(
    tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapter is saved before evaluation: an error there marks the run failed and loses nothing."""
    import peftkit.evaluation

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(peftkit.evaluation, "evaluate_split", broken)
    out = tmp_path / "run"
    result = finetune(RECIPE, tiny_bert_dir, out, f"data.dataset='{FIXTURE}'")
    assert result.exit_code != 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "config.json").is_file()
    meta = json.loads((out / "peftkit_run.json").read_text())
    assert meta["status"] == "failed" and "evaluation broke" in meta["error"]
