"""[sweep] keys through ``peftkit sweep``: the trials it ran are replayed with Optuna alone, so each key's
effect on what was drawn (sampler, seed, startup_trials, baseline_trial, direction) is checked exactly."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from tests.integration.key_effects_common import cli_ok, read_json, write_csv

RECIPE = """
[model]
name_or_path = "{model}"

[task]
type = "seq_cls"
max_length = 32

[data]
train_file = "train.csv"
validation_file = "validation.csv"

[adapter]
r = 4

[train]
learning_rate = 2e-3
max_steps = 2
per_device_train_batch_size = 8
eval_strategy = "no"
save_strategy = "no"
load_best_model_at_end = false
report_to = []
output_dir = "{out}"

[sweep]
metric = "loss"
direction = "maximize"  # the opposite of what "loss" implies, so that the key is what decides
sampler = "tpe"
startup_trials = 1
seed = 5
pruner = "none"
baseline_trial = true

[sweep.space]
"train.learning_rate" = {{log_uniform = [1e-4, 1e-2]}}
"adapter.r" = {{choice = [2, 4, 8]}}
"""


def replay(rows: list[dict[str, Any]], sampler: Any, direction: str, baseline: bool) -> list[tuple]:
    """What Optuna draws for these trials with ``sampler``, told the same results in the same order."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    space = {
        "train.learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
        "adapter.r": CategoricalDistribution([2, 4, 8]),
    }
    study = optuna.create_study(direction=direction, sampler=sampler)
    if baseline:
        study.enqueue_trial({"train.learning_rate": 2e-3, "adapter.r": 4})
    drawn = []
    for row in rows:
        trial = study.ask(space)
        drawn.append((trial.params["train.learning_rate"], trial.params["adapter.r"]))
        study.tell(trial, float(row["loss"]))
    return drawn


def same(a: list[tuple], b: list[tuple]) -> bool:
    """Equal (learning rate, r) sequences."""
    if len(a) != len(b):
        return False
    return all(x[1] == y[1] and x[0] == pytest.approx(y[0]) for x, y in zip(a, b, strict=True))


def test_sweep_keys_decide_the_trials_and_the_best(
    tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna

    pruners: list[str] = []
    create_study = optuna.create_study

    def spy(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("storage"):  # the sweep's own study (the replays below use in-memory ones)
            pruners.append(type(kwargs.get("pruner")).__name__)
        return create_study(*args, **kwargs)

    monkeypatch.setattr(optuna, "create_study", spy)
    write_csv(tmp_path / "train.csv", 24)
    write_csv(tmp_path / "validation.csv", 8, offset=1)
    recipe = tmp_path / "sweep.toml"
    recipe.write_text(RECIPE.format(model=tiny_bert_dir, out=tmp_path / "runs" / "s"), encoding="utf-8")
    out = tmp_path / "sweep"
    cli_ok("sweep", str(recipe), "--trials", "3", "--out", str(out))
    with open(out / "sweep_summary.csv", encoding="utf-8") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: int(r["trial"]))
    assert [r["state"] for r in rows] == ["complete"] * 3
    ran = []
    for row in rows:  # space: each trial's values are in its run's resolved recipe
        recipe_of_trial = read_json(Path(row["run_dir"]) / "peftkit_run.json")["recipe"]
        ran.append((recipe_of_trial["train"]["learning_rate"], recipe_of_trial["adapter"]["r"]))
        assert float(row["train.learning_rate"]) == pytest.approx(ran[-1][0])

    # baseline_trial: trial 0 is the recipe as written
    assert ran[0] == (2e-3, 4)
    # sampler, seed and startup_trials: Optuna alone draws exactly these trials ...
    tpe = optuna.samplers.TPESampler
    expected = replay(rows, tpe(seed=5, n_startup_trials=1), "maximize", baseline=True)
    assert same(ran, expected)
    # ... and any one of them changed draws others
    for other in (
        replay(rows, optuna.samplers.RandomSampler(seed=5), "maximize", baseline=True),
        replay(rows, tpe(seed=6, n_startup_trials=1), "maximize", baseline=True),
        replay(rows, tpe(seed=5, n_startup_trials=2), "maximize", baseline=True),  # the default for 3
    ):
        assert not same(other[1:], ran[1:])
    # metric and direction: the best trial has the highest validation loss
    record = read_json(out / "sweep.json")
    assert record["metric"] == "loss" and record["direction"] == "maximize"
    best = next(r for r in rows if r["best"] == "True")
    assert float(best["loss"]) == max(float(r["loss"]) for r in rows)
    # pruner: "none" runs every trial to the end; "median" stops trials that fall behind
    assert pruners == ["NopPruner"]
    # (a recipe of its own, so that the spy sees one pruner per sweep)
    median = tmp_path / "median.toml"
    median.write_text(recipe.read_text().replace('pruner = "none"', 'pruner = "median"'), encoding="utf-8")
    cli_ok("sweep", str(median), "--trials", "1", "--out", str(tmp_path / "median"))
    assert pruners == ["NopPruner", "MedianPruner"]


def test_set_changes_a_sweep_key(tmp_path: Path, tiny_bert_dir: Path) -> None:
    write_csv(tmp_path / "train.csv", 24)
    write_csv(tmp_path / "validation.csv", 8, offset=1)
    recipe = tmp_path / "sweep.toml"
    recipe.write_text(RECIPE.format(model=tiny_bert_dir, out=tmp_path / "runs" / "s"), encoding="utf-8")
    out = tmp_path / "sweep"
    cli_ok("sweep", str(recipe), "--trials", "1", "--out", str(out), "--set", "sweep.pruner=median")
    assert read_json(out / "trial-0000" / "peftkit_run.json")["status"] == "completed"
