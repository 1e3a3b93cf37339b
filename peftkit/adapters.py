"""Adapter methods: :data:`METHODS`, what peftkit knows about each; ``[adapter]`` → a peft config.

:data:`METHODS` is the one place that says what a method can do (its peft config class, the tasks it
takes, whether it merges or trains on a quantized base, its display name); the recipe layer, merge,
export and plan read it. Adding a method is a row here (and its tests). This module imports nothing of
peftkit at import time but the task types, so that the recipe layer can read the table.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
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
PROMPT_METHODS = frozenset({"prefix_tuning", "prompt_tuning", "p_tuning"})
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


# [adapter] keys peftkit owns: not peft config fields, so kept out of the peft config and adapter_config.json
# (the resolved recipe in peftkit_run.json records them)
ADAPTER_OWN_KEYS: dict[str, str] = {
    "loraplus_lr_ratio": "LoRA+ (method 'lora'): lora_B's learning rate is train.learning_rate × this ratio, "
    "lora_A's stays train.learning_rate; the optimizer is built by peft's create_loraplus_optimizer with "
    "the class train.optim names. e.g. 16",
    "loraplus_lr_embedding": "LoRA+: the learning rate of LoRA layers on embeddings (peft's default 1e-6); "
    "needs loraplus_lr_ratio",
}


def loraplus_options(options: dict[str, Any]) -> dict[str, float] | None:
    """LoRA+'s settings from ``[adapter]`` (keyword arguments of :func:`peftkit.trainer.loraplus_optimizer`),
    or None when the recipe does not use LoRA+."""
    if options.get("loraplus_lr_ratio") is None:
        return None
    out = {"ratio": float(options["loraplus_lr_ratio"])}
    if options.get("loraplus_lr_embedding") is not None:
        out["lr_embedding"] = float(options["loraplus_lr_embedding"])
    return out


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
    """The peft config for ``[adapter]``: method class, task type, targets and heads to save (peftkit's own
    keys, :data:`ADAPTER_OWN_KEYS`, stay out of it)."""
    import peft

    options = {k: v for k, v in options.items() if k not in ADAPTER_OWN_KEYS}
    method = options.pop("method", "lora")
    cls = getattr(peft, METHODS[method].peft_config)
    options["task_type"] = task.peft_task_type(model_config)
    if METHODS[method].wraps_layers:
        if options.get("target_modules") is None:
            options["target_modules"] = default_target_modules(method, model_config)
        heads = present_heads(model, task.head_modules)
        options["modules_to_save"] = sorted({*heads, *(options.get("modules_to_save") or [])}) or None
    return cls(**options)


def apply_adapter(model: Any, options: dict[str, Any], task: Task, model_config: Any, seed: int = 0) -> Any:
    """Wrap the base model in a PeftModel; returns it with trainable parameter counts logged. ``seed`` (the
    run's): what a random init draws from where loading must repeat it (:func:`seeded_adapter_init`)."""
    from peft import get_peft_model

    config = build_peft_config(options, task, model, model_config)
    with seeded_adapter_init(options.get("init_lora_weights"), seed):
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


# --------------------------------------------------------------------------------------------------
# Method-level checks (validate time) and the model-dependent ones (once the model config is known)

# peft 0.21.2 requires these keys but only says so with a traceback at the first forward (or none at all)
REQUIRED_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "prefix_tuning": (("num_virtual_tokens", "e.g. num_virtual_tokens = 20"),),
    "prompt_tuning": (("num_virtual_tokens", "e.g. num_virtual_tokens = 20"),),
    "p_tuning": (("num_virtual_tokens", "e.g. num_virtual_tokens = 20"),),
}


def is_pissa_niter(value: Any) -> bool:
    """``"pissa_niter_<n>"``: PiSSA with n subspace iterations (fast SVD), valid in peft for any n >= 1."""
    import re

    return isinstance(value, str) and re.fullmatch(r"pissa_niter_[1-9][0-9]*", value) is not None


def residual_init(options: dict[str, Any]) -> str | None:
    """The init that moves part of the base weight into the adapter (PiSSA, OLoRA), or None.

    Such an adapter only means its update relative to the *residual* base it was trained on; peft converts
    it back to a plain LoRA only when saved with ``path_initial_model_for_weight_conversion``.
    """
    init = options.get("init_lora_weights")
    if init == "olora" or init == "pissa" or is_pissa_niter(init):
        return str(init)
    return None


@contextlib.contextmanager
def seeded_adapter_init(init_lora_weights: Any, seed: int) -> Iterator[None]:
    """Within the block torch draws from ``seed`` when the init is PiSSA's fast SVD (``pissa_niter_<n>``),
    and the global random state is as before afterwards; other inits are left alone.

    peft repeats a residual init on the original base whenever it loads the adapter (the saved A and B are
    relative to that residual). Full-SVD PiSSA and OLoRA repeat it exactly; ``torch.svd_lowrank`` draws a
    random projection, so without the same seed at training and at loading a reloaded run has another
    residual base and predicts otherwise (a T5 run's generations changed completely).
    """
    if not is_pissa_niter(init_lora_weights):
        yield
        return
    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def method_problems(options: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(``adapter.<key>``, problem, fix) for each method-level mistake in ``[adapter]``, before any model."""
    method = options.get("method", "lora")
    problems: list[tuple[str, str, str]] = []
    for key, example in REQUIRED_KEYS.get(method, ()):
        if options.get(key) is None:
            problems.append((f"adapter.{key}", f"method {method!r} needs {key}", f"set it: {example}"))
    if method == "lora" and options.get("init_lora_weights") == "loftq" and not _cuda_available():
        problems.append(
            (
                "adapter.init_lora_weights",
                "'loftq' (method 'lora') needs a CUDA GPU: peft 0.21.2's LoftQ initialisation "
                "quantizes and decomposes each weight on the 'cuda' device (peft/utils/loftq_utils.py), "
                "so on CPU it fails with "
                "'Torch not compiled with CUDA enabled'",
                "on CPU use init_lora_weights = 'pissa' (also an SVD init) or [quantization] bits = 4 with "
                "the default init (QLoRA); run LoftQ on a GPU machine",
            )
        )
    problems += loraplus_problems(method, options)
    if method == "adalora":
        total = options.get("total_step")
        tinit, tfinal = options.get("tinit", 0), options.get("tfinal", 0)
        if total is not None and tinit >= total - tfinal:
            problems.append(
                (
                    "adapter.total_step",
                    f"AdaLoRA needs a budgeting phase: tinit ({tinit}) must be below total_step ({total}) "
                    f"- tfinal ({tfinal})",
                    "remove total_step (peftkit sets it to the run's planned steps) or lower tinit/tfinal",
                )
            )
    return problems


def loraplus_problems(method: str, options: dict[str, Any]) -> list[tuple[str, str, str]]:
    """LoRA+'s keys: method 'lora' only, positive finite values, the embedding rate only with a ratio."""
    import math

    ratio, embedding = options.get("loraplus_lr_ratio"), options.get("loraplus_lr_embedding")
    if ratio is None and embedding is None:
        return []
    if method != "lora":
        why = (
            "AdaLoRA's SVD form starts its singular values (lora_E) at zero, not lora_B, which the LoRA+ "
            "ratio is derived for, and its rank allocation masks them"
            if method == "adalora"
            else f"{method!r} has no lora_A/lora_B matrices whose learning rates LoRA+ sets apart"
        )
        key = "loraplus_lr_ratio" if ratio is not None else "loraplus_lr_embedding"
        return [
            (
                f"adapter.{key}",
                f"LoRA+ works with method 'lora' only (and its variants: DoRA, rsLoRA, PiSSA ...): {why}",
                "remove the loraplus_* keys, or use method = 'lora'",
            )
        ]
    problems = []
    for key, value in (("loraplus_lr_ratio", ratio), ("loraplus_lr_embedding", embedding)):
        if value is not None and not (math.isfinite(value) and value > 0):
            example = "16" if key == "loraplus_lr_ratio" else "1e-6 (peft's default)"
            problems.append((f"adapter.{key}", f"must be positive, got {value!r}", f"use e.g. {example}"))
    if embedding is not None and ratio is None:
        problems.append(
            (
                "adapter.loraplus_lr_embedding",
                "is LoRA+'s embedding learning rate, and LoRA+ is off without loraplus_lr_ratio",
                "set loraplus_lr_ratio (e.g. 16), or remove loraplus_lr_embedding",
            )
        )
    return problems


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return bool(torch.cuda.is_available())


def model_problem(options: dict[str, Any], task_name: str, model_config: Any) -> tuple[str, str] | None:
    """(problem, fix) when ``[adapter]`` cannot train this model's architecture; known from its config."""
    method = options.get("method", "lora")
    encoder_decoder = bool(getattr(model_config, "is_encoder_decoder", False))
    model_type = getattr(model_config, "model_type", "?")
    if method == "prefix_tuning" and task_name == "seq2seq" and encoder_decoder:
        return (
            f"'prefix_tuning' cannot train the encoder-decoder {model_type!r} with transformers>=5.24 and "
            "peft<=0.21.2: peft passes the prefix as `past_key_values`, which the renamed cache argument "
            "of transformers 5.24 no longer takes ('Model does not support past key values')",
            "use method = 'prompt_tuning' or 'lora' for encoder-decoder models",
        )
    if method == "lora" and options.get("init_lora_weights") == "eva" and encoder_decoder:
        return (
            f"init_lora_weights = 'eva' cannot initialise the encoder-decoder {model_type!r}: peft 0.21.2's "
            "EVA masks every layer's inputs by the encoder's attention mask, which does not fit the "
            "decoder's layers",
            "use init_lora_weights = 'pissa' or the default init for encoder-decoder models",
        )
    return None


def fill_planned_steps(options: dict[str, Any], planned_steps: int) -> dict[str, Any]:
    """AdaLoRA's ``total_step`` from the run's planned optimizer steps when the recipe leaves it out."""
    if options.get("method") != "adalora" or options.get("total_step") is not None:
        return options
    logger.info("adapter.total_step (AdaLoRA's schedule) set to the planned %d steps", planned_steps)
    return {**options, "total_step": max(int(planned_steps), 1)}


# --------------------------------------------------------------------------------------------------
# What some methods need around training: AdaLoRA's rank allocation, EVA's data-driven init


def adalora_model(model: Any) -> Any:
    """The AdaLoraModel inside a PeftModel (None for every other method)."""
    inner = getattr(model, "base_model", None)
    return inner if type(inner).__name__ == "AdaLoraModel" else None


def adalora_callback() -> Any:
    """A TrainerCallback calling AdaLoRA's ``update_and_allocate`` after every optimizer step.

    peft leaves that call to the training loop ("called in every training step after loss.backward() and
    before zero_grad()", AdaLoraModel.update_and_allocate); the Trainer never makes it, so without this the
    ranks stay at init_r. ``on_optimizer_step`` runs before the Trainer zeroes the gradients, which the
    importance scores are computed from.
    """
    from transformers import TrainerCallback

    class AdaLoraRankAllocation(TrainerCallback):
        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            model = kwargs.get("model")
            inner = adalora_model(getattr(model, "module", model))
            if inner is not None:
                inner.update_and_allocate(state.global_step)
            return control

    return AdaLoraRankAllocation()


def ready_for_evaluation(model: Any) -> Any:
    """An AdaLoRA model whose forward can score labels: loaded for inference it has no trainable adapter
    (AttributeError 'trainable_adapter_name' in its forward); its loss is the task loss alone."""
    inner = adalora_model(model)
    if inner is not None and not hasattr(inner, "trainable_adapter_name"):
        inner.trainable_adapter_name = next(iter(inner.peft_config))
        with contextlib.suppress(Exception):
            inner.peft_config[inner.trainable_adapter_name].orth_reg_weight = 0.0
    return model


@contextlib.contextmanager
def task_loss_only(model: Any) -> Iterator[None]:
    """Within the block an AdaLoRA model's loss is the task loss: its orthogonality penalty
    (``orth_reg_weight``, added to every forward's loss by AdaLoraModel.forward) is switched off, so that
    evaluation losses and the best-checkpoint choice see what the model predicts, not the regulariser."""
    inner = adalora_model(model)
    name = getattr(inner, "trainable_adapter_name", None)
    if inner is None or name is None:
        yield
        return
    config = inner.peft_config[name]
    weight = config.orth_reg_weight
    config.orth_reg_weight = 0.0
    try:
        yield
    finally:
        config.orth_reg_weight = weight


def initialize_from_data(model: Any, dataloader: Any) -> bool:
    """EVA (``init_lora_weights = "eva"``): the LoRA A rows from the SVD of each layer's inputs on the
    training data, as ``peft.initialize_lora_eva_weights`` computes them; True when it ran.

    peft's default input mask also drops positions whose label is -100, which only fits labels aligned
    with the input tokens; sequence-level labels (classification, QA spans) use the attention mask alone.
    """
    config = getattr(model, "peft_config", {}).get("default")
    if getattr(config, "init_lora_weights", None) != "eva":
        return False
    import torch
    from peft import initialize_lora_eva_weights
    from peft.tuners.lora.eva import prepare_model_inputs_fn_language_modeling

    def prepare(inputs: dict[str, Any], peft_config: Any) -> Any:
        labels = inputs.get("labels")
        if labels is not None and labels.shape != inputs["input_ids"].shape:
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
        return prepare_model_inputs_fn_language_modeling(inputs, peft_config)

    device = next(model.parameters()).device

    class OnDevice:  # peft takes len() of the loader and cycles it until every layer's SVD converged
        def __len__(self) -> int:
            return len(dataloader)

        def __iter__(self) -> Iterator[dict[str, Any]]:
            for batch in dataloader:
                yield {k: v.to(device) for k, v in batch.items()}

    was_training = model.training
    model.eval()
    with torch.no_grad():
        initialize_lora_eva_weights(
            model, OnDevice(), prepare_model_inputs_fn=prepare, show_progress_bar=False
        )
    model.train(was_training)
    logger.info("EVA: LoRA weights initialised from the SVD of the layers' inputs on the training data")
    return True


def meta_adapter_options(options: dict[str, Any]) -> dict[str, Any]:
    """``[adapter]`` as the meta-device build takes it: data- and weight-dependent inits (PiSSA, OLoRA,
    LoftQ, EVA) give the same shapes as the default init but cannot run on meta tensors (no SVD, no QR);
    AdaLoRA without total_step gets a placeholder schedule (finetune fills in the planned steps)."""
    options = dict(options)
    if options.get("init_lora_weights") not in (None, True, False, "gaussian", "orthogonal"):
        options["init_lora_weights"] = True
    return fill_planned_steps(options, int(options.get("tinit", 0)) + int(options.get("tfinal", 0)) + 1)
