"""Deployable bundles: merged weights (safetensors) and/or ONNX, with tokenizer, labels, model card, manifest.

A bundle is a folder that ``transformers`` loads as it is (``AutoModelFor*.from_pretrained(folder)``, and
``pipeline(task, model=folder)`` where transformers has a pipeline for the task), plus ``model.onnx`` for the
encoder tasks when asked, and ``peftkit_export.json``: what is in it, each file's size and SHA-256, and the
parity figures. The ONNX graph comes from ``torch.onnx.export`` (the torch.export-based exporter) with dynamic
batch and sequence axes, and is checked with ONNX Runtime against PyTorch on the run's test split. A GGUF file
(Llama-architecture causal LMs, for llama.cpp) is written and read back by :mod:`peftkit.gguf_export`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit import runs
from peftkit.card import card_inputs, write_model_card
from peftkit.errors import ExportError
from peftkit.integrity import sha256_file
from peftkit.outputs import check_output_dir, output_lock, staged_output, writing
from peftkit.parity import DEFAULT_SAMPLES, FP32_TOLERANCE

logger = logging.getLogger(__name__)

FORMATS = ("safetensors", "onnx", "gguf")
# ONNX Runtime reorders and fuses float32 arithmetic; its logits stay within this of PyTorch's.
ONNX_TOLERANCE = 1e-3
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
INSTALL_HINT = "pip install 'peftkit[export]' (onnx, onnxscript and onnxruntime)"


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict[str, Any]


def is_merged_dir(folder: Path) -> bool:
    return (folder / runs.MERGE_REPORT).is_file() and (folder / runs.MODEL_CONFIG).is_file()


def export_bundle(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    formats: Sequence[str] | None = None,
    dtype: str | None = None,
    max_shard_size: str | None = None,
    overwrite: bool = False,
    samples: int = 32,
    tolerance: float | None = None,
    trust_remote_code: bool = False,
    gguf_type: str | None = None,
) -> ExportResult:
    """A deployable bundle at ``out`` from a run directory (merged and verified first) or a merged folder.

    ``formats``: ``safetensors`` (the merged weights), ``onnx`` (``model.onnx``, encoder tasks only) and/or
    ``gguf`` (``model-<TYPE>.gguf`` of ``gguf_type`` f32, f16 or q8_0, Llama-architecture causal LMs);
    default: the recipe's ``[export] formats``. The bundle is staged beside ``out`` and renamed into place
    only when every check passed.
    """
    source_dir = Path(source)
    out_dir = Path(out)
    merged_source = is_merged_dir(source_dir)
    if (
        not merged_source
        and not (source_dir / runs.RUN_META).is_file()
        and not source_dir.name.startswith("checkpoint-")
    ):
        raise ExportError(
            f"{source_dir}: neither a run directory (no {runs.RUN_META}) nor a merged model (no "
            f"{runs.MERGE_REPORT}); pass the folder `peftkit finetune`, `peftkit merge` or "
            "`peftkit merge-adapters` wrote"
        )
    report = runs.read_json(source_dir / runs.MERGE_REPORT) if merged_source else None
    recipe = _load_recipe(source_dir, report)
    runs.refuse_recorded_remote_code(source_dir, recipe, trust_remote_code)
    if report is not None:
        _check_merged_integrity(source_dir, report)
    chosen = tuple(dict.fromkeys(formats or recipe.export.formats))
    for fmt in chosen:
        if fmt not in FORMATS:
            raise ExportError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    if "onnx" in chosen:
        _check_onnx_possible(recipe.task_name, source_dir)
    if gguf_type is not None and "gguf" not in chosen:
        raise ExportError(f"--gguf-type {gguf_type} needs --format gguf")
    if "gguf" in chosen:
        gguf_type = gguf_type or recipe.export.gguf_type
        _check_gguf_possible(recipe, source_dir, report, gguf_type)
    started = time.perf_counter()
    if "gguf" in chosen and dtype is None and report is None:
        dtype = "float32"  # the GGUF file rounds once, from the exact merge, whatever [export] dtype says
    options = {
        "dtype": dtype,
        "max_shard_size": max_shard_size,
        "samples": samples or DEFAULT_SAMPLES,
        "tolerance": tolerance if tolerance is not None else FP32_TOLERANCE,
    }
    if report is None:
        options["trust_remote_code"] = trust_remote_code
    with (
        output_lock(out_dir),
        writing(out_dir),  # a full disk: one message naming the folder
        _bundle_stage(source_dir, out_dir, report, overwrite, options) as (stage, merged),
    ):
        onnx_report = _export_onnx(stage, recipe, merged, samples) if "onnx" in chosen else None
        gguf_report = (
            _export_gguf(
                stage,
                recipe,
                merged,
                str(gguf_type),
                samples,
                tolerance if tolerance is not None else FP32_TOLERANCE,
            )
            if "gguf" in chosen
            else None
        )
        if "safetensors" not in chosen:
            for weights in [*stage.glob("*.safetensors"), stage / runs.SHARD_INDEX]:
                weights.unlink(missing_ok=True)
        if onnx_report is not None or gguf_report is not None:  # the card shows what it holds, how to run it
            bundle_report = runs.read_json(stage / runs.MERGE_REPORT)
            card_recipe, card_metrics, card_meta = card_inputs(bundle_report)
            write_model_card(
                stage,
                bundle_report,
                card_recipe,
                card_metrics,
                card_meta,
                onnx=onnx_report,
                gguf=gguf_report,
                weights="safetensors" in chosen,
            )
        manifest = _manifest(
            stage, source_dir, chosen, merged, onnx_report, gguf_report, time.perf_counter() - started
        )
        runs.write_json_atomic(stage / runs.EXPORT_MANIFEST, manifest)
    return ExportResult(out_dir=out_dir, manifest=manifest)


@contextlib.contextmanager
def _bundle_stage(
    source: Path, out: Path, report: Mapping[str, Any] | None, overwrite: bool, options: dict[str, Any]
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The bundle's staging folder with the merged model in it, and its merge report.

    A run is merged there by the merge itself (:func:`peftkit.merge.staged_merge`); a merged folder is copied
    (and re-cast when ``--dtype`` asks for a half precision of a float32 merge).
    """
    from peftkit.merge import MergeError, staged_merge

    if report is None:
        try:
            with staged_merge(source, out, overwrite=overwrite, inputs=[source], **options) as staged:
                yield staged
        except MergeError as exc:
            raise ExportError(str(exc)) from None
        return
    run_dir = Path(report["source_run"])
    check_output_dir(out, overwrite, markers=runs.OUTPUT_MARKERS, inputs=[source, run_dir])
    with staged_output(out, overwrite, markers=runs.OUTPUT_MARKERS) as stage:
        _copy_merged(source, stage, report, options["dtype"])
        yield stage, runs.read_json(stage / runs.MERGE_REPORT)


def _check_merged_integrity(source: Path, report: Mapping[str, Any]) -> None:
    """A merged folder's files match its merge_report.json record, and a bundle's its peftkit_export.json
    (exit 2 naming the changed file); folders written by an older peftkit load with a warning."""
    from peftkit.integrity import verify_files

    manifest_path = source / runs.EXPORT_MANIFEST
    if manifest_path.is_file():
        manifest = runs.read_json_object(manifest_path, {"files": dict})
        recorded = {
            name: entry["sha256"]
            for name, entry in manifest["files"].items()
            if isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and name != runs.EXPORT_MANIFEST
        }
        verify_files(source, recorded, manifest_path)  # covers every file of the bundle
        return
    runs.check_integrity(source, dict(report), source / runs.MERGE_REPORT, None)


def _load_recipe(source: Path, report: Mapping[str, Any] | None) -> Any:
    """The run's resolved recipe: from the run directory (a checkpoint's run), or a merged folder's copy."""
    from peftkit.merge import resolve_adapter
    from peftkit.recipe import recipe_from_dict

    if report is None:
        return runs.load_resolved_recipe(resolve_adapter(source, None)[0])
    run_dir = Path(report["source_run"])
    raw = {k: v for k, v in report["recipe"].items() if v is not None}
    return recipe_from_dict(raw, source=str(run_dir), base_dir=run_dir, check_files=False)


def _check_onnx_possible(task_name: str, source: Path) -> None:
    """ONNX covers the encoder tasks, and needs the `export` extra installed; else a clear error, at once."""
    from peftkit.tasks import TASKS

    if not TASKS[task_name].onnx_outputs:
        covered = ", ".join(name for name, task in TASKS.items() if task.onnx_outputs)
        raise ExportError(
            f"{source}: --format onnx covers the encoder tasks ({covered}), not {task_name}; "
            "export generation models with --format safetensors (or optimum's exporter, which handles the "
            "decoding loop and its cache)"
        )
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if not _importable(name)]
    if missing:
        raise ExportError(f"--format onnx needs {', '.join(missing)}: {INSTALL_HINT}")


def _check_gguf_possible(recipe: Any, source: Path, report: Mapping[str, Any] | None, gguf_type: str) -> None:
    """GGUF covers Llama-architecture causal LMs with byte-level BPE tokenizers: refused otherwise, from the
    base model's config and the saved tokenizer, before any weights are loaded."""
    from peftkit.gguf_export import GGUF_TYPES, check_gguf_possible

    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--gguf-type {gguf_type}: use one of {', '.join(GGUF_TYPES)}")
    if report is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(source))
        tokenizer_folder = source
    else:
        from peftkit.merge import resolve_adapter
        from peftkit.modeling import load_model_config

        config = load_model_config(recipe.model)
        tokenizer_folder = resolve_adapter(source, None)[0]
    check_gguf_possible(recipe.task_name, config, tokenizer_folder, source)


def _export_gguf(
    stage: Path, recipe: Any, report: Mapping[str, Any], gguf_type: str, samples: int, tolerance: float
) -> dict[str, Any]:
    from peftkit.gguf_export import write_verified_gguf

    return write_verified_gguf(stage, recipe, report, gguf_type, samples, tolerance)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _copy_merged(source: Path, stage: Path, report: Mapping[str, Any], dtype: str | None) -> None:
    """Copy a merged folder; a float32 one may be re-saved in a half precision on the way."""
    if report.get("status") != "passed":
        raise ExportError(f"{source}: its {runs.MERGE_REPORT} says the merge did not pass verification")
    saved = report.get("dtype", "float32")
    if dtype is None or dtype == saved:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, stage / item.name)
        return
    if saved != "float32":
        raise ExportError(
            f"{source} holds {saved} weights; re-casting them to {dtype} would round twice. Merge the run "
            f"again with `peftkit export <run dir> --dtype {dtype}`"
        )
    import torch
    from transformers import AutoConfig

    from peftkit.tasks import TASKS

    config = AutoConfig.from_pretrained(str(source))
    model_class = TASKS[str(report["task"])].model_class(config)
    model = model_class.from_pretrained(str(source), dtype=torch.float32).to(getattr(torch, dtype))
    model.save_pretrained(str(stage), max_shard_size=report.get("max_shard_size", "2GB"))
    del model
    gc.collect()
    for item in source.iterdir():
        if (
            item.is_file()
            and not item.name.endswith(".safetensors")
            and item.name not in (runs.MODEL_CONFIG, runs.SHARD_INDEX)
        ):
            shutil.copy2(item, stage / item.name)
    updated = dict(report)
    updated["dtype"] = dtype
    updated["recast_from"] = "float32"
    updated["integrity"] = runs.merged_integrity(stage)
    runs.write_json_atomic(stage / runs.MERGE_REPORT, updated)


def _export_onnx(stage: Path, recipe: Any, report: Mapping[str, Any], samples: int) -> dict[str, Any]:
    """model.onnx from the merged float32 model, checked with ONNX Runtime against PyTorch (test split)."""
    import torch
    from transformers import AutoConfig

    from peftkit.modeling import load_stack
    from peftkit.parity import compare_outputs, summarise_outputs, verification_sample

    started = time.perf_counter()
    config = AutoConfig.from_pretrained(str(stage))
    # the merged folder's own tokenizer and config; the weights are the merged ones, loaded below
    stack = load_stack(
        recipe, report.get("labels"), tokenizer_source=stage, model_config=config, with_model=False
    )
    task, ctx = stack.task, stack.ctx
    model = task.model_class(config).from_pretrained(str(stage), dtype=torch.float32).eval()
    sample = verification_sample(recipe, task, ctx, model, samples or DEFAULT_SAMPLES, split="test")
    example = sample.batches[0]
    names = [name for name in ONNX_INPUTS if name in example]
    output_names = list(task.onnx_outputs)
    path = stage / runs.ONNX_FILE
    _torch_onnx_export(model, {name: example[name] for name in names}, names, output_names, path)
    export_s = time.perf_counter() - started

    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference, candidate = [], []
    with torch.no_grad():
        for batch in sample.batches:
            inputs = {name: batch[name] for name in names}
            reference.append(summarise_outputs(model(**inputs), batch, encoder_decoder=False))
            values = session.run(output_names, {name: inputs[name].numpy() for name in names})
            produced = dict(zip(output_names, (torch.from_numpy(v) for v in values), strict=True))
            candidate.append(summarise_outputs(produced, batch, encoder_decoder=False))
    del model
    gc.collect()
    check = compare_outputs(
        reference,
        candidate,
        name="onnx",
        description="ONNX Runtime (CPU) vs PyTorch, both float32, on the merged model",
        tolerance=ONNX_TOLERANCE,
        min_agreement=1.0,
    )
    check["sample"] = sample.description
    check["export_s"] = round(export_s, 2)
    check["opset"] = _onnx_opset(path)
    check["inputs"] = names
    check["outputs"] = output_names
    if not check["passed"]:
        raise ExportError(
            f"ONNX parity failed: max |Δlogit| {check['max_abs_diff']:.3g} (limit {ONNX_TOLERANCE:g}), "
            f"prediction agreement {check['agreement']:.4f} over {check['predictions_compared']} predictions "
            f"of the {sample.description.get('split')} split; nothing was written. Use --format safetensors"
        )
    logger.info("ONNX parity: max |Δlogit| %.3g, agreement %.4f", check["max_abs_diff"], check["agreement"])
    return check


def _torch_onnx_export(
    model: Any, inputs: dict[str, Any], names: list[str], output_names: list[str], path: Path
) -> None:
    """torch.onnx.export (torch.export-based) with dynamic batch and sequence axes, saved with its weights."""
    import warnings

    import torch

    # the exporter specialises a dimension of size 1; examples of 2+ rows and tokens keep both axes dynamic
    if next(iter(inputs.values())).shape[0] < 2:
        inputs = {k: torch.cat([v, v]) for k, v in inputs.items()}
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence")
    dynamic = {name: {0: batch, 1: sequence} for name in names}
    # onnxscript logs every graph rewrite at INFO; keep the console for peftkit's own messages
    # and torch.onnx warns about every torchvision operator it cannot register (torchvision is not needed)
    quieter = {"onnxscript": logging.WARNING, "onnx_ir": logging.WARNING, "torch.onnx": logging.ERROR}
    noisy = [logging.getLogger(name) for name in quieter]
    levels = [logger_.level for logger_ in noisy]
    for logger_, level in zip(noisy, quieter.values(), strict=True):
        logger_.setLevel(level)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's progress and torchvision notices
            program = torch.onnx.export(
                model,
                (),
                kwargs=inputs,
                input_names=names,
                output_names=output_names,
                dynamic_shapes=dynamic,
                dynamo=True,
                verbose=False,
            )
    finally:
        for logger_, level in zip(noisy, levels, strict=True):
            logger_.setLevel(level)
    if program is None:  # pragma: no cover - the dynamo exporter always returns a program
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(path))


def _onnx_opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(op.version) for op in model.opset_import if op.domain in ("", "ai.onnx")), None)


def _manifest(
    stage: Path,
    source: Path,
    formats: Sequence[str],
    report: Mapping[str, Any],
    onnx_report: Mapping[str, Any] | None,
    gguf_report: Mapping[str, Any] | None,
    elapsed: float,
) -> dict[str, Any]:
    files = {}
    for item in sorted(p for p in stage.rglob("*") if p.is_file()):
        files[str(item.relative_to(stage))] = {"bytes": item.stat().st_size, "sha256": sha256_file(item)}
    return {
        "formats": list(formats),
        "source": str(source.resolve()),
        "task": report.get("task"),
        "pipeline_task": report.get("pipeline_task") if "safetensors" in formats else None,
        "model_class": report.get("model_class"),
        "dtype": report.get("dtype"),
        "labels": report.get("labels"),
        "merge_verification": report.get("verification"),
        "onnx": dict(onnx_report) if onnx_report is not None else None,
        "gguf": dict(gguf_report) if gguf_report is not None else None,
        "files": files,
        **runs.stack_record(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_time_s": round(elapsed, 2),
    }
