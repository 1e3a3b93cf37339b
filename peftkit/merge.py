"""Merging adapters: into full weights (``merge_run``, verified) and several adapters into one.

``merge_run`` needs nothing but a run directory. It loads the base model named in the run's resolved recipe
in float32 (a QLoRA run gets a freshly loaded *unquantized* base: merging into 4-bit weights is lossy, see
STACK-NOTES), applies the adapter, records the adapter model's outputs on a sample of the run's validation
data, merges (``merge_and_unload``), casts to the requested dtype at the end, saves safetensors with the
tokenizer, labels and a model card, reloads the saved model fresh from disk in the task's ``AutoModelFor*``
class and compares. Everything is written to a hidden folder beside the output and renamed into place only
when the comparison passes, so an interrupted or failed merge never leaves a folder that looks complete.

``merge_adapters`` combines LoRA adapters of several runs of the same base model, task and labels with peft's
``add_weighted_adapter``. peft refuses adapters that carry ``modules_to_save`` (the task heads), so peftkit
loads the LoRA matrices without them, combines those with peft, and merges the heads itself: a weighted mean
with the given weights normalised to sum to 1. The result is a run directory (``PeftModel.from_pretrained``
and ``peftkit predict`` load it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import re
import resource
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit import runs
from peftkit.adapters import METHODS
from peftkit.errors import MergeError, MergeVerificationError, RunDirError
from peftkit.modeling import drop_gguf_marker

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
# fp32 merges must reproduce the adapter model to this absolute logit difference, with every prediction equal.
FP32_TOLERANCE = 1e-4
# A half-precision file rounds every weight to 8 (bfloat16) or 11 (float16) significant bits, which may flip
# predictions that were near ties; below this agreement the file is refused as not faithful to the adapter.
HALF_MIN_AGREEMENT = 0.99
DEFAULT_SAMPLES = 32
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "decoder_input_ids",
    "decoder_attention_mask",
)
OUTPUT_KEYS = ("logits", "start_logits", "end_logits")
SPAN_KEYS = ("start_logits", "end_logits")
# Files that mark a folder as something peftkit wrote, so --overwrite may replace it.
OUTPUT_MARKERS = ("merge_report.json", "peftkit_export.json", runs.RUN_META)
MERGE_REPORT = "merge_report.json"
PIPELINE_TASKS = {
    "seq_cls": "text-classification",
    "token_cls": "token-classification",
    "qa": None,  # transformers 5 has no question-answering pipeline
    "seq2seq": "text-generation",  # decoder-only; encoder-decoder models have no pipeline in transformers 5
}


# --------------------------------------------------------------------------------------------------
# Output folders: refuse to clobber, stage, rename into place


def check_output_dir(out: Path, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
    """Refuse an output that exists (unless ``overwrite``), is a file, or would swallow an input folder.

    ``--overwrite`` replaces only folders peftkit wrote (they hold one of OUTPUT_MARKERS) or empty ones, so a
    mistyped ``--out ~`` cannot delete a home folder.
    """
    target = out.resolve()
    for folder in inputs:
        source = folder.resolve()
        if target == source or target in source.parents:
            raise MergeError(
                f"--out {out}: that would replace {folder}, an input of this command; "
                "choose a folder outside it"
            )
    if not out.exists():
        return
    if not out.is_dir():
        raise MergeError(f"--out {out}: exists and is a file; choose another --out")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise RunDirError(
            f"{out}: already exists. Nothing was changed. Use --overwrite to replace it, "
            "or choose another --out"
        )
    if not any((out / marker).is_file() for marker in OUTPUT_MARKERS):
        raise MergeError(
            f"{out}: exists and was not written by peftkit (no {' / '.join(OUTPUT_MARKERS)}); --overwrite "
            "only replaces peftkit outputs. Remove it yourself or choose another --out"
        )


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """A hidden folder beside ``out``; renamed to ``out`` when the block succeeds, deleted when it fails.

    A merge killed midway leaves only ``.<name>.partial-*``, never a half-written model at ``out``.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        # files written through temporary files are private (0600); a model folder is meant to be shared
        file_mode = stage.stat().st_mode & 0o666
        for path in stage.rglob("*"):
            if path.is_file():
                path.chmod(file_mode)
        check_output_dir(out, overwrite)  # again: something may have appeared there meanwhile
        if out.exists():
            replaced = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
            os.replace(out, replaced)
            os.replace(stage, out)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


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
                f"{run_dir}: --checkpoint best, but neither metrics.json nor trainer_state.json records a "
                "best checkpoint (evaluation was off?); "
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
# Loading the adapter model (always in float32)


def load_adapter_model(run_dir: Path, adapter_dir: Path | None) -> runs.LoadedRun:
    """Like :func:`runs.load_run`, but the base is loaded in float32 whatever the recipe's dtype.

    Merging is exact only in full precision; a half-precision result is cast from the float32 merge at the
    end.
    Labels come from labels.json, or, for a checkpoint of a run that never finished (labels.json is written at
    the end), from the recipe's training data, which is how finetune found them.
    """
    from peft import PeftModel

    from peftkit.modeling import load_model, load_model_config, load_tokenizer
    from peftkit.recipe import load_resolved_recipe
    from peftkit.tasks import TASKS
    from peftkit.tasks.base import TaskContext

    meta = runs.check_complete(run_dir, adapter_dir)
    recipe = load_resolved_recipe(run_dir)
    task = TASKS[recipe.task_name]
    folder = adapter_dir or run_dir
    tokenizer_source = folder if (folder / "tokenizer_config.json").is_file() else run_dir
    tokenizer = load_tokenizer(recipe.model, source=str(tokenizer_source))
    model_config = load_model_config(recipe.model)
    labels = _run_labels(run_dir, recipe, task)
    ctx = TaskContext(cfg=recipe.task, tokenizer=tokenizer, labels=labels, model_config=model_config)
    section = recipe.model.model_copy(update={"dtype": "float32"})
    base = load_model(section, task, ctx, quant=None)
    try:
        model = PeftModel.from_pretrained(base, str(folder))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunDirError(f"{folder}: the adapter cannot be loaded ({first}); re-run finetune") from None
    model.eval()
    return runs.LoadedRun(run_dir=run_dir, recipe=recipe, task=task, ctx=ctx, model=model, meta=meta)


def _run_labels(run_dir: Path, recipe: Any, task: Any) -> tuple[str, ...] | None:
    labels_path = run_dir / runs.LABELS
    if labels_path.is_file():
        data = runs.read_json(labels_path)
        return tuple(data["labels"]) if data.get("labels") is not None else None
    from peftkit.data import load_raw_datasets

    logger.info("%s has no labels.json (unfinished run): reading the labels from the training data", run_dir)
    raw = load_raw_datasets(recipe.data, task.columns)
    return task.prepare_labels(raw, recipe.task)


# --------------------------------------------------------------------------------------------------
# The verification sample and output comparison


@dataclass
class Sample:
    """Collated model inputs for verification, and where they came from."""

    batches: list[dict[str, Any]]
    description: dict[str, Any]


def verification_sample(
    recipe: Any, task: Any, ctx: Any, model: Any, samples: int, split: str = "validation", batch_size: int = 8
) -> Sample:
    """The first ``samples`` examples of a split of the run's data, through the task's preprocess, collated.

    When the data cannot be read any more (moved, deleted, a Hub dataset offline), seeded random token ids
    stand in, with a warning: they still show whether the merged weights compute what the adapter computed.
    """
    from peftkit.data import load_raw_datasets
    from peftkit.errors import DataError

    collate = task.collator(ctx, model)  # also writes a seq2seq task's generation settings into the model
    try:
        raw = load_raw_datasets(recipe.data, task.columns)
    except (DataError, OSError, ValueError) as exc:
        logger.warning("verification uses random token ids: the run's data cannot be read (%s)", exc)
        return _random_sample(ctx, model, samples, batch_size, reason=str(exc))
    chosen = split if split in raw else "validation"
    examples = raw[chosen].select(range(min(samples, len(raw[chosen]))))
    features = task.preprocess(examples.to_dict(), ctx, False)
    count = len(features["input_ids"])
    rows = [{key: values[i] for key, values in features.items()} for i in range(count)]
    batches = [collate(rows[start : start + batch_size]) for start in range(0, count, batch_size)]
    return Sample(
        batches=batches,
        description={"split": chosen, "examples": len(examples), "features": count, "source": "run data"},
    )


def _random_sample(ctx: Any, model: Any, samples: int, batch_size: int, reason: str) -> Sample:
    import torch

    generator = torch.Generator().manual_seed(0)
    vocab = int(getattr(model.config, "vocab_size", None) or len(ctx.tokenizer))
    special = set(ctx.tokenizer.all_special_ids)
    low = max(special) + 1 if special and max(special) < vocab // 2 else 0
    encoder_decoder = is_encoder_decoder(model)
    batches = []
    for start in range(0, samples, batch_size):
        size = min(batch_size, samples - start)
        ids = torch.randint(low, vocab, (size, 24), generator=generator)
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if encoder_decoder:
            batch["labels"] = torch.randint(low, vocab, (size, 12), generator=generator)
        batches.append(batch)
    return Sample(
        batches=batches,
        description={"split": None, "examples": samples, "features": samples, "source": f"random ({reason})"},
    )


def is_encoder_decoder(model: Any) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def model_inputs(batch: Mapping[str, Any], encoder_decoder: bool) -> dict[str, Any]:
    """The batch's model inputs; labels only for encoder-decoder models (they make the decoder inputs)."""
    keys = (*MODEL_INPUTS, "labels") if encoder_decoder else MODEL_INPUTS
    return {key: batch[key] for key in keys if key in batch}


# Per batch: output name -> (compared values, predictions), both flat CPU tensors.
Summary = dict[str, tuple[Any, Any]]


def summarise_outputs(outputs: Mapping[str, Any], batch: Mapping[str, Any], encoder_decoder: bool) -> Summary:
    """Logits at real (unpadded) positions and the argmax predictions made from them.

    Sequence-level logits (batch, classes) give one prediction per example; token-level logits (batch, tokens,
    classes) one per real token (target tokens for encoder-decoder models); span logits (QA start/end, batch ×
    tokens) one position per feature, chosen among its real tokens.
    """
    import torch

    summary: Summary = {}
    for key in OUTPUT_KEYS:
        value = outputs.get(key) if hasattr(outputs, "get") else None
        if value is None:
            continue
        value = torch.as_tensor(value).detach().float().cpu()
        mask = _position_mask(value, batch, encoder_decoder)
        if value.ndim == 3:
            selected = value[mask] if mask is not None else value.reshape(-1, value.shape[-1])
            summary[key] = (selected.reshape(-1), selected.argmax(-1).reshape(-1))
        elif key in SPAN_KEYS and mask is not None:
            masked = value.masked_fill(~mask, float("-inf"))
            summary[key] = (value[mask].reshape(-1), masked.argmax(-1).reshape(-1))
        else:
            summary[key] = (value.reshape(-1), value.argmax(-1).reshape(-1))
    return summary


def _position_mask(value: Any, batch: Mapping[str, Any], encoder_decoder: bool) -> Any:
    """Which (example, position) entries of a token- or span-level output are real tokens; None if unknown."""
    if value.ndim < 2:
        return None
    import torch

    if encoder_decoder and value.ndim == 3:
        labels = batch.get("labels")
        if labels is not None and tuple(labels.shape) == tuple(value.shape[:2]):
            return torch.as_tensor(labels).cpu() != -100
        return None
    attention = batch.get("attention_mask")
    if attention is not None and tuple(attention.shape) == tuple(value.shape[:2]):
        return torch.as_tensor(attention).cpu().bool()
    return None


def torch_outputs(model: Any, sample: Sample) -> list[Summary]:
    """The model's summarised outputs on every batch of the sample (no gradients, eval mode)."""
    import torch

    encoder_decoder = is_encoder_decoder(model)
    device = next(model.parameters()).device
    model.eval()
    summaries = []
    with torch.no_grad():
        for batch in sample.batches:
            inputs = {k: v.to(device) for k, v in model_inputs(batch, encoder_decoder).items()}
            summaries.append(summarise_outputs(model(**inputs), batch, encoder_decoder))
    return summaries


def compare_outputs(
    reference: Sequence[Summary],
    candidate: Sequence[Summary],
    *,
    name: str,
    description: str,
    tolerance: float | None,
    min_agreement: float,
) -> dict[str, Any]:
    """max/mean |Δ| of the compared values and the share of equal predictions; ``passed`` against the limits.

    ``tolerance`` None means the difference is reported but not judged (half precision).
    """
    import torch

    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference batches but {len(candidate)} candidate batches")
    max_diff = 0.0
    total_diff = 0.0
    values = 0
    agree = 0
    predictions = 0
    largest = 0.0
    for ref_batch, cand_batch in zip(reference, candidate, strict=True):
        if set(ref_batch) != set(cand_batch):
            raise ValueError(f"outputs differ: {sorted(ref_batch)} vs {sorted(cand_batch)}")
        for key, (ref_values, ref_preds) in ref_batch.items():
            cand_values, cand_preds = cand_batch[key]
            if ref_values.shape != cand_values.shape or ref_preds.shape != cand_preds.shape:
                raise ValueError(f"{key}: shapes differ, {ref_values.shape} vs {cand_values.shape}")
            diff = (ref_values - cand_values).abs()
            if diff.numel():
                # a NaN anywhere must fail the check, not vanish in max()
                batch_max = float("nan") if torch.isnan(diff).any() else float(diff.max())
                max_diff = batch_max if math.isnan(batch_max) else max(max_diff, batch_max)
                total_diff += float(diff.nan_to_num(nan=0.0).sum())
                largest = max(largest, float(ref_values.abs().max()))
            values += diff.numel()
            agree += int((ref_preds == cand_preds).sum())
            predictions += ref_preds.numel()
    agreement = agree / predictions if predictions else 1.0
    finite = not math.isnan(max_diff)
    passed = (
        finite
        and (tolerance is None or max_diff <= tolerance)
        and agreement >= min_agreement
        and predictions > 0
    )
    return {
        "name": name,
        "description": description,
        "max_abs_diff": max_diff,
        "mean_abs_diff": total_diff / values if values else 0.0,
        "max_abs_reference": largest,
        "agreement": agreement,
        "predictions_compared": predictions,
        "values_compared": values,
        "tolerance": tolerance,
        "min_agreement": min_agreement,
        "passed": bool(passed),
    }


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
) -> MergeResult:
    """Merge a run's adapter into its base model and save the full model at ``out``, verified.

    ``dtype`` and ``max_shard_size`` default to the recipe's ``[export]`` section. Raises
    :class:`MergeVerificationError` (and writes nothing at ``out``) when the reloaded merged model does not
    reproduce the adapter model on the sample: float32 logits further apart than ``tolerance`` (absolute), or
    any prediction different.
    """
    out_dir = Path(out)
    run_dir, adapter_dir = resolve_adapter(Path(source), checkpoint)
    check_output_dir(out_dir, overwrite, inputs=[run_dir])
    runs.check_complete(run_dir, adapter_dir)  # before any model is loaded
    with staged_output(out_dir, overwrite) as stage:
        report = write_merged(
            run_dir,
            adapter_dir,
            stage,
            dtype=dtype,
            max_shard_size=max_shard_size,
            samples=samples,
            tolerance=tolerance,
        )
    report["out_dir"] = str(out_dir.resolve())
    return MergeResult(out_dir=out_dir, report=report)


def write_merged(
    run_dir: Path,
    adapter_dir: Path | None,
    folder: Path,
    *,
    dtype: str | None = None,
    max_shard_size: str | None = None,
    samples: int = DEFAULT_SAMPLES,
    tolerance: float = FP32_TOLERANCE,
) -> dict[str, Any]:
    """Merge into ``folder`` (an empty staging folder) and verify; returns the merge report.

    Steps: load the float32 adapter model → record its outputs on the sample → ``merge_and_unload`` → (half
    precision: check the float32 merge, then cast) → save → free → reload from disk → compare → write the
    report and the model card. Raises :class:`MergeVerificationError` when a check fails.
    """
    import torch

    from peftkit.export import write_model_card

    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    check_mergeable(adapter_dir or run_dir)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    loaded = load_adapter_model(run_dir, adapter_dir)
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
    merged.save_pretrained(str(folder), max_shard_size=max_shard_size)
    ctx.tokenizer.save_pretrained(str(folder))
    runs.write_json_atomic(
        folder / runs.LABELS,
        {"labels": list(ctx.labels) if ctx.labels is not None else None, "task": task.name},
    )
    model_class = task.model_class(ctx.model_config)
    del merged
    gc.collect()
    timings["save_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    checks.append(_check_saved(folder, model_class, dtype, sample, reference, tolerance))
    timings["verify_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started

    report = _merge_report(loaded, adapter_dir, folder, dtype, max_shard_size, sample, checks, quantized)
    report["warnings"] = warnings
    saved_heads = report["adapter"].get("modules_to_save") or []
    report["adapter"]["modules_to_save"] = sorted({m for m in saved_heads if m in module_names}) or None
    report["timing_s"] = {k: round(v, 3) for k, v in timings.items()}
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    runs.write_json_atomic(folder / MERGE_REPORT, report)
    write_model_card(folder, report, recipe.to_dict(), _read_metrics(run_dir), loaded.meta)
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
    config = runs.read_json(adapter_folder / "adapter_config.json")
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

    from peftkit.modeling import load_model

    try:
        base = load_model(loaded.recipe.model, loaded.task, loaded.ctx, loaded.recipe.quantization)
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


def _merge_report(
    loaded: runs.LoadedRun,
    adapter_dir: Path | None,
    folder: Path,
    dtype: str,
    max_shard_size: str,
    sample: Sample,
    checks: list[dict[str, Any]],
    quantized: dict[str, Any] | None,
) -> dict[str, Any]:
    recipe, task, ctx = loaded.recipe, loaded.task, loaded.ctx
    adapter_config = runs.read_json((adapter_dir or loaded.run_dir) / "adapter_config.json")
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    quant = recipe.quantization
    return {
        "status": "passed" if all(c["passed"] for c in checks) else "failed",
        "task": task.name,
        "model_class": task.model_class(ctx.model_config).__name__,
        "pipeline_task": pipeline_task(task.name, ctx.model_config),
        "source_run": str(loaded.run_dir.resolve()),
        "run_name": loaded.meta.get("name"),
        "checkpoint": adapter_dir.name if adapter_dir is not None else None,
        "base_model": recipe.model.name_or_path,
        "gguf_file": recipe.model.gguf_file,
        "adapter": {
            key: adapter_config.get(key)
            for key in (
                "peft_type",
                "r",
                "lora_alpha",
                "use_rslora",
                "use_dora",
                "target_modules",
                "modules_to_save",
            )
            if key in adapter_config
        },
        "quantization": quant.model_dump() if quant is not None else None,
        "merged_into": (
            f"a freshly loaded unquantized float32 base (the adapter was trained on a {quant.bits}-bit base; "
            "its quantized weights were never merged into)"
            if quant is not None
            else "the float32 base model"
        ),
        "dtype": dtype,
        "merge_dtype": "float32",
        "max_shard_size": max_shard_size,
        "weight_files": weights,
        "sharded": (folder / "model.safetensors.index.json").is_file(),
        "labels": list(ctx.labels) if ctx.labels is not None else None,
        "verification": {"sample": sample.description, "checks": checks, "quantized_adapter": quantized},
        "recipe": recipe.to_dict(),
        "versions": runs.package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def pipeline_task(task_name: str, model_config: Any) -> str | None:
    """The transformers ``pipeline()`` task that runs a merged model of this task, if transformers has one."""
    if task_name == "seq2seq" and getattr(model_config, "is_encoder_decoder", False):
        return None
    return PIPELINE_TASKS.get(task_name)


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
        limit = f" (limit {check['tolerance']:g})" if check["tolerance"] is not None else ""
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


# --------------------------------------------------------------------------------------------------
# Combining several adapters into one


COMBINATIONS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
EQUAL_RANK_COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties")
DENSITY_COMBINATIONS = ("ties", "dare_linear", "dare_ties")


@dataclass
class CombineResult:
    out_dir: Path
    meta: dict[str, Any]


@dataclass
class _Source:
    run_dir: Path
    meta: dict[str, Any]
    recipe: Any
    labels: list[str] | None
    adapter_config: dict[str, Any]
    state: dict[str, Any]  # adapter_model.safetensors tensors


def combine_weights(count: int, weights: Sequence[float] | None) -> list[float]:
    """The per-run weights: as given (one per run, finite, not all zero), default 1/count each (a mean)."""
    if weights is None or len(weights) == 0:
        return [1.0 / count] * count
    if len(weights) != count:
        raise MergeError(f"--weights has {len(weights)} values for {count} runs; give one weight per run")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"--weights {list(weights)}: every weight must be a finite number")
    if all(w == 0 for w in weights):
        raise MergeError("--weights are all zero; the merged adapter would do nothing")
    return [float(w) for w in weights]


def check_density(method: str, density: float | None) -> float | None:
    if method in DENSITY_COMBINATIONS:
        if density is None:
            raise MergeError(
                f"--method {method} needs --density: the fraction of each adapter's entries kept "
                "(e.g. 0.5; TIES and DARE prune the rest)"
            )
        if not 0 < density <= 1:
            raise MergeError(f"--density {density}: must be in (0, 1]")
        return density
    if density is not None:
        raise MergeError(
            f"--density applies to {', '.join(DENSITY_COMBINATIONS)} only, not --method {method}"
        )
    return None


def head_weights(weights: Sequence[float]) -> list[float]:
    """Weights for averaging the task heads: the run weights normalised to sum to 1."""
    total = sum(weights)
    if total <= 0:
        raise MergeError(
            f"--weights {list(weights)} sum to {total:g}; the task heads are averaged with the weights "
            "normalised to sum to 1, which needs a positive sum"
        )
    return [w / total for w in weights]


def is_lora_key(key: str) -> bool:
    return ".lora_" in key


def _load_source(run_dir: Path) -> _Source:
    from safetensors.torch import load_file

    from peftkit.recipe import load_resolved_recipe

    meta = runs.check_complete(run_dir)
    recipe = load_resolved_recipe(run_dir)
    labels_path = run_dir / runs.LABELS
    labels = runs.read_json(labels_path).get("labels") if labels_path.is_file() else None
    adapter_config = runs.read_json(run_dir / "adapter_config.json")
    state = load_file(str(run_dir / "adapter_model.safetensors"))
    return _Source(run_dir, meta, recipe, labels, adapter_config, state)


def check_compatible(sources: Sequence[_Source], method: str) -> None:
    """Same task, labels, base model and LoRA kind for every run; anything else is a clear MergeError."""
    first = sources[0]
    for other in sources[1:]:
        pair = f"{first.run_dir} and {other.run_dir}"
        if other.recipe.task_name != first.recipe.task_name:
            raise MergeError(
                f"{pair}: different tasks ({first.recipe.task_name} vs {other.recipe.task_name}); "
                "only adapters of the same task can be combined"
            )
        if other.labels != first.labels:
            raise MergeError(
                f"{pair}: different labels ({first.labels} vs {other.labels}); the heads would mean "
                "different things. Train them with the same [task] label_list"
            )
        for key in ("name_or_path", "decoder_name_or_path", "gguf_file", "revision"):
            a, b = getattr(first.recipe.model, key), getattr(other.recipe.model, key)
            if a != b:
                raise MergeError(
                    f"{pair}: different base models (model.{key} {a!r} vs {b!r}); adapters only combine on "
                    "the base they were trained on"
                )
        if other.adapter_config.get("task_type") != first.adapter_config.get("task_type"):
            raise MergeError(f"{pair}: different peft task types; they cannot be combined")
        if other.recipe.task != first.recipe.task:
            logger.warning(
                "%s: [task] settings differ; the combined run keeps those of %s", pair, first.run_dir
            )
    for source in sources:
        config = source.adapter_config
        where = source.run_dir / "adapter_config.json"
        if config.get("peft_type") != "LORA":
            raise MergeError(
                f"{where}: a {config.get('peft_type')} adapter; only LoRA adapters can be combined"
            )
        if config.get("use_dora"):
            raise MergeError(f"{where}: a DoRA adapter; peft's add_weighted_adapter cannot combine DoRA")
        if config.get("bias", "none") != "none":
            raise MergeError(f"{where}: trains biases (bias = {config['bias']!r}); these cannot be combined")
        if config.get("target_parameters"):
            raise MergeError(f"{where}: targets parameters directly; these cannot be combined")
    kinds = {type(s.adapter_config.get("target_modules")).__name__ for s in sources}
    if len(kinds) > 1:
        raise MergeError(
            "the runs name target_modules differently (a list in some, a pattern string such as "
            "'all-linear' in others); peft cannot combine those. Train them with the same target_modules"
        )
    ranks = [s.adapter_config.get("r") for s in sources]
    patterned = [s.run_dir for s in sources if s.adapter_config.get("rank_pattern")]
    if method in EQUAL_RANK_COMBINATIONS and len(set(ranks)) > 1 and patterned:
        raise MergeError(
            f"--method {method} needs equal ranks, and {patterned[0]} sets a rank_pattern that cannot be "
            "padded; use --method cat or svd, which accept any ranks"
        )


def merge_adapters(
    sources: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    method: str = "linear",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    svd_rank: int | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> CombineResult:
    """Combine the LoRA adapters of several runs into one new run directory at ``out``.

    LoRA matrices are combined by peft's ``add_weighted_adapter`` with ``method``; methods that need equal
    ranks get the smaller adapters zero-padded to the largest rank first (a padded adapter computes exactly
    the same update). Task heads (``modules_to_save``) are averaged with the weights normalised to sum to 1.
    The metadata records how far the combined update is from the weighted sum of the runs' updates.
    """
    if method not in COMBINATIONS:
        raise MergeError(f"--method {method}: use one of {', '.join(COMBINATIONS)}")
    if len(sources) < 2:
        raise MergeError("merge-adapters needs at least two run directories")
    run_dirs = [Path(s) for s in sources]
    if len({d.resolve() for d in run_dirs}) != len(run_dirs):
        raise MergeError("the same run directory is named twice; name each run once (use --weights to weigh)")
    weights = combine_weights(len(run_dirs), weights)
    density = check_density(method, density)
    out_dir = Path(out)
    check_output_dir(out_dir, overwrite, inputs=run_dirs)
    loaded = [_load_source(d) for d in run_dirs]
    check_compatible(loaded, method)
    head_mix = head_weights(weights) if any(_head_keys(s.state) for s in loaded) else None
    with staged_output(out_dir, overwrite) as stage:
        meta = _write_combined(loaded, stage, out_dir, method, weights, density, svd_rank, head_mix, seed)
    return CombineResult(out_dir=out_dir, meta=meta)


def _head_keys(state: Mapping[str, Any]) -> list[str]:
    return [key for key in state if not is_lora_key(key)]


def _write_combined(
    sources: list[_Source],
    stage: Path,
    out_dir: Path,
    method: str,
    weights: list[float],
    density: float | None,
    svd_rank: int | None,
    head_mix: list[float] | None,
    seed: int,
) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from peftkit.modeling import load_model, load_model_config, load_tokenizer
    from peftkit.tasks import TASKS
    from peftkit.tasks.base import TaskContext

    started = time.perf_counter()
    first = sources[0]
    task = TASKS[first.recipe.task_name]
    tokenizer = load_tokenizer(first.recipe.model, source=str(first.run_dir))
    model_config = load_model_config(first.recipe.model)
    labels = tuple(first.labels) if first.labels is not None else None
    ctx = TaskContext(cfg=first.recipe.task, tokenizer=tokenizer, labels=labels, model_config=model_config)
    base = load_model(first.recipe.model.model_copy(update={"dtype": "float32"}), task, ctx, quant=None)

    # LoRA matrices only: with modules_to_save, add_weighted_adapter refuses (the heads are merged below).
    names = [f"run{i}" for i in range(len(sources))]
    configs = [_lora_only_config(LoraConfig, s.adapter_config) for s in sources]
    model = get_peft_model(base, configs[0], adapter_name=names[0])
    for name, config in zip(names[1:], configs[1:], strict=True):
        model.add_adapter(name, config)
    for name, source in zip(names, sources, strict=True):
        lora_state = {k: v.float() for k, v in source.state.items() if is_lora_key(k)}
        result = set_peft_model_state_dict(model, lora_state, adapter_name=name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if is_lora_key(k)]
        if unexpected:
            raise MergeError(
                f"{source.run_dir / 'adapter_model.safetensors'}: {len(unexpected)} LoRA tensors do not fit "
                f"the base model (e.g. {unexpected[0]}); was it trained on another base?"
            )
    ranks = [int(s.adapter_config["r"]) for s in sources]
    padded = _harmonise_ranks(model, names, ranks) if method in EQUAL_RANK_COMBINATIONS else []

    torch.manual_seed(seed)  # DARE drops entries at random
    model.add_weighted_adapter(
        names,
        list(weights),
        "combined",
        combination_type=method,
        density=density,
        svd_rank=svd_rank if method == "svd" else None,
    )
    # peft gives the new adapter lora_alpha = r, i.e. scaling 1 (sqrt(r) under rslora): the combined matrices
    # already include each run's scaling, so the saved adapter uses plain scaling 1.
    _set_scaling(model, "combined", 1.0)
    fidelity = _task_arithmetic_error(model, names, weights, "combined")

    combined_config = model.peft_config["combined"]
    state = get_peft_model_state_dict(model, adapter_name="combined")
    state = {k: v.detach().float().contiguous() for k, v in state.items()}
    heads = _average_heads(sources, head_mix) if head_mix is not None else {}
    state.update(heads)
    modules_to_save = sorted({m for s in sources for m in (s.adapter_config.get("modules_to_save") or [])})
    out_config = dataclasses.replace(
        combined_config,
        lora_alpha=combined_config.r,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        modules_to_save=modules_to_save or None,
        task_type=first.adapter_config.get("task_type"),
        base_model_name_or_path=first.adapter_config.get("base_model_name_or_path"),
        inference_mode=True,
    )
    out_config.save_pretrained(str(stage))
    save_file(state, str(stage / "adapter_model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(stage))
    shutil.copy2(first.run_dir / "config.json", stage / "config.json")
    runs.write_json_atomic(
        stage / runs.LABELS, {"labels": list(labels) if labels is not None else None, "task": task.name}
    )
    target_modules = out_config.target_modules
    recipe = first.recipe.to_dict()
    recipe["adapter"] = {
        "method": "lora",
        "r": int(out_config.r),
        "lora_alpha": int(out_config.r),
        "target_modules": sorted(target_modules) if not isinstance(target_modules, str) else target_modules,
    }
    recipe["train"]["output_dir"] = str(out_dir.resolve())
    meta = {
        "name": out_dir.name,
        "status": "completed",
        "kind": "merged adapters",
        "recipe": recipe,
        "seed": seed,
        "labels": list(labels or []),
        "merge": {
            "method": method,
            "weights": list(weights),
            "density": density,
            "rank": int(out_config.r),
            "zero_padded_to_rank": max(ranks) if padded else None,
            "padded_runs": [str(sources[i].run_dir.resolve()) for i in padded],
            "heads": (
                {"modules": sorted({k.rsplit(".", 1)[0] for k in heads}), "weights": head_mix}
                if heads
                else None
            ),
            "head_rule": "weighted mean of the runs' modules_to_save tensors (--weights normalised to 1)",
            "task_arithmetic_relative_error": fidelity,
        },
        "merged_from": [
            {
                "run": str(s.run_dir.resolve()),
                "weight": w,
                "r": s.adapter_config.get("r"),
                "lora_alpha": s.adapter_config.get("lora_alpha"),
                "use_rslora": s.adapter_config.get("use_rslora", False),
            }
            for s, w in zip(sources, weights, strict=True)
        ],
        "versions": runs.package_versions(),
        "git_commit": runs.git_commit(Path(__file__).parent),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "error": None,
    }
    runs.write_json_atomic(stage / runs.RUN_META, meta)
    return meta


def _lora_only_config(config_class: Any, adapter_config: Mapping[str, Any]) -> Any:
    """The run's LoraConfig without heads or task type (so peft adds no ModulesToSaveWrapper)."""
    known = {f.name for f in dataclasses.fields(config_class) if f.init}
    fields = {k: v for k, v in adapter_config.items() if k in known}
    fields.update(modules_to_save=None, task_type=None, inference_mode=True)
    return config_class(**fields)


def _lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def _harmonise_ranks(model: Any, names: list[str], ranks: list[int]) -> list[int]:
    """Zero-pad smaller adapters to the largest rank (A gets zero rows, B zero columns; B·A is unchanged).

    Returns the indices of the padded adapters. The layer keeps each adapter's own scaling.
    """
    import torch

    target = max(ranks)
    padded = [i for i, r in enumerate(ranks) if r < target]
    if not padded:
        return []
    for layer in _lora_layers(model):
        for i in padded:
            name = names[i]
            if name in getattr(layer, "lora_embedding_A", {}):
                raise MergeError(
                    "ranks differ and an adapter targets an embedding layer, which peftkit cannot pad; "
                    "use --method cat or svd"
                )
            if name not in layer.lora_A:
                continue
            a, b = layer.lora_A[name], layer.lora_B[name]
            if not isinstance(a, torch.nn.Linear) or not isinstance(b, torch.nn.Linear):
                raise MergeError(
                    f"ranks differ and {type(a).__name__} LoRA layers cannot be padded; "
                    "use --method cat or svd"
                )
            grow = target - a.out_features
            new_a = torch.nn.Linear(a.in_features, target, bias=False, dtype=a.weight.dtype)
            new_b = torch.nn.Linear(target, b.out_features, bias=b.bias is not None, dtype=b.weight.dtype)
            with torch.no_grad():
                new_a.weight.copy_(torch.cat([a.weight, a.weight.new_zeros(grow, a.in_features)], dim=0))
                new_b.weight.copy_(torch.cat([b.weight, b.weight.new_zeros(b.out_features, grow)], dim=1))
                if b.bias is not None:
                    new_b.bias.copy_(b.bias)
            layer.lora_A[name], layer.lora_B[name] = new_a, new_b
            layer.r[name] = target
    for i in padded:
        model.peft_config[names[i]].r = target
    logger.info(
        "ranks %s differ: zero-padded %d adapter(s) to rank %d (their updates are unchanged)",
        ranks,
        len(padded),
        target,
    )
    return padded


def _set_scaling(model: Any, name: str, value: float) -> None:
    for layer in _lora_layers(model):
        if name in layer.scaling:
            layer.scaling[name] = value


def _task_arithmetic_error(model: Any, names: list[str], weights: list[float], combined: str) -> float:
    """‖ΔW_combined − Σ wᵢ ΔWᵢ‖ / ‖Σ wᵢ ΔWᵢ‖ over the LoRA layers: 0 for cat (exact), more otherwise."""
    import torch

    error = reference = 0.0
    with torch.no_grad():
        for layer in _lora_layers(model):
            if combined not in layer.lora_A:
                continue
            target = None
            for name, weight in zip(names, weights, strict=True):
                if name in layer.lora_A:
                    delta = layer.get_delta_weight(name).float() * weight
                    target = delta if target is None else target + delta
            if target is None:
                continue
            got = layer.get_delta_weight(combined).float()
            error += float((got - target).pow(2).sum())
            reference += float(target.pow(2).sum())
    return math.sqrt(error / reference) if reference > 0 else 0.0


def _average_heads(sources: list[_Source], mix: list[float]) -> dict[str, Any]:
    """The weighted mean of every non-LoRA tensor (the modules_to_save heads) across the runs."""
    keys = _head_keys(sources[0].state)
    for source in sources[1:]:
        if sorted(_head_keys(source.state)) != sorted(keys):
            raise MergeError(
                f"{sources[0].run_dir} and {source.run_dir} save different head tensors "
                f"({sorted(keys)} vs {sorted(_head_keys(source.state))}); they cannot be averaged"
            )
    averaged = {}
    for key in keys:
        shapes = {tuple(s.state[key].shape) for s in sources}
        if len(shapes) > 1:
            raise MergeError(f"head tensor {key} has different shapes across runs ({sorted(shapes)})")
        total = sum(s.state[key].float() * w for s, w in zip(sources, mix, strict=True))
        averaged[key] = total.contiguous()
    return averaged
