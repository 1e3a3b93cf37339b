"""``peftkit merge-adapters``: two (or three) tiny seq_cls LoRA runs combined with every method.

Each result must load with plain ``PeftModel.from_pretrained``, be a run directory ``peftkit predict`` uses,
carry the weighted mean of the runs' heads, and (for the exact methods) apply exactly the weighted sum of the
runs' updates. Incompatible runs get a clear error and no output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from peftkit.combine import COMBINATIONS, merge_adapters
from peftkit.merge import MergeError
from tests.integration.test_merge_tasks import train_seq_cls


@pytest.fixture(scope="module")
def runs(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("merge-adapters")
    return {
        "a": train_seq_cls(work, tiny_bert_dir, "a", seed=1, epochs=2),
        "b": train_seq_cls(work, tiny_bert_dir, "b", seed=2, lr=1e-2, epochs=2),
        "wide": train_seq_cls(work, tiny_bert_dir, "wide", r=8, alpha=8, seed=3, epochs=1),
    }


def load_peft(tiny_bert_dir: Path, folder: Path) -> Any:
    """The plain peft way: base model with the run's label config, then PeftModel.from_pretrained."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert_dir, config=AutoConfig.from_pretrained(folder)
    )
    return PeftModel.from_pretrained(base, folder).eval()


def heads(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(folder / "adapter_model.safetensors").items() if ".lora_" not in k}


@pytest.mark.parametrize("method", COMBINATIONS)
def test_every_method_gives_a_loadable_run(
    method: str, runs: dict[str, Path], tiny_bert_dir: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoTokenizer

    density = 0.5 if method in ("ties", "dare_linear", "dare_ties") else None
    out = tmp_path / method
    result = merge_adapters([runs["a"], runs["b"]], out, method=method, weights=[0.7, 0.3], density=density)
    meta = json.loads((out / "peftkit_run.json").read_text())
    assert meta["status"] == "completed" and meta["merge"]["method"] == method
    assert result.meta["merge"]["weights"] == [0.7, 0.3]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    assert config["r"] == (8 if method == "cat" else 4) and config["lora_alpha"] == config["r"]

    model = load_peft(tiny_bert_dir, out)
    assert model.config.id2label == {0: "ham", 1: "spam"}
    tokenizer = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        encoded = tokenizer(["win free prize 3", "see you at home 4"], padding=True, return_tensors="pt")
        logits = model(**encoded).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()

    # the heads are the weighted mean of the runs' heads (weights normalised to sum to 1)
    a, b, merged = heads(runs["a"]), heads(runs["b"]), heads(out)
    assert set(merged) == set(a) and merged
    for key, value in merged.items():
        assert torch.allclose(value, 0.7 * a[key] + 0.3 * b[key], atol=1e-6), key
    loaded_head = model.base_model.model.classifier.modules_to_save["default"].weight
    assert torch.allclose(loaded_head, merged["base_model.model.classifier.weight"])

    error = meta["merge"]["task_arithmetic_relative_error"]
    if method == "cat":  # concatenation is exact
        assert error < 1e-5
    elif method == "linear":  # combining A and B separately is an approximation: the record says how rough
        assert error > 1e-3


def test_svd_at_full_rank_is_exact_and_at_lower_rank_is_not(runs: dict[str, Path], tmp_path: Path) -> None:
    full = merge_adapters([runs["a"], runs["b"]], tmp_path / "full", method="svd", svd_rank=8)
    low = merge_adapters([runs["a"], runs["b"]], tmp_path / "low", method="svd", svd_rank=2)
    assert full.meta["merge"]["task_arithmetic_relative_error"] < 1e-4
    assert low.meta["merge"]["task_arithmetic_relative_error"] > 1e-3
    assert json.loads((tmp_path / "low" / "adapter_config.json").read_text())["r"] == 2


def test_predict_and_evaluate_work_on_the_combined_run(runs: dict[str, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from peftkit.cli import main

    out = tmp_path / "combined"
    cli = CliRunner()
    result = cli.invoke(
        main,
        ["merge-adapters", str(runs["a"]), str(runs["b"]), "--out", str(out), "--method", "cat"],
    )
    assert result.exit_code == 0, result.output
    assert "LoRA r=8, method cat" in result.output and "heads averaged: True" in result.output
    records = tmp_path / "in.jsonl"
    records.write_text('{"text": "win free prize cash 7"}\n{"text": "see you at home 8"}\n')
    predictions = tmp_path / "out.jsonl"
    result = cli.invoke(main, ["predict", str(out), "--input", str(records), "--output", str(predictions)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 2 and {r["prediction"] for r in rows} <= {"ham", "spam"}
    result = cli.invoke(main, ["evaluate", str(out), "--split", "test"])
    assert result.exit_code == 0, result.output
    assert "accuracy=" in result.output
    again = cli.invoke(main, ["merge-adapters", str(runs["a"]), str(runs["b"]), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_unequal_ranks_are_padded_for_linear_and_kept_for_cat(runs: dict[str, Path], tmp_path: Path) -> None:
    linear = merge_adapters([runs["a"], runs["wide"]], tmp_path / "linear", method="linear")
    assert linear.meta["merge"]["zero_padded_to_rank"] == 8
    assert linear.meta["merge"]["padded_runs"] == [str(runs["a"].resolve())]
    assert json.loads((tmp_path / "linear" / "adapter_config.json").read_text())["r"] == 8
    cat = merge_adapters([runs["a"], runs["wide"]], tmp_path / "cat", method="cat")
    assert cat.meta["merge"]["zero_padded_to_rank"] is None
    assert json.loads((tmp_path / "cat" / "adapter_config.json").read_text())["r"] == 12
    assert cat.meta["merge"]["task_arithmetic_relative_error"] < 1e-5


def test_incompatible_runs_and_bad_arguments_are_refused(
    runs: dict[str, Path], tiny_bert_dir: Path, tmp_path: Path
) -> None:
    other = train_seq_cls(tmp_path / "other", tiny_bert_dir, "neg", labels=("neg", "pos"), epochs=1)
    cases = [
        (([runs["a"], other], {}), "different labels"),
        (([runs["a"]], {}), "at least two"),
        (([runs["a"], runs["a"]], {}), "named twice"),
        (([runs["a"], runs["b"]], {"method": "ties"}), "needs --density"),
        (([runs["a"], runs["b"]], {"method": "linear", "density": 0.3}), "applies to ties"),
        (([runs["a"], runs["b"]], {"weights": [1.0]}), "one weight per run"),
        (([runs["a"], runs["b"]], {"method": "magic"}), "use one of linear, cat, svd"),
        (([runs["a"], runs["b"]], {"weights": [1.0, -1.0]}), "positive sum"),
    ]
    for (sources, kwargs), message in cases:
        out = tmp_path / "out"
        with pytest.raises(MergeError, match=message):
            merge_adapters(sources, out, **kwargs)
        assert not out.exists()
