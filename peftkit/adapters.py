"""Adapter methods: :data:`METHODS`, what peftkit knows about each; ``[adapter]`` → a peft config.

:data:`METHODS` is the one place that says what a method can do (its peft config class, the tasks it
takes, whether it merges or trains on a quantized base, its display name); the recipe layer, merge,
export and plan read it. Adding a method is a row here (and its tests). This module imports nothing of
peftkit at import time but the task types, so that the recipe layer can read the table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftkit.tasks.base import Task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterMethod:
    """One ``[adapter] method``: its peft names and what peftkit lets it do."""

    name: str  # the recipe's spelling: [adapter] method = "lora"
    peft_config: str  # the peft config class the other [adapter] keys are forwarded to
    peft_type: str  # adapter_config.json's peft_type
    display_name: str  # for model cards and summaries
    # None: every task. Prompt-learning methods prepend virtual tokens: peft supports them for
    # sequence-level heads and generation, not where every input position has its own label or span.
    tasks: frozenset[str] | None = None
    wraps_layers: bool = True  # wraps existing linears: takes target_modules and modules_to_save
    low_rank: bool = False  # LoRA-style A·B matrices: alpha/dropout/rank aliases; plan models them
    mergeable: bool = True  # has weight deltas to merge (prompt learning adds virtual tokens instead)
    quantized_base: bool = True  # trains on a 4/8-bit base ([quantization])


PROMPT_TASKS = frozenset({"seq_cls", "seq2seq"})
METHODS: dict[str, AdapterMethod] = {
    method.name: method
    for method in (
        AdapterMethod("lora", "LoraConfig", "LORA", "LoRA", low_rank=True),
        AdapterMethod("adalora", "AdaLoraConfig", "ADALORA", "AdaLoRA", low_rank=True),
        AdapterMethod("ia3", "IA3Config", "IA3", "IA³"),
        AdapterMethod("loha", "LoHaConfig", "LOHA", "LoHa"),
        AdapterMethod("lokr", "LoKrConfig", "LOKR", "LoKr"),
        *(
            AdapterMethod(
                name,
                config,
                peft_type,
                display,
                tasks=PROMPT_TASKS,
                wraps_layers=False,
                mergeable=False,
                quantized_base=False,
            )
            for name, config, peft_type, display in (
                ("prefix_tuning", "PrefixTuningConfig", "PREFIX_TUNING", "prefix tuning"),
                ("prompt_tuning", "PromptTuningConfig", "PROMPT_TUNING", "prompt tuning"),
                ("p_tuning", "PromptEncoderConfig", "P_TUNING", "P-tuning"),
            )
        ),
    )
}


def method_for_peft_type(peft_type: str) -> AdapterMethod | None:
    """The method that saves adapters of this peft_type (None for one peftkit does not train)."""
    return next((m for m in METHODS.values() if m.peft_type == peft_type), None)


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
    cls = getattr(peft, METHODS[method].peft_config)
    options["task_type"] = task.peft_task_type(model_config)
    if METHODS[method].wraps_layers:
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
