"""Deployable bundles: merged weights (safetensors) and/or ONNX, with tokenizer, labels, model card, manifest.

A bundle is a folder that ``transformers`` loads as it is (``AutoModelFor*.from_pretrained(folder)``, and
``pipeline(task, model=folder)`` where transformers has a pipeline for the task), plus ``model.onnx`` for the
encoder tasks when asked, and ``peftkit_export.json``: what is in it, each file's size and SHA-256, and the
parity figures. The ONNX graph comes from ``torch.onnx.export`` (the torch.export-based exporter) with dynamic
batch and sequence axes, and is checked with ONNX Runtime against PyTorch on the run's test split.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit import runs
from peftkit.adapters import METHODS
from peftkit.errors import ExportError

logger = logging.getLogger(__name__)

FORMATS = ("safetensors", "onnx")
ONNX_TASKS = ("seq_cls", "token_cls", "qa")
ONNX_FILE = "model.onnx"
MANIFEST = "peftkit_export.json"
# ONNX Runtime reorders and fuses float32 arithmetic; its logits stay within this of PyTorch's.
ONNX_TOLERANCE = 1e-3
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
INSTALL_HINT = "pip install 'peftkit[export]' (onnx, onnxscript and onnxruntime)"


# --------------------------------------------------------------------------------------------------
# Model card


TASK_TITLES = {
    "seq_cls": "sequence classification",
    "token_cls": "token classification",
    "qa": "extractive question answering",
    "seq2seq": "text-to-text generation",
}


def write_model_card(
    folder: Path,
    report: Mapping[str, Any],
    recipe: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    meta: Mapping[str, Any],
) -> Path:
    """README.md for a merged model: base model, method, labels, metrics, merge details and checks, recipe."""
    path = folder / "README.md"
    runs.write_text_atomic(path, model_card(report, recipe, metrics, meta))
    return path


def model_card(
    report: Mapping[str, Any],
    recipe: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    meta: Mapping[str, Any],
) -> str:
    task = str(report["task"])
    adapter = dict(report.get("adapter") or {})
    method = _method_name(recipe.get("adapter", {}), adapter)
    base = str(report["base_model"]) + (f" ({report['gguf_file']})" if report.get("gguf_file") else "")
    pipeline_task = report.get("pipeline_task")
    name = report.get("run_name") or Path(str(report["source_run"])).name
    front = ["---", "library_name: transformers", f"base_model: {json.dumps(str(report['base_model']))}"]
    if pipeline_task:
        front.append(f"pipeline_tag: {pipeline_task}")
    front += ["tags:", "- peftkit", f"- {method.split()[0].lower()}", "- merged", "---", ""]
    lines = [
        *front,
        f"# {name} (merged)",
        "",
        f"{base} fine-tuned for {TASK_TITLES.get(task, task)} with {method} by peftkit, with the adapter "
        "merged into the base weights: this folder loads with plain transformers, no peft needed.",
        "",
        "## Use",
        "",
        "```python",
        *_usage(report),
        "```",
        "",
    ]
    labels = report.get("labels")
    if labels:
        lines += ["## Labels", "", "| id | label |", "|---|---|"]
        lines += [f"| {i} | {label} |" for i, label in enumerate(labels[:100])]
        if len(labels) > 100:
            lines.append(f"| … | {len(labels) - 100} more in config.json |")
        lines.append("")
    lines += ["## Training", ""]
    lines += [f"- base model: `{base}`", f"- method: {method}"]
    if adapter.get("target_modules"):
        lines.append(f"- target modules: {', '.join(sorted(adapter['target_modules']))}")
    if adapter.get("modules_to_save"):
        heads = sorted(set(adapter["modules_to_save"]))
        lines.append(f"- trained in full (modules_to_save): {', '.join(heads)}")
    quant = report.get("quantization")
    if quant:
        lines.append(
            f"- QLoRA: the base was loaded in {quant['bits']} bits ({quant.get('quant_type')}) for training"
        )
    data = meta.get("data") or {}
    if data:
        rows = ", ".join(
            f"{split} {info.get('rows')}" for split, info in data.items() if isinstance(info, dict)
        )
        lines.append(f"- data: {rows} examples")
    lines.append("")
    lines += _metrics_table(metrics)
    lines += _merge_section(report)
    lines += ["## Recipe (resolved)", "", "```json", json.dumps(recipe, indent=2, default=str), "```", ""]
    versions = report.get("versions") or {}
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    lines += ["## Versions", "", shown, ""]
    return "\n".join(lines)


def _method_name(recipe_adapter: Mapping[str, Any], adapter: Mapping[str, Any]) -> str:
    kind = str(recipe_adapter.get("method") or adapter.get("peft_type") or "adapter").lower()
    label = METHODS[kind].display_name if kind in METHODS else kind
    if adapter.get("use_dora"):
        label = "DoRA"
    details = []
    if adapter.get("r") is not None:
        details.append(f"r={adapter['r']}")
    if adapter.get("lora_alpha") is not None:
        details.append(f"alpha={adapter['lora_alpha']}")
    if adapter.get("use_rslora"):
        details.append("rsLoRA scaling")
    return f"{label} ({', '.join(details)})" if details else label


def _usage(report: Mapping[str, Any]) -> list[str]:
    folder = '"path/to/this/folder"'
    pipeline_task = report.get("pipeline_task")
    model_class = report.get("model_class", "AutoModel")
    auto_class = {
        "seq_cls": "AutoModelForSequenceClassification",
        "token_cls": "AutoModelForTokenClassification",
        "qa": "AutoModelForQuestionAnswering",
    }.get(str(report["task"]), model_class)
    if report["task"] == "seq2seq":
        auto_class = "AutoModelForCausalLM" if pipeline_task else "AutoModelForSeq2SeqLM"
    lines = []
    if pipeline_task:
        lines += [
            "from transformers import pipeline",
            "",
            f'pipe = pipeline("{pipeline_task}", model={folder})',
            "",
        ]
    lines += [
        f"from transformers import AutoTokenizer, {auto_class}",
        "",
        f"tokenizer = AutoTokenizer.from_pretrained({folder})",
        f"model = {auto_class}.from_pretrained({folder})",
    ]
    if report["task"] == "qa":
        lines.append("# transformers 5 has no question-answering pipeline: `peftkit predict` decodes spans")
    return lines


def _metrics_table(metrics: Mapping[str, Any] | None) -> list[str]:
    if not metrics:
        return []
    skip = ("runtime", "_per_second", "precision_", "recall_", "support_", "steps", "epoch")
    rows = []
    for split in ("validation", "test"):
        values = metrics.get(split)
        if not isinstance(values, dict):
            continue
        shown = {
            k: v for k, v in values.items() if isinstance(v, (int, float)) and not any(s in k for s in skip)
        }
        if shown:
            rows.append((split, shown))
    if not rows:
        return []
    lines = ["## Metrics (the adapter model, as evaluated by the training run)", ""]
    for split, shown in rows:
        lines.append(f"- {split}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))
    lines.append("")
    return lines


def _fmt(value: float) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _merge_section(report: Mapping[str, Any]) -> list[str]:
    verification = report.get("verification") or {}
    sample = verification.get("sample") or {}
    lines = [
        "## Merge",
        "",
        f"- source run: `{report['source_run']}`"
        + (f", checkpoint `{report['checkpoint']}`" if report.get("checkpoint") else ""),
        f"- merged into: {report.get('merged_into')}",
        f"- merged in {report.get('merge_dtype')}, saved as {report.get('dtype')}"
        + (" (cast after merging)" if report.get("dtype") != report.get("merge_dtype") else ""),
        f"- weights: {', '.join(report.get('weight_files') or [])}"
        + (" (sharded, with model.safetensors.index.json)" if report.get("sharded") else ""),
        "",
        "### Verification",
        "",
        f"Sample: {sample.get('examples')} examples ({sample.get('features')} model inputs) of the "
        f"{sample.get('split') or 'random'} split ({sample.get('source')}). Each check compares logits at "
        "real (unpadded) positions and argmax predictions with the adapter model (float32 base + adapter).",
        "",
        "| check | max abs Δlogit | mean abs Δlogit | prediction agreement | predictions | result |",
        "|---|---|---|---|---|---|",
    ]
    for check in verification.get("checks") or []:
        limit = f" (≤ {check['tolerance']:g})" if check.get("tolerance") is not None else ""
        lines.append(
            f"| {check['name']}: {check['description']} | {check['max_abs_diff']:.3g}{limit} | "
            f"{check['mean_abs_diff']:.3g} | {check['agreement']:.4f} | {check['predictions_compared']} | "
            f"{'passed' if check['passed'] else 'FAILED'} |"
        )
    quantized = verification.get("quantized_adapter")
    if quantized and "max_abs_diff" in quantized:
        lines += [
            "",
            f"The QLoRA model as trained ({quantized['description']}): max abs Δlogit "
            f"{quantized['max_abs_diff']:.3g}, prediction agreement {quantized['agreement']:.4f}. The merged "
            "model reproduces the adapter on the unquantized base; merging into the 4-bit weights would be "
            "lossy.",
        ]
    lines.append("")
    return lines


# --------------------------------------------------------------------------------------------------
# Export


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict[str, Any]


def is_merged_dir(folder: Path) -> bool:
    return (folder / "merge_report.json").is_file() and (folder / "config.json").is_file()


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
) -> ExportResult:
    """A deployable bundle at ``out`` from a run directory (merged and verified first) or a merged folder.

    ``formats``: ``safetensors`` (the merged weights) and/or ``onnx`` (``model.onnx``, encoder tasks only);
    default: the recipe's ``[export] formats``. The bundle is staged beside ``out`` and renamed into place
    only when every check passed.
    """
    from peftkit.merge import (
        DEFAULT_SAMPLES,
        FP32_TOLERANCE,
        MergeError,
        check_output_dir,
        resolve_adapter,
        staged_output,
        write_merged,
    )

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
            "merge_report.json); pass the folder `peftkit finetune`, `peftkit merge` or "
            "`peftkit merge-adapters` wrote"
        )
    report = runs.read_json(source_dir / "merge_report.json") if merged_source else None
    recipe_source = Path(report["source_run"]) if report else source_dir
    run_dir, adapter_dir = (recipe_source, None) if report else resolve_adapter(source_dir, None)
    recipe = _load_recipe(run_dir, report)
    chosen = tuple(dict.fromkeys(formats or recipe.export.formats))
    for fmt in chosen:
        if fmt not in FORMATS:
            raise ExportError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    if "onnx" in chosen:
        _check_onnx_possible(recipe.task_name, source_dir)
    check_output_dir(out_dir, overwrite, inputs=[source_dir, run_dir])
    if not merged_source:
        runs.check_complete(run_dir, adapter_dir)
    started = time.perf_counter()
    with staged_output(out_dir, overwrite) as stage:
        if merged_source:
            assert report is not None
            _copy_merged(source_dir, stage, report, dtype)
            report = runs.read_json(stage / "merge_report.json")
        else:
            try:
                report = write_merged(
                    run_dir,
                    adapter_dir,
                    stage,
                    dtype=dtype,
                    max_shard_size=max_shard_size,
                    samples=samples or DEFAULT_SAMPLES,
                    tolerance=tolerance if tolerance is not None else FP32_TOLERANCE,
                )
            except MergeError as exc:
                raise ExportError(str(exc)) from None
        onnx_report = _export_onnx(stage, recipe, report, samples) if "onnx" in chosen else None
        if "safetensors" not in chosen:
            for weights in [*stage.glob("*.safetensors"), stage / "model.safetensors.index.json"]:
                weights.unlink(missing_ok=True)
        if onnx_report is not None:
            _append_onnx_card(stage / "README.md", onnx_report, weights_kept="safetensors" in chosen)
        manifest = _manifest(stage, source_dir, chosen, report, onnx_report, time.perf_counter() - started)
        runs.write_json_atomic(stage / MANIFEST, manifest)
    return ExportResult(out_dir=out_dir, manifest=manifest)


def _load_recipe(run_dir: Path, report: Mapping[str, Any] | None) -> Any:
    """The run's resolved recipe: from the run directory, or the copy a merged folder's report keeps."""
    from peftkit.recipe import load_resolved_recipe, recipe_from_dict

    if report is None:
        return load_resolved_recipe(run_dir)
    raw = {k: v for k, v in report["recipe"].items() if v is not None}
    return recipe_from_dict(raw, source=str(run_dir), base_dir=run_dir, check_files=False)


def _check_onnx_possible(task_name: str, source: Path) -> None:
    """ONNX covers the encoder tasks, and needs the `export` extra installed; else a clear error, at once."""
    if task_name not in ONNX_TASKS:
        raise ExportError(
            f"{source}: --format onnx covers the encoder tasks ({', '.join(ONNX_TASKS)}), not {task_name}; "
            "export generation models with --format safetensors (or optimum's exporter, which handles the "
            "decoding loop and its cache)"
        )
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if not _importable(name)]
    if missing:
        raise ExportError(f"--format onnx needs {', '.join(missing)}: {INSTALL_HINT}")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _copy_merged(source: Path, stage: Path, report: Mapping[str, Any], dtype: str | None) -> None:
    """Copy a merged folder; a float32 one may be re-saved in a half precision on the way."""
    if report.get("status") != "passed":
        raise ExportError(f"{source}: its merge_report.json says the merge did not pass verification")
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
            and item.name
            not in (
                "config.json",
                "model.safetensors.index.json",
            )
        ):
            shutil.copy2(item, stage / item.name)
    updated = dict(report)
    updated["dtype"] = dtype
    updated["recast_from"] = "float32"
    runs.write_json_atomic(stage / "merge_report.json", updated)


def _export_onnx(stage: Path, recipe: Any, report: Mapping[str, Any], samples: int) -> dict[str, Any]:
    """model.onnx from the merged float32 model, checked with ONNX Runtime against PyTorch (test split)."""
    import torch
    from transformers import AutoConfig

    from peftkit.merge import compare_outputs, summarise_outputs, verification_sample
    from peftkit.modeling import load_tokenizer
    from peftkit.tasks import TASKS
    from peftkit.tasks.base import TaskContext

    started = time.perf_counter()
    task = TASKS[str(report["task"])]
    config = AutoConfig.from_pretrained(str(stage))
    model = task.model_class(config).from_pretrained(str(stage), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(recipe.model, source=str(stage))
    labels = tuple(report["labels"]) if report.get("labels") is not None else None
    ctx = TaskContext(cfg=recipe.task, tokenizer=tokenizer, labels=labels, model_config=config)
    sample = verification_sample(recipe, task, ctx, model, samples or 32, split="test")
    example = sample.batches[0]
    names = [name for name in ONNX_INPUTS if name in example]
    output_names = ["start_logits", "end_logits"] if task.name == "qa" else ["logits"]
    path = stage / ONNX_FILE
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


def _append_onnx_card(path: Path, check: Mapping[str, Any], weights_kept: bool) -> None:
    """Add the ONNX file, how to run it, and its parity figures to the bundle's model card."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    inputs = ", ".join(f'"{name}": encoded["{name}"]' for name in check["inputs"])
    section = [
        "## ONNX",
        "",
        f"`{ONNX_FILE}` (opset {check.get('opset')}, inputs {', '.join(check['inputs'])}; outputs "
        f"{', '.join(check['outputs'])}; dynamic batch and sequence axes)."
        + ("" if weights_kept else " This bundle holds no PyTorch weights: the ONNX file carries them."),
        "",
        "```python",
        "import onnxruntime",
        "from transformers import AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        f'session = onnxruntime.InferenceSession("path/to/this/folder/{ONNX_FILE}")',
        'encoded = tokenizer(["some text"], return_tensors="np")',
        f"outputs = session.run(None, {{{inputs}}})",
        "```",
        "",
        f"Parity with PyTorch on {check['sample'].get('examples')} examples of the "
        f"{check['sample'].get('split') or 'random'} split: max abs Δlogit {check['max_abs_diff']:.3g} "
        f"(limit {check['tolerance']:g}), prediction agreement {check['agreement']:.4f} over "
        f"{check['predictions_compared']} predictions.",
        "",
    ]
    runs.write_text_atomic(path, text.rstrip("\n") + "\n\n" + "\n".join(section))


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
    elapsed: float,
) -> dict[str, Any]:
    files = {}
    for item in sorted(p for p in stage.rglob("*") if p.is_file()):
        files[str(item.relative_to(stage))] = {"bytes": item.stat().st_size, "sha256": _sha256(item)}
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
        "files": files,
        "versions": runs.package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_time_s": round(elapsed, 2),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
