"""seq_cls beyond single-text classification: regression targets and text pairs, in-process on a tiny BERT."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from peftkit.recipe import recipe_from_dict
from peftkit.runs import load_run
from peftkit.training import finetune


def write_pairs(path: Path, n: int, regression: bool) -> None:
    rng = random.Random(len(path.name) + n)
    rows = ["text,text_pair,label"]
    for i in range(n):
        level = rng.randint(0, 4)
        label = f"{level / 4:.2f}" if regression else ("same" if level % 2 else "different")
        rows.append(f"good {'very ' * level}nice {i},{'yes' if level % 2 else 'no'} {i},{label}")
    path.write_text("\n".join(rows) + "\n")


def recipe_for(tmp_path: Path, model: Path, regression: bool) -> object:
    write_pairs(tmp_path / "train.csv", 48, regression)
    write_pairs(tmp_path / "validation.csv", 16, regression)
    task = {"type": "seq_cls", "max_length": 32, **({"num_labels": 1} if regression else {})}
    raw = {
        "model": {"name_or_path": str(model)},
        "task": task,
        "data": {"train_file": "train.csv", "validation_file": "validation.csv"},
        "adapter": {"r": 4},
        "train": {
            "num_train_epochs": 1,
            "per_device_train_batch_size": 8,
            "output_dir": str(tmp_path / "run"),
            "report_to": ["none"],
        },
    }
    return recipe_from_dict(raw, base_dir=tmp_path, name="variant")


@pytest.mark.parametrize("regression", [True, False], ids=["regression", "pairs"])
def test_finetune_and_reload(tmp_path: Path, tiny_bert_dir: Path, regression: bool) -> None:
    recipe = recipe_for(tmp_path, tiny_bert_dir, regression)
    result = finetune(recipe)  # type: ignore[arg-type]
    validation = result.metrics["validation"]
    if regression:
        assert {"mse", "rmse", "mae", "pearson", "spearman"} <= set(validation)
        assert json.loads((result.run_dir / "labels.json").read_text())["labels"] is None
    else:
        assert {"accuracy", "f1_macro", "f1_same", "f1_different"} <= set(validation)
    saved = [
        json.loads(line)
        for line in (result.run_dir / "predictions_validation.jsonl").read_text().splitlines()
    ]
    loaded = load_run(result.run_dir)
    import csv

    records = list(csv.DictReader((tmp_path / "validation.csv").open()))
    predicted = loaded.task.predict(loaded.model, loaded.ctx, records)
    if regression:
        got = [p["prediction"] for p in predicted]
        assert got == pytest.approx([s["prediction"] for s in saved], abs=1e-5)
        assert all(isinstance(s["reference"], float) for s in saved)
    else:
        assert [p["prediction"] for p in predicted] == [s["prediction"] for s in saved]


def test_metrics_report_how_much_optimizer_state_is_8bit(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """Tiny LoRA matrices stay under the 4096-element 8-bit threshold: their state is fp32, and we say so."""
    recipe = recipe_for(tmp_path, tiny_bert_dir, regression=False)
    raw = recipe.to_dict()  # type: ignore[attr-defined]
    raw["train"]["optim"] = "adamw_bnb_8bit"
    raw = {k: v for k, v in raw.items() if v is not None}
    result = finetune(recipe_from_dict(raw, base_dir=tmp_path, name="eightbit"))
    assert result.metrics["optimizer_state_bytes"] > 0
    assert 0 <= result.metrics["optimizer_state_8bit_bytes"] < result.metrics["optimizer_state_bytes"]
