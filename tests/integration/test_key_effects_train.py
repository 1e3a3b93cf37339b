"""peftkit's own [train] keys (those that are not TrainingArguments fields), shown through a run."""

from __future__ import annotations

from pathlib import Path

from tests.integration.key_effects_common import finetune_raw, read_json, write_csv


def test_early_stopping_threshold_decides_what_counts_as_an_improvement(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    """The same run twice, with patience 1 and an evaluation every step: with the default threshold the
    falling validation loss keeps training; with a threshold no improvement can pass, it stops after the
    second evaluation."""
    write_csv(tmp_path / "train.csv", 16)
    train = {
        "max_steps": 6,
        "per_device_train_batch_size": 8,
        "learning_rate": 2e-2,
        "eval_strategy": "steps",
        "eval_steps": 1,
        "save_strategy": "steps",
        "save_steps": 1,
        "save_total_limit": 1,
        "metric_for_best_model": "loss",
        "greater_is_better": False,
        "early_stopping_patience": 1,
        "report_to": ["none"],
    }

    def recipe(**extra: float) -> dict:
        return {
            "model": {"name_or_path": str(tiny_bert_dir)},
            "task": {"type": "seq_cls", "max_length": 32},
            # validation = the training file: its loss falls while the model learns it
            "data": {"train_file": "train.csv", "validation_file": "train.csv"},
            "adapter": {"r": 4},
            "train": {**train, **extra},
        }

    def evaluations(run: Path) -> list[float]:
        return [e["eval_loss"] for e in read_json(run / "log_history.json") if "eval_loss" in e]

    default = evaluations(finetune_raw(recipe(), tmp_path, "default"))
    strict = evaluations(finetune_raw(recipe(early_stopping_threshold=1e9), tmp_path, "strict"))
    assert len(strict) == 2  # the first sets the best; the second cannot beat it by 1e9
    assert len(default) > 2 and default[1] < default[0]
