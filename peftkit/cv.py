"""K-fold cross-validation: ``peftkit cv RECIPE --folds K``.

The folds split the recipe's train split (after ``max_train_samples``): stratified on the label for
classification (``seq_cls``), plain shuffled K-fold otherwise. Fold k trains on the other K-1 folds and
validates on fold k; the recipe's test split (when there is one) is evaluated by every fold, and the
recipe's own validation split is not used. Each fold is a normal run directory ``<cv>/fold-k``, trained
from files written to ``<cv>/data/fold-k`` so that the run can be evaluated, merged or resumed on its own.
Labels are pinned to the full training split's (``label_list``), so every fold has the same label ids.

``cv_summary.json`` holds the mean and sample standard deviation (n-1) of every numeric value in the
folds' ``metrics.json`` files, keyed by its dotted path (``validation.f1_macro``, ``wall_time_s``, ...).
A fold that finished before is not trained again (use ``--overwrite`` to redo all).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.outputs import check_output_dir, output_lock
from peftkit.recipe import Recipe, recipe_from_dict

logger = logging.getLogger(__name__)

CV_SUMMARY = "cv_summary.json"


@dataclass
class CVResult:
    cv_dir: Path
    fold_dirs: list[Path]
    summary: dict[str, Any]


def cv_dir_for(recipe: Recipe) -> Path:
    return recipe.output_dir.with_name(recipe.output_dir.name + "-cv")


def fold_indices(labels: Sequence[Any] | None, count: int, folds: int, seed: int) -> list[list[int]]:
    """Held-out example indices of each fold: stratified on ``labels`` when given, else plain K-fold."""
    import numpy as np
    from sklearn.model_selection import KFold, StratifiedKFold

    index = np.arange(count)
    if labels is not None:
        keys = [str(label) for label in labels]
        smallest = min(keys.count(k) for k in set(keys))
        if smallest < folds:
            logger.warning(
                "cv: the rarest label has %d examples, fewer than %d folds: some folds will lack it",
                smallest,
                folds,
            )
        splitter: Any = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = splitter.split(index, keys)
    else:
        splits = KFold(n_splits=folds, shuffle=True, random_state=seed).split(index)
    return [sorted(int(i) for i in held_out) for _, held_out in splits]


def run_cv(
    recipe: Recipe,
    folds: int,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> CVResult:
    """Train one run per fold and summarise their metrics."""
    from peftkit import runs
    from peftkit.data import load_raw_datasets
    from peftkit.tasks import TASKS
    from peftkit.training import finetune

    task = TASKS[recipe.task_name]
    raw = load_raw_datasets(recipe.data, task)
    train = raw["train"]
    if folds < 2:
        raise PeftkitError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if folds > len(train):
        raise PeftkitError(f"--folds {folds}: the train split has only {len(train)} examples")
    labels = task.prepare_labels(raw, recipe.task)
    column = task.stratify_column if labels is not None else None  # classification: stratified folds
    stratify = column is not None
    records = _records_with_names(train)
    test = _records_with_names(raw["test"]) if "test" in raw else None
    held_out = fold_indices(
        [r[column] for r in records] if column is not None else None,
        len(records),
        folds,
        recipe.data.seed,
    )

    cv_dir = (Path(out_dir) if out_dir else cv_dir_for(recipe)).resolve()
    with output_lock(cv_dir):  # one live writer per cv folder
        if overwrite and cv_dir.exists():
            # only a folder a cv wrote (a summary, or a first fold's run record) is replaced
            check_output_dir(
                cv_dir,
                True,
                markers=(CV_SUMMARY, f"fold-1/{runs.RUN_META}"),
                inputs=runs.recipe_inputs(recipe),
            )
            shutil.rmtree(cv_dir)
        cv_dir.mkdir(parents=True, exist_ok=True)
        fold_dirs: list[Path] = []
        fold_metrics: list[dict[str, Any]] = []
        for k, validation_rows in enumerate(held_out, start=1):
            run_dir = cv_dir / f"fold-{k}"
            data_dir = cv_dir / "data" / f"fold-{k}"
            in_fold = set(validation_rows)
            files = {
                "train_file": _write_jsonl(
                    data_dir / "train.jsonl", [r for i, r in enumerate(records) if i not in in_fold]
                ),
                "validation_file": _write_jsonl(
                    data_dir / "validation.jsonl", [records[i] for i in validation_rows]
                ),
            }
            if test is not None:
                files["test_file"] = _write_jsonl(data_dir / "test.jsonl", test)
            fold_recipe = _fold_recipe(recipe, files, labels, run_dir, k)
            done = _completed_metrics(run_dir, fold_recipe)
            if done is not None:
                logger.info("cv: fold %d of %d finished before; keeping %s", k, folds, run_dir)
                metrics = done
            else:
                logger.info("cv: fold %d of %d (%d validation examples)", k, folds, len(validation_rows))
                metrics = finetune(fold_recipe, overwrite=True).metrics
            fold_dirs.append(run_dir)
            fold_metrics.append(metrics)
        summary = {
            "folds": folds,
            "stratified": stratify,
            "recipe_source": recipe.source,
            "fold_dirs": [str(d) for d in fold_dirs],
            "metrics": summarize(fold_metrics),
        }
        runs.write_json_atomic(cv_dir / CV_SUMMARY, summary)
        return CVResult(cv_dir=cv_dir, fold_dirs=fold_dirs, summary=summary)


def _records_with_names(dataset: Any) -> list[dict[str, Any]]:
    """Rows as plain records, ClassLabel ids turned back into names (the fold files hold names)."""
    from datasets import ClassLabel, Sequence

    rows = dataset.to_list()
    for column, feature in dataset.features.items():
        names: Any = None
        if isinstance(feature, ClassLabel):
            names = feature.names
            for row in rows:
                row[column] = names[row[column]] if isinstance(row[column], int) else row[column]
        elif isinstance(feature, Sequence) and isinstance(feature.feature, ClassLabel):
            names = feature.feature.names
            for row in rows:
                row[column] = [names[v] if isinstance(v, int) else v for v in row[column]]
        elif isinstance(feature, list) and feature and isinstance(feature[0], ClassLabel):
            names = feature[0].names
            for row in rows:
                row[column] = [names[v] if isinstance(v, int) else v for v in row[column]]
    return rows


def _write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> str:
    from peftkit import runs

    runs.write_jsonl_atomic(path, [dict(r) for r in records])
    return str(path)


# [data] keys about how the recipe's own data is read: the fold files (already read with them) replace them
_SOURCE_KEYS = ("dataset", "config", "revision", "splits", "columns", "format")


def _fold_recipe(
    recipe: Recipe, files: dict[str, str], labels: Sequence[str] | None, run_dir: Path, fold: int
) -> Recipe:
    """The recipe with this fold's files (canonical column names, so no column mapping) and run dir."""
    data = recipe.to_dict()
    data.pop("sweep", None)
    data["data"] = {
        **{k: v for k, v in data["data"].items() if k not in _SOURCE_KEYS},
        "train_file": None,
        "validation_file": None,
        "test_file": None,
        "max_train_samples": None,  # the folds are already the sample
        "format": "json",
        **files,
    }
    if labels is not None and "label_list" in type(recipe.task).model_fields:
        data["task"]["label_list"] = list(labels)
        data["task"].pop("num_labels", None)
    data["train"]["output_dir"] = str(run_dir)
    clean = _without_none(data)
    return recipe_from_dict(clean, source=recipe.source, name=f"{recipe.name}-fold-{fold}", check_files=True)


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def _completed_metrics(run_dir: Path, recipe: Recipe) -> dict[str, Any] | None:
    """The fold's metrics when it finished before with the same recipe, else None."""
    from peftkit import runs

    completed = runs.read_completed(run_dir)
    if completed is None:
        return None
    meta, metrics = completed
    same = json.loads(json.dumps(recipe.to_dict(), default=str)) == meta.get("recipe")
    return metrics if same else None


def flatten_numbers(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a metrics.json object, keyed by dotted path (booleans and None left out)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_numbers(value, f"{path}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[path] = float(value)
    return flat


def summarize(fold_metrics: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean, sample std (n-1), min, max and count of every numeric metric found in any fold."""
    flats = [flatten_numbers(m) for m in fold_metrics]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    summary: dict[str, dict[str, Any]] = {}
    for key in keys:
        values = [flat[key] for flat in flats if key in flat]
        mean = math.fsum(values) / len(values)
        std = (
            math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))
            if len(values) > 1
            else 0.0
        )
        summary[key] = {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}
    return summary
