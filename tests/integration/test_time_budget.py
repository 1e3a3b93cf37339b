"""``[train] max_train_minutes`` through the CLI: the budget cuts a long schedule short, and the run still
ends like a finished one (evaluated at the step it stopped, adapter saved, status ``completed``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tests.conftest import REPO, run_cli

TRAIN_SAMPLES = 2000
BATCH = 8
EPOCHS = 3
SCHEDULE = math.ceil(TRAIN_SAMPLES / BATCH) * EPOCHS  # 750 optimizer steps

RECIPE = f"""
[model]
name_or_path = "{{model}}"

[task]
type = "seq_cls"
max_length = 32

[data]
dataset = "{REPO / "data" / "sms_spam"}"
max_train_samples = {TRAIN_SAMPLES}
max_eval_samples = 64
max_test_samples = 64

[adapter]
r = 4
alpha = 8

[train]
num_train_epochs = {EPOCHS}
per_device_train_batch_size = {BATCH}
logging_steps = 5
output_dir = "{{out}}"
"""


def test_time_budget_stops_training_then_evaluates_and_saves(tmp_path: Path, tiny_bert_dir: Path) -> None:
    recipe = tmp_path / "budget.toml"
    run = tmp_path / "run"
    recipe.write_text(RECIPE.format(model=tiny_bert_dir, out=run))
    # 0.6 s of training: the tiny model takes milliseconds a step, the schedule needs 750 steps
    result = run_cli("finetune", str(recipe), "--set", "train.max_train_minutes=0.01", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "time budget of 0.01 minutes (train.max_train_minutes) reached at step" in result.stderr

    history = json.loads((run / "log_history.json").read_text())
    stopped_at = history[-1]["step"]
    assert 0 < stopped_at < SCHEDULE
    # the step it stopped at was evaluated (mid-epoch: only the budget asks for that) and checkpointed
    evaluations = [entry for entry in history if "eval_loss" in entry]
    assert evaluations and evaluations[-1]["step"] == stopped_at
    assert evaluations[-1]["epoch"] < EPOCHS
    assert (run / f"checkpoint-{stopped_at}" / "adapter_model.safetensors").is_file()

    assert (run / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((run / "adapter_config.json").read_text())["peft_type"] == "LORA"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"validation", "test"} <= set(metrics) and "accuracy" in metrics["test"]
    meta = json.loads((run / "peftkit_run.json").read_text())
    assert meta["status"] == "completed"
    assert meta["recipe"]["train"]["max_train_minutes"] == 0.01
