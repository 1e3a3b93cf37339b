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
class VersionLimit:
    """Tasks a method cannot train with a range of released library versions: refused at validation, naming
    the versions, until a release fixes it (docs/dependencies.md). ``transformers`` and ``peft`` are version
    specifiers the breakage holds for; both must match."""

    tasks: frozenset[str]
    transformers: str
    peft: str
    why: str
    fix: str

    def problem(self, task: str, versions: dict[str, str | None]) -> str | None:
        """The refusal for ``task`` under ``versions`` (package → installed version), or None."""
        from packaging.specifiers import SpecifierSet

        if task not in self.tasks:
            return None
        installed = {name: versions.get(name) for name in ("transformers", "peft")}
        specs = {"transformers": self.transformers, "peft": self.peft}
        if any(
            v is None or not SpecifierSet(specs[n]).contains(v, prereleases=True)
            for n, v in installed.items()
        ):
            return None
        return f"transformers {installed['transformers']} and peft {installed['peft']}: {self.why}"


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
    version_limits: tuple[VersionLimit, ...] = ()

    def version_problem(
        self, task: str, versions: dict[str, str | None] | None = None
    ) -> tuple[str, str] | None:
        """(problem, fix) when the installed (or given) library versions cannot train it for ``task``."""
        if versions is None:
            from importlib import metadata

            versions = {}
            for name in ("transformers", "peft"):
                try:
                    versions[name] = metadata.version(name)
                except metadata.PackageNotFoundError:
                    versions[name] = None
        for limit in self.version_limits:
            problem = limit.problem(task, versions)
            if problem:
                return problem, limit.fix
        return None


PROMPT_TASKS = frozenset({"seq_cls", "seq2seq"})
# transformers 5.24 renamed the models' `past_key_values` argument to `cache` (still accepted under the old
# name until 5.40); peft 0.21.2's prefix-tuning forward for classifiers looks for `past_key_values` in the
# model's signature and raises "Model does not support past key values" at the first step.
PREFIX_TUNING_CACHE_RENAME = VersionLimit(
    tasks=frozenset({"seq_cls"}),
    transformers=">=5.24",
    peft="<=0.21.2",
    why="transformers 5.24 renamed the models' `past_key_values` argument to `cache`, and this peft's "
    "prefix-tuning classifier still looks for `past_key_values`, so training fails at the first step",
    fix="use method = 'prompt_tuning' or 'p_tuning' (or 'lora'), or install transformers<5.24 "
    "(docs/dependencies.md)",
)
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
                version_limits=limits,
            )
            for name, config, peft_type, display, limits in (
                (
                    "prefix_tuning",
                    "PrefixTuningConfig",
                    "PREFIX_TUNING",
                    "prefix tuning",
                    (PREFIX_TUNING_CACHE_RENAME,),
                ),
                ("prompt_tuning", "PromptTuningConfig", "PROMPT_TUNING", "prompt tuning", ()),
                ("p_tuning", "PromptEncoderConfig", "P_TUNING", "P-tuning", ()),
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


def base_state_dict(peft_model: Any) -> dict[str, Any]:
    """The base model's own tensors inside a PeftModel, under the base model's names.

    peft keeps the wrapped layers' weights as ``<layer>.base_layer.*`` and a saved head's original as
    ``<head>.original_module.*``; every adapter tensor has its adapter's name ("default") as a name part.
    """
    adapters = set(getattr(peft_model, "peft_config", {}) or {"default"})
    out = {}
    for key, tensor in peft_model.get_base_model().state_dict().items():
        parts = key.split(".")
        if adapters & set(parts):
            continue
        out[".".join(p for p in parts if p not in ("base_layer", "original_module"))] = tensor
    return out


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
