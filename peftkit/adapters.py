"""``[adapter]`` → a peft config, with target modules inferred and task heads trained and saved."""

from __future__ import annotations

import logging
from typing import Any

from peftkit.recipe import ADAPTER_METHODS
from peftkit.tasks.base import Task

logger = logging.getLogger(__name__)

# Methods that wrap existing linear layers (they take target_modules and modules_to_save).
LAYER_METHODS = {"lora", "adalora", "ia3", "loha", "lokr"}


def present_heads(model: Any, candidates: tuple[str, ...]) -> list[str]:
    """The task head names that exist as (leaf-named) modules of the model."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [head for head in candidates if head in names]


def default_target_modules(method: str, model_config: Any) -> Any:
    """peft's per-architecture defaults for the method (e.g. LoRA on BERT: query/value), else all-linear.

    ``None`` means "let peft choose": IA3 must pick its target and feed-forward modules together
    (feed-forward modules must be a subset of the targets), which peft's own mapping does.
    """
    from peft.utils import constants

    mapping = getattr(constants, f"TRANSFORMERS_MODELS_TO_{method.upper()}_TARGET_MODULES_MAPPING", {})
    model_type = getattr(model_config, "model_type", None)
    if model_type in mapping:
        return None if method == "ia3" else list(mapping[model_type])
    if method == "ia3":
        return None  # peft raises its own clear error for an architecture it has no IA3 defaults for
    return "all-linear"


def build_peft_config(options: dict[str, Any], task: Task, model: Any, model_config: Any) -> Any:
    """The peft config for ``[adapter]``: method class, task type, targets and heads to save."""
    import peft

    options = dict(options)
    method = options.pop("method", "lora")
    cls = getattr(peft, ADAPTER_METHODS[method])
    options["task_type"] = task.peft_task_type(model_config)
    if method in LAYER_METHODS:
        if options.get("target_modules") is None:
            options["target_modules"] = default_target_modules(method, model_config)
        heads = present_heads(model, task.head_modules)
        options["modules_to_save"] = sorted({*heads, *(options.get("modules_to_save") or [])}) or None
    return cls(**options)


def apply_adapter(model: Any, options: dict[str, Any], task: Task, model_config: Any) -> Any:
    """Wrap the base model in a PeftModel; returns it with trainable parameter counts logged."""
    from peft import get_peft_model

    config = build_peft_config(options, task, model, model_config)
    peft_model = get_peft_model(model, config)
    trainable, total = count_parameters(peft_model)
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
    return peft_model


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights counted by their logical size."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", None) or param.numel()  # ZeRO-3 holds a shard; ds_numel is the whole
        if param.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
