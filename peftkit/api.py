"""The public Python API: what each ``peftkit`` command does, as one function (``peftkit.<name>``).

Functions that start from a recipe take its path (``overrides`` as ``--set`` takes them) or a loaded
:class:`~peftkit.recipe.Recipe`; those that start from a trained run take its directory. Each calls the
library function the CLI command calls, so the two cannot drift apart. Heavy imports wait for the call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.recipe import Recipe, load_recipe

if TYPE_CHECKING:
    from peftkit.combine import CombineResult
    from peftkit.export import ExportResult
    from peftkit.merge import MergeResult
    from peftkit.plan import MemoryPlan
    from peftkit.training import RunResult

RecipeSource = str | os.PathLike[str] | Recipe
RunDir = str | os.PathLike[str]  # a folder (or, for predict's records, a file) by its path

__all__ = ["evaluate", "export", "finetune", "load_recipe", "merge", "merge_adapters", "plan", "predict"]


def as_recipe(recipe: RecipeSource, overrides: Sequence[str] = ()) -> Recipe:
    """A Recipe as given, or loaded (and validated) from its TOML path with ``overrides`` applied."""
    if isinstance(recipe, Recipe):
        if overrides:
            raise TypeError("overrides apply to a recipe path; pass the overrides to load_recipe instead")
        return recipe
    return load_recipe(recipe, overrides)


def finetune(
    recipe: RecipeSource,
    *,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
) -> RunResult:
    """``peftkit finetune``: train the recipe's adapter and write its run directory."""
    from peftkit.training import finetune as run_finetune

    return run_finetune(as_recipe(recipe, overrides), overwrite=overwrite, resume=resume, callbacks=callbacks)


def evaluate(run_dir: RunDir, split: str = "test", *, trust_remote_code: bool = False) -> dict[str, float]:
    """``peftkit evaluate``: a trained run's metrics on a split of its recipe's data.

    ``trust_remote_code``: honour ``model.trust_remote_code = true`` recorded in the run (refused without)."""
    from peftkit.evaluation import evaluate_run

    return evaluate_run(run_dir, split, trust_remote_code=trust_remote_code)


def predict(
    run_dir: RunDir,
    records: Sequence[dict[str, Any]] | str | os.PathLike[str],
    *,
    trust_remote_code: bool = False,
) -> list[dict[str, Any]]:
    """``peftkit predict``: one result per record (a list of dicts, or a JSONL/JSON/CSV/text file).

    Records name their fields as the task does (``text`` for seq_cls) or as the recipe's [data] columns map.
    """
    from peftkit.data import read_records, rename_records
    from peftkit.runs import load_run

    rows = read_records(Path(records)) if isinstance(records, (str, os.PathLike)) else list(records)
    loaded = load_run(run_dir, trust_remote_code=trust_remote_code)
    rows = rename_records(rows, loaded.recipe.data.columns)
    return list(loaded.task.predict(loaded.model, loaded.ctx, rows))


def merge(run_dir: RunDir, out: str | os.PathLike[str], **options: Any) -> MergeResult:
    """``peftkit merge``: the run's adapter merged into full weights at ``out``, verified against it.

    ``options``: dtype, max_shard_size, checkpoint, overwrite, samples, tolerance (as the command's flags).
    """
    from peftkit.merge import merge_run

    return merge_run(run_dir, out, **options)


def merge_adapters(run_dirs: Sequence[RunDir], out: str | os.PathLike[str], **options: Any) -> CombineResult:
    """``peftkit merge-adapters``: several LoRA runs combined into one new run directory at ``out``.

    ``options``: method, weights, density, svd_rank, overwrite, seed (as the command's flags).
    """
    from peftkit.combine import merge_adapters as combine

    return combine(run_dirs, out, **options)


def export(source: RunDir, out: str | os.PathLike[str], **options: Any) -> ExportResult:
    """``peftkit export``: a deployable bundle from a run directory (merged first) or a merged folder.

    ``options``: formats, dtype, max_shard_size, overwrite, samples, tolerance (as the command's flags).
    """
    from peftkit.export import export_bundle

    return export_bundle(source, out, **options)


def plan(
    recipe: RecipeSource,
    *,
    overrides: Sequence[str] = (),
    seq_len: int | None = None,
    device: str | None = None,
) -> MemoryPlan:
    """``peftkit plan``: the memory training the recipe needs, estimated without loading weights.

    ``device`` ("cpu" or "cuda") picks the activation model; default: cuda when available."""
    from peftkit.plan import plan_recipe

    return plan_recipe(as_recipe(recipe, overrides), seq_len=seq_len, device=device)
