"""[train] max_train_minutes: the recipe key is checked, and the callback ends training with an evaluation
and a checkpoint once the budget is spent (not before)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from peftkit.trainer import time_budget_callback


def _step(callback: Any, args: Any, step: int) -> Any:
    from transformers import TrainerControl, TrainerState

    state = TrainerState(global_step=step, max_steps=100)
    return callback.on_step_end(args, state, TrainerControl())


def _started_budget(
    minutes: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **strategies: str
) -> tuple[Any, Any, list[float]]:
    """The callback after on_train_begin, its TrainingArguments, and a clock the test moves by hand."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    import peftkit.trainer as trainer_module

    clock = [1000.0]
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: clock[0])
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **strategies)
    callback = time_budget_callback(minutes)
    callback.on_train_begin(args, TrainerState(), TrainerControl())
    return callback, args, clock


def test_budget_ends_training_with_evaluation_and_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    callback, args, clock = _started_budget(
        2.0, tmp_path, monkeypatch, eval_strategy="steps", save_strategy="steps"
    )
    clock[0] += 119.0  # 1 s short of the budget: training goes on
    control = _step(callback, args, 10)
    assert not control.should_training_stop and not control.should_save

    clock[0] += 2.0
    control = _step(callback, args, 11)
    assert control.should_training_stop and control.should_evaluate and control.should_save
    assert "reached at step 11 of 100" in caplog.text


def test_budget_without_evaluation_only_saves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    callback, args, clock = _started_budget(
        0.5, tmp_path, monkeypatch, eval_strategy="no", save_strategy="epoch"
    )
    clock[0] += 31.0
    control = _step(callback, args, 3)
    assert control.should_training_stop and control.should_save and not control.should_evaluate


@pytest.mark.parametrize(
    ("value", "message"), [(0, "must be a positive number"), ("ten", "expected a number")]
)
def test_budget_key_is_checked(tmp_path: Path, value: Any, message: str) -> None:
    from peftkit.recipe import RecipeError, load_recipe

    recipe = tmp_path / "r.toml"
    text = (Path(__file__).resolve().parents[2] / "recipes" / "seq_cls_lora.toml").read_text()
    text = text.replace(
        'dataset = "../data/sms_spam"', f'dataset = "{Path(__file__).resolve().parents[2]}/data/sms_spam"'
    )
    recipe.write_text(text + f"max_train_minutes = {value!r}\n".replace("'", '"'))
    with pytest.raises(RecipeError, match=rf"train\.max_train_minutes: {message}"):
        load_recipe(recipe)
