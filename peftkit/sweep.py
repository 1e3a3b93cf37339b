"""Hyper-parameter sweeps: ``peftkit sweep RECIPE --trials N`` with Optuna as the engine.

The recipe's ``[sweep]`` table names the search space over any recipe key::

    [sweep]
    metric = "f1_macro"          # a validation metric; default: the task's best-checkpoint metric
    direction = "maximize"       # default: the task's for its metric, "minimize" for losses/errors
    sampler = "tpe"              # or "random"
    pruner = "median"            # or "none": stop trials whose intermediate eval metric lags
    [sweep.space]
    "train.learning_rate" = {log_uniform = [1e-5, 1e-3]}
    "adapter.r" = {choice = [4, 8, 16]}
    "adapter.lora_dropout" = {uniform = [0.0, 0.2]}
    "train.num_train_epochs" = {int = [1, 3]}

A trial is the base recipe plus ``--set``-style overrides, validated by the recipe layer like any recipe,
and runs as a normal run directory ``<sweep>/trial-NNNN``. The Optuna study lives in ``<sweep>/optuna.db``
(SQLite), so a killed sweep resumes where it stopped: finished trials are kept, a trial that was running
is recorded from its run directory if that finished, else run again with the same parameters.

``peftkit finetune`` ignores ``[sweep]``: a sweep recipe is also a valid recipe at its own values (the
baseline the sweep should beat), and the table is validated either way.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError, did_you_mean
from peftkit.outputs import check_output_dir, output_lock
from peftkit.recipe import apply_override, load_recipe, recipe_from_dict
from peftkit.recipe.sweep_table import Parameter, SweepSpec, override_text, parse_sweep_table
from peftkit.recipe.toml_writer import to_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

logger = logging.getLogger(__name__)

LOWER_IS_BETTER = re.compile(r"(loss|mse|mae|rmse|perplexity|error)$")
STUDY_NAME = "peftkit-sweep"
SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_MD = "sweep_summary.md"
BEST_RECIPE = "best_recipe.toml"
SWEEP_RECORD = "sweep.json"


# --------------------------------------------------------------------------------------------------
# Running a sweep


@dataclass
class SweepResult:
    sweep_dir: Path
    metric: str
    direction: str
    trials: list[dict[str, Any]]  # one row per finished trial (complete or pruned)
    best: dict[str, Any] | None
    ran: int  # trials run by this call (the rest were done before)
    files: list[Path]


def sweep_dir_for(recipe: Any) -> Path:
    """Default sweep folder: the recipe's run directory name + ``-sweep``."""
    return recipe.output_dir.with_name(recipe.output_dir.name + "-sweep")


def run_sweep(
    recipe_path: str | os.PathLike[str],
    trials: int,
    *,
    overrides: Sequence[str] = (),
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> SweepResult:
    """Run (or resume) the recipe's sweep until ``trials`` trials have finished; write its summary."""
    import optuna

    from peftkit import runs
    from peftkit.tasks import TASKS

    if trials < 1:
        raise PeftkitError(f"--trials {trials}: give at least 1")
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path, overrides)
    if recipe.sweep is None:
        raise PeftkitError(
            f"{recipe_path}: no [sweep] table; add one with a [sweep.space], e.g. "
            '"train.learning_rate" = {log_uniform = [1e-5, 1e-3]}'
        )
    spec, _ = parse_sweep_table(recipe.sweep)
    assert spec is not None  # load_recipe validated it
    raw = tomllib.loads(recipe_path.read_text(encoding="utf-8"))
    base = {k: v for k, v in raw.items() if k != "sweep"}
    task_metric, task_greater = TASKS[recipe.task_name].best_metric(recipe.task)
    metric = spec.metric or task_metric
    if spec.direction:
        direction = spec.direction
    elif metric == task_metric:
        direction = "maximize" if task_greater else "minimize"
    else:
        direction = "minimize" if LOWER_IS_BETTER.search(metric) else "maximize"
    # `--set sweep.*` is already in `spec`; a trial's recipe has no [sweep] table to apply it to
    trial_overrides = [o for o in overrides if not o.strip().startswith("sweep.")]
    if spec.metric and "metric_for_best_model" not in raw.get("train", {}):
        # each trial keeps the checkpoint that is best by the metric the sweep optimizes
        trial_overrides += [
            override_text("train.metric_for_best_model", metric),
            override_text("train.greater_is_better", direction == "maximize"),
        ]

    sweep_dir = Path(out_dir) if out_dir else sweep_dir_for(recipe)
    sweep_dir = sweep_dir.resolve()
    with output_lock(sweep_dir):  # one live writer per sweep folder
        if overwrite and sweep_dir.exists():
            check_output_dir(
                sweep_dir, True, markers=(SWEEP_RECORD, "optuna.db"), inputs=runs.recipe_inputs(recipe)
            )  # only a sweep's folder
            shutil.rmtree(sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "recipe_source": str(recipe_path.resolve()),
            "recipe": {k: v for k, v in recipe.to_dict().items() if k != "train"}
            | {"train": {k: v for k, v in recipe.train.items() if k != "output_dir"}},
            "overrides": list(overrides),
            "metric": metric,
            "direction": direction,
        }
        _check_same_sweep(sweep_dir, record)
        runs.write_json_atomic(sweep_dir / SWEEP_RECORD, record)

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        seed = spec.seed if spec.seed is not None else int(recipe.train["seed"])
        study = optuna.create_study(
            study_name=STUDY_NAME,
            storage=f"sqlite:///{sweep_dir / 'optuna.db'}",
            load_if_exists=True,
            direction="maximize" if direction == "maximize" else "minimize",
            sampler=_sampler(spec, trials, seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2)
            if spec.pruner == "median"
            else optuna.pruners.NopPruner(),
        )
        _recover_stale_trials(study, sweep_dir, metric)
        finished = _finished(study)
        if not study.trials and spec.baseline_trial:
            values = {p.path: _base_value(recipe, p.path) for p in spec.parameters}
            study.enqueue_trial({k: v for k, v in values.items() if _param(spec, k).contains(v)})
        remaining = max(trials - len(finished), 0)
        if finished:
            logger.info(
                "sweep %s: %d of %d trials finished before; running %d more",
                sweep_dir,
                len(finished),
                trials,
                remaining,
            )

        def objective(trial: Any) -> float:
            return _run_trial(trial, spec, base, recipe_path, recipe.name, trial_overrides, sweep_dir, metric)

        if remaining:
            study.optimize(objective, n_trials=remaining, catch=())
        return write_summary(study, spec, sweep_dir, metric, direction, raw, overrides, recipe, ran=remaining)


def _check_same_sweep(sweep_dir: Path, record: dict[str, Any]) -> None:
    """Resuming continues the same search only: same recipe values, overrides and objective."""
    path = sweep_dir / SWEEP_RECORD
    if not path.is_file():
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    current = json.loads(json.dumps(record, default=str))
    changed = [key for key in current if previous.get(key) != current[key] and key != "recipe_source"]
    if changed:
        raise PeftkitError(
            f"{sweep_dir}: holds a sweep started with a different {' and '.join(changed)}; resume it with "
            "the same recipe and --set values, or start over with --overwrite (or another --out folder)"
        )


def _sampler(spec: SweepSpec, trials: int, seed: int) -> Any:
    import optuna

    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Optuna's default of 10 random trials before TPE would make a short sweep purely random
    startup = spec.startup_trials or min(10, max(2, trials // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def _param(spec: SweepSpec, path: str) -> Parameter:
    return next(p for p in spec.parameters if p.path == path)


def _base_value(recipe: Any, path: str) -> Any:
    table, _, key = path.partition(".")
    data = recipe.to_dict().get(table) or {}
    return data.get(key)


def _finished(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return sweep_dir / f"trial-{number:04d}"


def _recover_stale_trials(study: Any, sweep_dir: Path, metric: str) -> None:
    """Trials left 'running' by a killed sweep: record them from their run directory if it finished,
    else mark them failed and queue their parameters again."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run_dir = trial_dir(sweep_dir, trial.number)
        value = _completed_value(run_dir, metric)
        if value is not None:
            logger.info("sweep: trial %d finished before the sweep was stopped; recording it", trial.number)
            study.tell(trial.number, value)
        else:
            logger.info("sweep: trial %d was interrupted; running its parameters again", trial.number)
            study.tell(trial.number, state=TrialState.FAIL)
            study.enqueue_trial(trial.params)


def _completed_value(run_dir: Path, metric: str) -> float | None:
    from peftkit import runs

    completed = runs.read_completed(run_dir)
    value = completed[1].get("validation", {}).get(metric) if completed is not None else None
    return float(value) if isinstance(value, (int, float)) else None


def _run_trial(
    trial: Any,
    spec: SweepSpec,
    base: Mapping[str, Any],
    recipe_path: Path,
    name: str,
    overrides: Sequence[str],
    sweep_dir: Path,
    metric: str,
) -> float:
    import optuna

    from peftkit.training import finetune

    params = {p.path: p.suggest(trial) for p in spec.parameters}
    run_dir = trial_dir(sweep_dir, trial.number)
    param_overrides = [override_text(path, value) for path, value in params.items()]
    recipe = recipe_from_dict(
        base,
        source=str(recipe_path),
        base_dir=recipe_path.parent,
        name=f"{name}-trial-{trial.number:04d}",
        overrides=[*overrides, *param_overrides, override_text("train.output_dir", str(run_dir))],
    )
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("overrides", param_overrides)
    logger.info("sweep: trial %d: %s", trial.number, " ".join(param_overrides))
    reporter = trial_reporter(trial, metric)
    result = finetune(recipe, overwrite=True, callbacks=[reporter])
    validation = result.metrics.get("validation", {})
    if metric not in validation:
        numeric = sorted(k for k, v in validation.items() if isinstance(v, (int, float)))
        hint = did_you_mean(metric, numeric)
        raise PeftkitError(
            f"{recipe_path}: sweep.metric {metric!r} is not a validation metric of this task "
            f"({hint + ' ' if hint else ''}choose one of {numeric})"
        )
    value = float(validation[metric])
    if reporter.pruned:
        trial.set_user_attr("value_when_stopped", value)
        raise optuna.TrialPruned(f"pruned at step {reporter.pruned_at}")
    return value


def trial_reporter(trial: Any, metric: str) -> Any:
    """A TrainerCallback that reports each evaluation's metric to the trial and stops a pruned trial.

    The pruned trial still ends as a complete run directory (its kept checkpoint is saved and evaluated).
    """
    from transformers import TrainerCallback

    class ReportToTrial(TrainerCallback):
        pruned = False
        pruned_at: int | None = None

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> Any:
            value = (metrics or {}).get(f"eval_{metric}")
            if value is None or self.pruned:
                return control
            trial.report(float(value), step=state.global_step)
            if trial.should_prune():
                self.pruned, self.pruned_at = True, state.global_step
                control.should_training_stop = True
            return control

    return ReportToTrial()


# --------------------------------------------------------------------------------------------------
# Summary, plot, best recipe


def write_summary(
    study: Any,
    spec: SweepSpec,
    sweep_dir: Path,
    metric: str,
    direction: str,
    raw: Mapping[str, Any],
    overrides: Sequence[str],
    recipe: Any,
    ran: int,
) -> SweepResult:
    """sweep_summary.csv/.md, sweep_<metric>.png and best_recipe.toml from the study's finished trials."""
    from optuna.trial import TrialState

    from peftkit import runs

    rows: list[dict[str, Any]] = []
    for trial in _finished(study):
        run_dir = Path(trial.user_attrs.get("run_dir", trial_dir(sweep_dir, trial.number)))
        value = (
            trial.value if trial.state == TrialState.COMPLETE else trial.user_attrs.get("value_when_stopped")
        )
        row: dict[str, Any] = {
            "trial": trial.number,
            "state": "complete" if trial.state == TrialState.COMPLETE else "pruned",
            metric: value,
        }
        row.update({p.path: trial.params.get(p.path) for p in spec.parameters})
        metrics_path = run_dir / runs.METRICS
        metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
        row["wall_time_s"] = metrics.get("wall_time_s")
        row["run_dir"] = str(run_dir)
        rows.append(row)
    rows.sort(key=lambda r: r["trial"])
    complete = [r for r in rows if r["state"] == "complete" and r[metric] is not None]
    best = None
    if complete:
        pick = max if direction == "maximize" else min
        best = pick(complete, key=lambda r: r[metric])
    for row in rows:
        row["best"] = row is best
    files = [sweep_dir / SUMMARY_CSV, sweep_dir / SUMMARY_MD]
    columns = list(rows[0]) if rows else ["trial", "state", metric]
    with open(files[0], "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    runs.write_text_atomic(files[1], markdown_table(rows, columns))
    plot = plot_sweep(rows, spec, metric, sweep_dir / f"sweep_{metric}.png")
    if plot:
        files.append(plot)
    if best is not None:
        best_path = sweep_dir / BEST_RECIPE
        runs.write_text_atomic(
            best_path, best_recipe_text(raw, overrides, best, spec, metric, recipe, len(rows))
        )
        files.append(best_path)
    return SweepResult(sweep_dir, metric, direction, rows, best, ran, files)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_sweep(rows: Sequence[Mapping[str, Any]], spec: SweepSpec, metric: str, path: Path) -> Path | None:
    """The metric against each parameter: one panel per parameter; pruned trials hollow, best starred."""
    scored = [r for r in rows if r[metric] is not None]
    if not scored:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(spec.parameters)
    fig, axes = plt.subplots(1, count, figsize=(4.2 * count, 3.6), dpi=100, squeeze=False)
    for ax, parameter in zip(axes[0], spec.parameters, strict=True):
        if parameter.kind == "choice":
            labels = [str(c) for c in parameter.choices]
            position = {str(c): i for i, c in enumerate(parameter.choices)}
            xs = [position[str(r[parameter.path])] for r in scored]
            ax.set_xticks(range(len(labels)), labels)
        else:
            xs = [r[parameter.path] for r in scored]
            if parameter.kind == "log_uniform":
                ax.set_xscale("log")
        ys = [r[metric] for r in scored]
        for x, y, row in zip(xs, ys, scored, strict=True):
            pruned = row["state"] == "pruned"
            ax.scatter(
                [x],
                [y],
                marker="*" if row.get("best") else "o",
                s=140 if row.get("best") else 40,
                facecolors="none" if pruned else "C0",
                edgecolors="C0",
            )
        ax.set_xlabel(parameter.path)
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def best_recipe_text(
    raw: Mapping[str, Any],
    overrides: Sequence[str],
    best: Mapping[str, Any],
    spec: SweepSpec,
    metric: str,
    recipe: Any,
    finished: int,
) -> str:
    """The base recipe with the best trial's values, as TOML that ``peftkit finetune`` accepts.

    Relative paths are made absolute (the file lives in the sweep folder, not next to the recipe), and the
    run directory is the recipe's own with ``-best`` appended.
    """
    data = json.loads(json.dumps({k: v for k, v in raw.items() if k != "sweep"}))
    for text in [*overrides, *(override_text(p.path, best[p.path]) for p in spec.parameters)]:
        apply_override(data, text)
    resolved = recipe.to_dict()
    path_keys = {
        "model": ("name_or_path", "tokenizer", "decoder_name_or_path"),
        "data": ("dataset", "train_file", "validation_file", "test_file"),
        "train": ("deepspeed",),
    }
    for table, keys in path_keys.items():
        for key in keys:
            value = data.get(table, {}).get(key)
            if isinstance(value, str) and not value.startswith("pypi:") and resolved.get(table, {}).get(key):
                data[table][key] = resolved[table][key]
    data.setdefault("train", {})["output_dir"] = str(recipe.output_dir) + "-best"
    source = Path(recipe.source)
    header = [
        f"# peftkit finetune {source.with_name(source.stem + '-sweep')}/{BEST_RECIPE}",
        f"# The best of {finished} trials of `peftkit sweep {source}`: trial {best['trial']}, "
        f"validation {metric} = {best[metric]:.6g}.",
        "# " + " ".join(f"--set {override_text(p.path, best[p.path])}" for p in spec.parameters),
        "",
    ]
    return "\n".join(header) + to_toml(data)
