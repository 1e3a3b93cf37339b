"""The public Python API: what each ``peftkit`` command does, as one function (``peftkit.<name>``).

Functions that start from a recipe take its path (``overrides`` as ``--set`` takes them) or a loaded
:class:`~peftkit.recipe.Recipe`; those that start from a trained run take its directory. Each calls the
library function the CLI command calls, so the two cannot drift apart. Heavy imports wait for the call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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
    source: RunDir,
    records: Sequence[dict[str, Any]] | str | os.PathLike[str],
    *,
    checkpoint: str | None = None,
    batch_size: int | None = None,
    keep_columns: Sequence[str] = (),
    columns: dict[str, str] | None = None,
    trust_remote_code: bool = False,
) -> list[dict[str, Any]]:
    """``peftkit predict``: one result per record (a list of dicts, or a JSONL/JSON/CSV/text file).

    ``source``: a run directory, one of its ``checkpoint-N`` folders, or a merged model folder
    (``checkpoint``: best, last or checkpoint-N of a run, as ``--checkpoint``). Records name their fields as
    the task does (``text`` for seq_cls) or as ``columns`` ({task field: record field}, default: the recipe's
    [data] columns) maps them. Each result starts with the record's ``id`` (when it has one) and the
    ``keep_columns`` fields; a blank line of a JSONL or text file gets ``{"prediction": None, ...}``.
    """
    from peftkit import predicting

    resolved = predicting.resolve_source(source, checkpoint)
    if isinstance(records, (str, os.PathLike)):
        given = predicting.read_input(records)
    else:
        given = predicting.PredictInput("<records>", "json", list(enumerate(records, start=1)))
    keep = predicting.parse_keep(keep_columns)
    rows = predicting.task_records(resolved, given, columns)
    predicting.check_input(resolved, given, rows, keep, columns)
    task, ctx, model = predicting.load_predictor(resolved, trust_remote_code=trust_remote_code)
    originals = [record for _, record in given.records]
    return predicting.predict_records(task, ctx, model, rows, originals, keep, batch_size)


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

    ``options``: formats, gguf_type, dtype, max_shard_size, overwrite, samples, tolerance (as the command's
    flags).
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
