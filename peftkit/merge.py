"""Merging one run's adapter into full weights (``merge_run``), verified against the adapter.

``merge_run`` needs nothing but a run directory. It loads the base model named in the run's resolved recipe
in float32 (a QLoRA run gets a freshly loaded *unquantized* base: merging into 4-bit weights is lossy),
applies the adapter, records the adapter model's outputs on a sample of the run's validation data
(:mod:`peftkit.parity`), merges (``merge_and_unload``), casts to the requested dtype at the
end, saves safetensors with the tokenizer, labels and a model card, reloads the saved model fresh from disk in
the task's ``AutoModelFor*`` class and compares. Everything is written to a hidden folder beside the output
and renamed into place only when the comparison passes (:func:`peftkit.outputs.staged_output`), so an
interrupted or failed merge never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit import runs
from peftkit.adapters import METHODS
from peftkit.errors import MergeError, MergeVerificationError, RunDirError
from peftkit.modeling import drop_gguf_marker
from peftkit.outputs import check_output_dir, output_lock, staged_output, writing
from peftkit.parity import (
    DEFAULT_SAMPLES,
    FP32_TOLERANCE,
    HALF_MIN_AGREEMENT,
    Sample,
    Summary,
    compare_outputs,
    torch_outputs,
    verification_sample,
)

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


# --------------------------------------------------------------------------------------------------
# Which adapter: the run's own, or a checkpoint


def best_checkpoint(run_dir: Path) -> Path | None:
    """The best checkpoint recorded by the run: metrics.json ``best_checkpoint``, else the Trainer's state.

    The recorded path may be absolute from where the run was trained; only its folder name is trusted.
    """
    recorded = None
    metrics_path = run_dir / runs.METRICS
    if metrics_path.is_file():
        metrics = runs.read_json(metrics_path)
        recorded = metrics.get("best_checkpoint") if isinstance(metrics, dict) else None
    if not recorded:
        for checkpoint in runs.list_checkpoints(run_dir):  # newest first
            state_path = checkpoint / runs.TRAINER_STATE
            if state_path.is_file():
                state = runs.read_json(state_path)
                recorded = state.get("best_model_checkpoint") if isinstance(state, dict) else None
                if recorded:
                    break
    return run_dir / Path(recorded).name if recorded else None


def newest_mergeable_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint whose adapter files are whole (optimizer states do not matter for a merge)."""
    for folder in runs.list_checkpoints(run_dir):  # newest first
        try:
            runs.check_adapter_files(folder)
        except RunDirError as exc:
            logger.warning("skipping %s: %s", folder, exc)
            continue
        return folder
    raise MergeError(
        f"{run_dir}: --checkpoint last, but the run has no checkpoint-N folder with a whole adapter"
    )


def resolve_adapter(source: Path, checkpoint: str | None) -> tuple[Path, Path | None]:
    """(run directory, adapter folder or None for the run's own adapter) for a source and ``--checkpoint``.

    ``source`` may be a run directory or one of its ``checkpoint-N`` folders; ``checkpoint`` is ``best``,
    ``last``, ``checkpoint-N`` or a path.
    """
    run_dir, adapter_dir = source, None
    if re.fullmatch(r"checkpoint-\d+", source.name) and (source.parent / runs.RUN_META).is_file():
        run_dir, adapter_dir = source.parent, source
    if checkpoint is None:
        return run_dir, adapter_dir
    if adapter_dir is not None:
        raise MergeError(f"{source} is a checkpoint already; drop --checkpoint {checkpoint}")
    available = sorted((p.name for p in runs.list_checkpoints(run_dir)), key=lambda n: int(n.split("-")[1]))
    if checkpoint == "last":
        return run_dir, newest_mergeable_checkpoint(run_dir)
    if checkpoint == "best":
        best = best_checkpoint(run_dir)
        if best is None:
            raise MergeError(
                f"{run_dir}: --checkpoint best, but neither {runs.METRICS} nor {runs.TRAINER_STATE} records "
                "a best checkpoint (evaluation was off?); "
                f"name one of {available or 'no checkpoints'} or use 'last'"
            )
        if not best.is_dir():
            raise MergeError(
                f"{run_dir}: the best checkpoint {best.name} was deleted (save_total_limit?); "
                f"the run's own adapter is the model kept at the end. Checkpoints left: {available}"
            )
        return run_dir, best
    candidate = Path(checkpoint)
    folder = candidate if candidate.is_dir() else run_dir / checkpoint
    if not folder.is_dir():
        raise MergeError(
            f"--checkpoint {checkpoint}: no such checkpoint in {run_dir}; "
            f"use best, last or one of {available}"
        )
    return run_dir, folder


# --------------------------------------------------------------------------------------------------
# Merging one run into full weights


@dataclass
class MergeResult:
    out_dir: Path
    report: dict[str, Any]


def merge_run(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_shard_size: str | None = None,
    checkpoint: str | None = None,
    overwrite: bool = False,
    samples: int = DEFAULT_SAMPLES,
    tolerance: float = FP32_TOLERANCE,
    trust_remote_code: bool = False,
) -> MergeResult:
    """Merge a run's adapter into its base model and save the full model at ``out``, verified.

    ``dtype`` and ``max_shard_size`` default to the recipe's ``[export]`` section. Raises
    :class:`MergeVerificationError` (and writes nothing at ``out``) when the reloaded merged model does not
    reproduce the adapter model on the sample: float32 logits further apart than
    ``max(tolerance, 1e-5 × their largest |logit|)`` (:data:`peftkit.parity.FP32_RELATIVE_TOLERANCE`), or any
    prediction different.
    """
    out_dir = Path(out)
    with staged_merge(
        Path(source),
        out_dir,
        checkpoint=checkpoint,
        overwrite=overwrite,
        dtype=dtype,
        max_shard_size=max_shard_size,
        samples=samples,
        tolerance=tolerance,
        trust_remote_code=trust_remote_code,
    ) as (_, report):
        pass
    report["out_dir"] = str(out_dir.resolve())
    return MergeResult(out_dir=out_dir, report=report)


@contextlib.contextmanager
def staged_merge(
    source: Path,
    out: Path,
    *,
    checkpoint: str | None = None,
    overwrite: bool = False,
    inputs: Sequence[Path] = (),
    **options: Any,
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Merge the run (or checkpoint) at ``source`` into a staging folder for ``out``, verified.

    Yields (staging folder, merge report) so that a caller (``export``) may add files; the folder becomes
    ``out`` when the block ends without error. ``inputs``: more folders ``out`` must not replace.
    ``options`` go to :func:`write_merged`.
    """
    run_dir, adapter_dir = resolve_adapter(source, checkpoint)
    with output_lock(out):  # one live writer per output folder
        check_output_dir(out, overwrite, markers=runs.OUTPUT_MARKERS, inputs=[*inputs, run_dir])
        runs.check_complete(run_dir, adapter_dir)  # before any model is loaded
        with staged_output(out, overwrite, markers=runs.OUTPUT_MARKERS) as stage:
            yield stage, write_merged(run_dir, adapter_dir, stage, **options)


def write_merged(
    run_dir: Path,
    adapter_dir: Path | None,
    folder: Path,
    *,
    dtype: str | None = None,
    max_shard_size: str | None = None,
    samples: int = DEFAULT_SAMPLES,
    tolerance: float = FP32_TOLERANCE,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Merge into ``folder`` (an empty staging folder) and verify; returns the merge report.

    Steps: load the float32 adapter model → record its outputs on the sample → ``merge_and_unload`` → (half
    precision: check the float32 merge, then cast) → save → free → reload from disk → compare → write the
    report and the model card. Raises :class:`MergeVerificationError` when a check fails.
    """
    import torch

    from peftkit.card import generation_settings, inference_record, write_model_card

    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    check_mergeable(adapter_dir or run_dir)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    # merging is exact only in full precision; a half-precision file is cast from the float32 merge at the end
    # a QLoRA run merges into a freshly loaded unquantized base (its 4/8-bit weights are never merged into)
    loaded = runs.load_run(
        run_dir, adapter_dir, dtype="float32", quantized=False, trust_remote_code=trust_remote_code
    )
    recipe, task, ctx = loaded.recipe, loaded.task, loaded.ctx
    dtype = dtype or recipe.export.dtype
    max_shard_size = max_shard_size or recipe.export.max_shard_size
    timings["load_s"] = time.perf_counter() - started

    mark = time.perf_counter()
    sample = verification_sample(recipe, task, ctx, loaded.model, samples)
    reference = torch_outputs(loaded.model, sample)
    checks: list[dict[str, Any]] = []
    quantized = (
        _compare_with_quantized(loaded, adapter_dir or run_dir, sample, reference)
        if recipe.quantization
        else None
    )
    timings["reference_s"] = time.perf_counter() - mark

    module_names = {name.rsplit(".", 1)[-1] for name, _ in loaded.model.named_modules()}
    warnings = _known_discrepancies(loaded.model, sample)
    mark = time.perf_counter()
    merged = loaded.model.merge_and_unload(safe_merge=True)
    loaded.model = None
    drop_gguf_marker(merged)
    timings["merge_s"] = time.perf_counter() - mark
    if dtype != "float32":
        checks.append(
            compare_outputs(
                reference,
                torch_outputs(merged, sample),
                name="merge",
                description="float32 merged weights (in memory, before the cast) vs the adapter model",
                tolerance=tolerance,
                min_agreement=1.0,
            )
        )
        merged = merged.to(getattr(torch, dtype))

    mark = time.perf_counter()
    with writing(folder):  # a full disk: one message naming the folder
        merged.save_pretrained(str(folder), max_shard_size=max_shard_size)
        ctx.tokenizer.save_pretrained(str(folder))
    runs.write_labels(folder, task.name, ctx.labels)
    model_class = task.model_class(ctx.model_config)
    del merged
    gc.collect()
    timings["save_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    checks.append(_check_saved(folder, model_class, dtype, sample, reference, tolerance))
    timings["verify_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started

    verification = {"sample": sample.description, "checks": checks, "quantized_adapter": quantized}
    report = runs.merge_record(
        loaded, adapter_dir, folder, dtype=dtype, max_shard_size=max_shard_size, verification=verification
    )
    report["warnings"] = warnings
    saved_heads = report["adapter"].get("modules_to_save") or []
    report["adapter"]["modules_to_save"] = sorted({m for m in saved_heads if m in module_names}) or None
    report["timing_s"] = {k: round(v, 3) for k, v in timings.items()}
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    # what the card needs, kept with the folder: a bundle made from it later rewrites the card
    report["inference"] = inference_record(task, ctx, recipe.to_dict())
    report["generation"] = generation_settings(folder)
    report["metrics"] = _read_metrics(run_dir)
    report["run_record"] = {key: loaded.meta.get(key) for key in ("base_model", "data")}
    report["integrity"] = runs.merged_integrity(folder)  # checked when export reads the folder
    runs.write_json_atomic(folder / runs.MERGE_REPORT, report)
    write_model_card(folder, report, recipe.to_dict(), report["metrics"], report["run_record"])
    failed = [check for check in checks if not check["passed"]]
    if failed:
        raise MergeVerificationError(_failure_message(failed, report))
    return report


# peft methods that add virtual tokens instead of changing weights: there is nothing to merge (peftkit's own
# from adapters.METHODS, and two more peft methods peftkit does not train)
PROMPT_LEARNING = {m.peft_type for m in METHODS.values() if not m.mergeable} | {
    "MULTITASK_PROMPT_TUNING",
    "CPT",
}


def check_mergeable(adapter_folder: Path) -> None:
    """Refuse adapters that have no weights to merge (prompt-learning methods), before loading anything."""
    config = runs.read_json(adapter_folder / runs.ADAPTER_CONFIG)
    peft_type = str(config.get("peft_type", "")) if isinstance(config, dict) else ""
    if peft_type in PROMPT_LEARNING:
        raise MergeError(
            f"{adapter_folder}: a {peft_type.lower()} adapter adds learned virtual tokens to every input "
            "instead of changing weights, so it cannot be merged into the model; deploy the run directory "
            "itself (PeftModel.from_pretrained, `peftkit predict`) or train a LoRA adapter"
        )


def _check_saved(
    folder: Path, model_class: Any, dtype: str, sample: Sample, reference: list[Summary], tolerance: float
) -> Any:
    """Reload the saved model fresh from disk in the task's AutoModelFor* class; compare with the adapter."""
    import torch

    # CPUs have no fast half-precision kernels: there the half file is read in float32, which isolates the
    # effect of rounding the weights; on a GPU it runs in its own dtype.
    run_dtype = dtype if torch.cuda.is_available() else "float32"
    reloaded = model_class.from_pretrained(str(folder), dtype=getattr(torch, run_dtype))
    if torch.cuda.is_available() and dtype != "float32":
        reloaded = reloaded.to("cuda")
    candidate = torch_outputs(reloaded, sample)
    del reloaded
    gc.collect()
    if dtype == "float32":
        return compare_outputs(
            reference,
            candidate,
            name="saved",
            description=f"merged model reloaded from disk ({model_class.__name__}, float32) "
            "vs the adapter model",
            tolerance=tolerance,
            min_agreement=1.0,
        )
    return compare_outputs(
        reference,
        candidate,
        name="saved",
        description=f"{dtype} file reloaded from disk ({model_class.__name__}, run in {run_dtype}) vs the "
        "float32 adapter model; differences come from rounding the weights",
        tolerance=None,
        min_agreement=HALF_MIN_AGREEMENT,
    )


def _compare_with_quantized(
    loaded: runs.LoadedRun, adapter_folder: Path, sample: Sample, reference: list[Summary]
) -> dict[str, Any]:
    """How far the QLoRA model as trained (4/8-bit base + adapter) is from the unquantized adapter model.

    Informational: the merged model reproduces the adapter on the *unquantized* base, which is not exactly the
    model that was evaluated during training. The card says how much they differ.
    """
    from peft import PeftModel

    from peftkit.modeling import load_stack

    ctx = loaded.ctx
    try:
        base = load_stack(
            loaded.recipe, ctx.labels, tokenizer=ctx.tokenizer, model_config=ctx.model_config, quantized=True
        ).model
        model = PeftModel.from_pretrained(base, str(adapter_folder))
    except Exception as exc:  # bitsandbytes missing or unsupported here: skip the informational comparison
        logger.warning("could not load the quantized model for comparison (%s)", exc)
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    outputs = torch_outputs(model, sample)
    del model, base
    gc.collect()
    result = compare_outputs(
        reference,
        outputs,
        name="quantized",
        description=f"the adapter on the {loaded.recipe.quantization.bits}-bit base (as trained) vs on the "
        "unquantized base (what was merged)",
        tolerance=None,
        min_agreement=0.0,
    )
    result.pop("passed")
    return result


def _read_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / runs.METRICS
    if not path.is_file():
        return None
    data = runs.read_json(path)
    return data if isinstance(data, dict) else None


def _known_discrepancies(model: Any, sample: Sample) -> list[str]:
    """Upstream behaviours that make an adapter compute something its merged model cannot reproduce."""
    found = []
    # peft 0.21's PeftModelForQuestionAnswering.forward does not pass token_type_ids (nor position_ids) to
    # the base model for LoRA-style adapters: the adapter trained and evaluated with all-zero segment ids,
    # while a merged BERT-style model is given the tokenizer's real ones.
    segments = [b.get("token_type_ids") for b in sample.batches]
    if type(model).__name__ == "PeftModelForQuestionAnswering" and any(
        s is not None and bool(s.any()) for s in segments
    ):
        found.append(
            "peft's PeftModelForQuestionAnswering drops token_type_ids for LoRA adapters, so this adapter "
            "was trained and evaluated with all-zero segment ids; the merged model, given the tokenizer's "
            "segment ids, computes something else. Train QA adapters with a peft task type that passes "
            "them on"
        )
    return found


def _failure_message(failed: list[dict[str, Any]], report: dict[str, Any]) -> str:
    lines = ["the merged model does not reproduce the adapter model; nothing was written to the output:"]
    for check in failed:
        bound = check.get("limit", check["tolerance"])
        limit = f" (limit {bound:g})" if bound is not None else ""
        lines.append(
            f"  {check['name']}: max |Δlogit| = {check['max_abs_diff']:.3g}{limit}, prediction agreement "
            f"{check['agreement']:.4f} (needs {check['min_agreement']:.2f}) over "
            f"{check['predictions_compared']} predictions — {check['description']}"
        )
    rounding = [
        c
        for c in failed
        if c["agreement"] == 1.0 and c["max_abs_diff"] <= 1e-5 * max(c["max_abs_reference"], 1.0)
    ]
    if report.get("warnings"):
        lines += [f"  Known cause: {warning}." for warning in report["warnings"]]
    elif rounding and len(rounding) == len(failed):
        worst = max(c["max_abs_diff"] for c in rounding)
        lines.append(
            "  Every prediction agrees and the difference is within float32 rounding of logits this large "
            f"(up to {max(c['max_abs_reference'] for c in rounding):.3g}), as in deep models: if that is "
            f"acceptable, merge again with --tolerance {worst * 2:.1g}."
        )
    elif report["dtype"] != "float32":
        lines.append("  A half-precision file that disagrees is not faithful: merge with --dtype float32.")
    else:
        lines.append(
            "  A float32 merge should match to ~1e-6: check that the base model named in the recipe is the "
            "one the adapter was trained on (it may have changed on disk or on the Hub)."
        )
    return "\n".join(lines)
