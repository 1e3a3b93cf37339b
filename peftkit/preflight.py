"""The checks of a valid recipe against the libraries and the model's structure, before any weight is loaded.

The recipe layer checks each value on its own; some mistakes only show against the objects built from it:
the task's ``TrainingArguments`` (its ``__post_init__`` rules), the peft config class, and the base model's
modules (``target_modules`` / ``layers_to_transform`` that match nothing, ``max_length`` past the position
embeddings). :func:`check_recipe` builds those from the recipe, the model on the meta device (as
``peftkit plan`` does: config only, no weights), and raises one :class:`RecipeError` with every problem;
``peftkit validate`` and ``finetune`` both run it, so a run never fails on them after the model loaded.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from peftkit.errors import ModelLoadError, Problem, RecipeError
from peftkit.recipe import Recipe, uses_bitsandbytes
from peftkit.tasks import TASKS
from peftkit.tasks.base import Task

# peft's default ``layers_pattern`` names (peft.utils.constants.COMMON_LAYERS_PATTERN) around a layer index
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|block|blocks|layer)\.(\d+)(?:\.|$)")
POSITION_EMBEDDINGS = ("position_embeddings", "wpe", "embed_positions")


def check_recipe(recipe: Recipe, *, with_training_arguments: bool = True) -> list[str]:
    """Check ``recipe`` against TrainingArguments, peft and the model's structure.

    Returns what was found (lines for ``peftkit validate``: how many modules each target pattern matched);
    raises :class:`RecipeError` with every problem. ``with_training_arguments=False`` leaves the
    TrainingArguments to the caller (``finetune`` builds them once: under a launcher that joins the process
    group), which builds them with :func:`training_arguments`.
    """
    task = TASKS[recipe.task_name]
    problems: list[Problem] = []
    # the model first: TrainingArguments with a ZeRO-3 config make later from_config calls partition weights
    lines = _check_model(recipe, task, problems)
    if with_training_arguments:
        try:
            training_arguments(recipe, task, recipe.output_dir.resolve())
        except RecipeError as exc:
            problems.extend(exc.problems)
    if problems:
        raise RecipeError(recipe.source, problems)
    return lines


def leave_bitsandbytes_unimported(recipe: Recipe) -> None:
    """In validate's own process: keep bitsandbytes unimported when the run uses none of it.

    peft imports bitsandbytes whenever it is installed (``peft/helpers.py``, for quantized layers): about
    2 s of the 9-10 s the model checks took here (docs/recipe-reference.md). The model
    validate builds sits on the meta device and is never quantized, so nothing there needs it. Not for
    ``finetune``: peft caches the library's absence, and a training process may need it later.
    """
    if "bitsandbytes" not in sys.modules and not uses_bitsandbytes(recipe):
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # makes `import bitsandbytes` fail


def training_arguments(recipe: Recipe, task: Task, run_dir: Path) -> Any:
    """:func:`peftkit.trainer.training_arguments`, with the class's own refusals as a :class:`RecipeError`."""
    from peftkit.trainer import training_arguments as build

    try:
        return build(recipe, task, run_dir)
    except ValueError as exc:
        message = str(exc).strip().splitlines()
        text = " ".join(line.strip() for line in message if line.strip()).rstrip(".") or type(exc).__name__
        raise RecipeError(
            recipe.source,
            [Problem(_train_key_named(text, recipe.train), f"TrainingArguments refuses it: {text}", "")],
        ) from None


def _train_key_named(text: str, train: dict[str, Any]) -> str:
    """The [train] key a TrainingArguments message names (``--save_steps`` or a bare field name)."""
    named = re.findall(r"--(\w+)", text)
    for key in [*named, *sorted(train, key=len, reverse=True)]:
        if key in train and re.search(rf"\b{re.escape(key)}\b", text):
            return f"train.{key}"
    return "train"


def _check_model(recipe: Recipe, task: Task, problems: list[Problem]) -> list[str]:
    import torch

    from peftkit.adapters import model_problem
    from peftkit.modeling import load_model_config

    model_section = recipe.model
    try:
        config = load_model_config(model_section)
    except ModelLoadError as exc:
        if Path(model_section.name_or_path).is_absolute():  # a local folder (a Hub id may just be offline)
            problems.append(Problem("model.name_or_path", str(exc).removeprefix("model.name_or_path "), ""))
            return []
        return [f"# model checks skipped: {exc}"]
    if "gguf" in recipe.export.formats:
        from peftkit.gguf_export import gguf_model_problem

        if (gguf := gguf_model_problem(task.name, config)) is not None:
            problems.append(Problem("export.formats", gguf, ""))
    # what only the architecture tells (prefix tuning or EVA on an encoder-decoder, ...)
    refused = model_problem(recipe.adapter, task.name, config)
    if refused is not None:
        problems.append(Problem("adapter.method", *refused))
        return []
    kwargs = {}
    if model_section.attn_implementation:
        kwargs["attn_implementation"] = model_section.attn_implementation
    try:
        with torch.device("meta"):
            model = task.model_class(config).from_config(config, **kwargs)
    except (ValueError, ImportError) as exc:
        if not kwargs:
            return [f"# model checks skipped: the model cannot be built from its config ({_first_line(exc)})"]
        problems.append(
            Problem(
                "model.attn_implementation",
                f"{model_section.attn_implementation!r} cannot be used with this model: {_first_line(exc)}",
                "use 'sdpa' (the default) or 'eager'",
            )
        )
        return []
    _check_lengths(recipe, model, problems)
    return _check_adapter(recipe, task, model, config, problems)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def position_limit(model: Any) -> tuple[int, str] | None:
    """(positions, module name) of the model's smallest learned position embedding; None for relative
    or rotary positions (no fixed limit)."""
    import torch

    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_EMBEDDINGS:
            offset = getattr(module, "offset", 0)  # BART-style learned positions start at an offset
            if module.padding_idx is not None:  # RoBERTa-style positions count from padding_idx + 1
                offset = module.padding_idx + 1
            found.append((module.num_embeddings - offset, name))
    return min(found) if found else None


def _check_lengths(recipe: Recipe, model: Any, problems: list[Problem]) -> None:
    limit = position_limit(model)
    if limit is None:
        return
    positions, name = limit
    keys = ("max_source_length", "max_target_length") if recipe.task_name == "seq2seq" else ("max_length",)
    for key in keys:
        value = getattr(recipe.task, key, None)
        if isinstance(value, int) and value > positions:
            problems.append(
                Problem(
                    f"task.{key}",
                    f"{value} tokens is more than the model's {positions} positions ({name})",
                    f"use {key} = {positions} or less",
                )
            )


def _check_adapter(
    recipe: Recipe, task: Task, model: Any, model_config: Any, problems: list[Problem]
) -> list[str]:
    """Build the peft config and wrap the meta model with it; count what each target pattern matched."""
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    from peftkit.adapters import build_peft_config, meta_adapter_options

    options = recipe.adapter
    names = [name for name, _ in model.named_modules() if name]
    before = len(problems)
    layers = options.get("layers_to_transform")
    if layers is not None:
        indexes = {int(m.group(1)) for name in names if (m := LAYER_INDEX.search(name))}
        count = max(indexes) + 1 if indexes else 0
        wanted = [layers] if isinstance(layers, int) else list(layers)
        missing = [i for i in wanted if i >= count]
        if missing:
            problems.append(
                Problem(
                    "adapter.layers_to_transform",
                    f"layer {', '.join(map(str, missing))} does not exist: the model has {count} layers"
                    + (f" (0 to {count - 1})" if count else ""),
                    f"use indexes from 0 to {count - 1}, or remove it to adapt every layer"
                    if count
                    else "remove it",
                )
            )
    targets = options.get("target_modules")
    counts: dict[str, int] = {}
    if isinstance(targets, list):
        counts = {t: sum(name == t or name.endswith(f".{t}") for name in names) for t in targets}
        if counts and not any(counts.values()):
            problems.append(
                Problem(
                    "adapter.target_modules",
                    f"{targets!r} match no module of this {model_config.model_type} model",
                    f"name its layers, e.g. {_linear_leaf_names(model, task.head_modules)}, or remove "
                    "target_modules for the method's default",
                )
            )
    if len(problems) > before:
        return []
    try:
        # data- and weight-dependent inits (PiSSA, EVA ...) cannot run on meta tensors; same shapes
        peft_config = build_peft_config(meta_adapter_options(options), task, model, model_config)
        adapted = get_peft_model(model, peft_config)
    except (ValueError, TypeError) as exc:
        text = _first_line(exc)
        if "target" in text.lower():
            fix = f"name the model's layers, e.g. {_linear_leaf_names(model, task.head_modules)}"
            problems.append(Problem("adapter.target_modules", f"peft refuses it: {text}", fix))
        else:
            problems.append(Problem("adapter", f"peft refuses it: {text}", ""))
        return []
    wrapped = [name for name, module in adapted.named_modules() if isinstance(module, BaseTunerLayer)]
    # what peft wrapped, by pattern (a module also matched by modules_to_save, a task head, is not wrapped)
    counts = {t: sum(name.endswith(f".{t}") for name in wrapped) for t in counts}
    method = options["method"]
    if not wrapped:
        return [f"# adapter: {method}, {_count(adapted, 'virtual token')}"] if not counts else []
    leaves = sorted({name.rsplit(".", 1)[-1] for name in wrapped})
    if counts:
        shown = ", ".join(f"{t!r} matched {n}" for t, n in counts.items())
    elif isinstance(targets, str):
        shown = f"{targets!r} matched {len(wrapped)}"
    else:
        shown = f"the method's default for {model_config.model_type}: {leaves}"
    return [
        f"# adapter.target_modules: {shown}",
        f"# adapter: {method} adapts {len(wrapped)} modules ({', '.join(leaves)})",
    ]


def _count(model: Any, what: str) -> str:
    config = getattr(model, "peft_config", {}).get("default")
    tokens = getattr(config, "num_virtual_tokens", None)
    return f"{tokens} {what}s" if tokens is not None else "no wrapped modules"


def _linear_leaf_names(model: Any, heads: tuple[str, ...], limit: int = 12) -> list[str]:
    """The model's linear layer names (task heads left out: they are trained in full, not adapted)."""
    import torch

    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(leaves - set(heads))[:limit]
