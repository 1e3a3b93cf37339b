"""Sequence to sequence (summarisation, translation, any text → text) for two model families.

The family is read from the base model's config (``is_encoder_decoder``), never asked of the user:

* encoder-decoder (T5, BART, a warm-started ``EncoderDecoderModel``): the source is the encoder input and
  the target the labels; ``DataCollatorForSeq2Seq`` pads labels with -100 and builds the decoder inputs.
* decoder-only (Llama-style causal LMs): the prompt (the source in the prompt template, optionally in the
  tokenizer's chat template) and the target are one sequence; only the target and its EOS are labelled.
  With ``[task] chat = true`` the records are multi-turn conversations instead (a ``messages`` list): every
  assistant turn is labelled, nothing else (:mod:`peftkit.tasks.chat`).
  Training features are right padded. Evaluation features hold only the prompt (left padded, as generation
  needs) and the reference target as labels; :class:`GenerationTrainer` generates from the prompt, strips
  it from the output, and computes the eval loss by joining prompt and target again.

Padding is masked by position (attention mask, -100 labels), never by token id, so a tokenizer whose pad
token is its EOS still learns to stop.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from peftkit.errors import DataError, PeftkitError
from peftkit.metrics.generation import decode_token_ids, generation_metrics
from peftkit.tasks import chat as chat_format
from peftkit.tasks.base import Task, TaskConfig, TaskContext

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips (prompt, padding)
SOURCE_PLACEHOLDER = "{source}"
# other {field} placeholders of a prompt template name fields of the record (e.g. "{aspect}: {source}")
FIELD_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Seq2SeqConfig(TaskConfig):
    """``[task] type = "seq2seq"``."""

    type: Literal["seq2seq"] = "seq2seq"
    source_prefix: str = Field(
        "", description="Text put before every source, T5 style ('summarize: '). Not with prompt_template."
    )
    prompt_template: str | None = Field(
        None,
        description="How a source becomes the model input; must contain {source}, e.g. "
        "'Translate English to Spanish: {source}'; other {name} placeholders take the record's field of "
        "that name (e.g. '{aspect} summary: {source}'). Default: the source itself (decoder-only models "
        "without a chat template get a newline after it, so the target starts on a line of its own).",
    )
    use_chat_template: bool | Literal["auto"] = Field(
        "auto",
        description="Decoder-only models: wrap the prompt as a user turn of the tokenizer's chat template. "
        "'auto' uses it when the tokenizer has one.",
    )
    system_prompt: str | None = Field(
        None,
        description="Chat template only: the system turn (e.g. 'Translate English to Spanish.'); default: "
        "none, so the template's own default system text, if any, applies.",
    )
    max_source_length: int = Field(
        256,
        ge=1,
        description="Longest source in tokens (the prompt template comes on top); longer ones are cut.",
    )
    max_target_length: int = Field(
        128, ge=2, description="Longest training target in tokens, EOS included; longer ones are cut."
    )
    num_beams: int = Field(1, ge=1, description="Beam search width for evaluation and predict (1: greedy).")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Most tokens generated per example; default: max_target_length."
    )
    metrics: list[Literal["sacrebleu", "chrf", "rouge"]] = Field(
        default=["sacrebleu", "chrf", "rouge"],
        min_length=1,
        description="Metrics on generated text; the first picks the best checkpoint ('rouge': rougeL).",
    )
    predict_batch_size: int = Field(16, ge=1, description="Batch size of `peftkit predict`.")
    chat: bool = Field(
        False,
        description="Decoder-only models with a chat template: each record is a conversation, a 'messages' "
        "list of {role, content} turns (system optional and first), instead of source/target. The loss is on "
        "every assistant turn (its content and end-of-turn token) and nothing else; evaluation and predict "
        "generate the last assistant turn from the turns before it. A conversation may take "
        "max_source_length + max_target_length tokens: longer ones lose their oldest exchanges (counted in "
        "a warning), never part of a turn.",
    )

    @field_validator("prompt_template")
    @classmethod
    def _template_has_source(cls, value: str | None) -> str | None:
        if value is not None and SOURCE_PLACEHOLDER not in value:
            raise ValueError(
                f"prompt_template {value!r} has no {SOURCE_PLACEHOLDER} placeholder; write where the source "
                "text goes, e.g. 'Translate English to Spanish: {source}'"
            )
        return value

    @field_validator("metrics")
    @classmethod
    def _metrics_unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"metrics {value} lists a metric twice; list each once")
        return value

    @model_validator(mode="after")
    def _prefix_or_template(self) -> Seq2SeqConfig:
        if self.source_prefix and self.prompt_template is not None:
            raise ValueError(
                "set source_prefix or prompt_template, not both; put the prefix inside the template"
            )
        if self.system_prompt is not None and self.use_chat_template is False:
            raise ValueError("system_prompt needs the chat template; remove it or use_chat_template = false")
        if self.chat and (self.prompt_template is not None or self.source_prefix):
            raise ValueError(
                "chat = true trains on conversations rendered by the chat template; remove prompt_template "
                "and source_prefix (put instructions in system_prompt or in the conversations)"
            )
        if self.chat and self.use_chat_template is False:
            raise ValueError("chat = true needs the chat template; remove use_chat_template = false")
        # max_length is inherited but unused; resolved recipes carry its default, so only a change is refused
        if self.max_length != TaskConfig.model_fields["max_length"].default:
            raise ValueError(
                "seq2seq limits the source and the target separately: replace max_length with "
                "max_source_length (and max_target_length)"
            )
        return self

    @property
    def template_fields(self) -> list[str]:
        """Record fields the prompt template reads besides the source, in order of first use."""
        if self.prompt_template is None:
            return []
        names = FIELD_PLACEHOLDER.findall(self.prompt_template)
        return [n for n in dict.fromkeys(names) if n != "source"]

    @property
    def generation_limit(self) -> int:
        """Most new tokens per generated example."""
        return self.max_new_tokens if self.max_new_tokens is not None else self.max_target_length


# source/target for prompt → target records, messages for conversations ([task] chat); prepare_labels
# checks that each record has the ones its format needs
COLUMNS = {"source": False, "target": False, "messages": False}


# --------------------------------------------------------------------------------------------------
# Model family


def is_encoder_decoder(model_config: Any) -> bool:
    """True for T5, BART, EncoderDecoderModel...; False for decoder-only causal LMs."""
    return bool(getattr(model_config, "is_encoder_decoder", False))


def _model_class(model_config: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if is_encoder_decoder(model_config) else AutoModelForCausalLM


def _peft_task_type(model_config: Any) -> str:
    return "SEQ_2_SEQ_LM" if is_encoder_decoder(model_config) else "CAUSAL_LM"


def model_kwargs(ctx: TaskContext) -> dict[str, Any]:
    """No head to configure: the special token ids are set by :func:`prepare_model_for_generation`."""
    return {}


# --------------------------------------------------------------------------------------------------
# Data checks and preprocessing


def prepare_labels(raw: Any, cfg: Seq2SeqConfig) -> None:
    """No label set; checks instead that every record of every split has a source and a target.

    An empty target would teach the model to stop at once, and an empty source has nothing to condition on,
    so both are refused with the split and record number.
    """
    if cfg.chat:
        _check_conversations(raw)
        return None
    for split, ds in raw.items():
        for field in cfg.template_fields:
            if field not in ds.column_names:
                raise DataError(
                    f"task.prompt_template uses {{{field}}}, but the {split} split has no {field!r} field "
                    f"(fields: {ds.column_names}); add it to the data or remove the placeholder"
                )
        for column in ("source", "target"):
            if column not in ds.column_names:
                if column == "target" and split == "test":
                    continue  # a test split without references is only predicted, not scored
                raise DataError(
                    f"{split} split has no {column!r} column (columns: {ds.column_names}); map yours with "
                    f"[data] columns = {{{column} = '<your column>'}}"
                )
            for i, value in enumerate(ds[column]):
                if not isinstance(value, str) or not value.strip():
                    raise DataError(
                        f"{split} split, record {i}: {column} is "
                        f"{'empty' if value is not None else 'missing'} ({value!r}); every example needs a "
                        f"non-empty {column} text. Remove the record or "
                        f"fix [data] columns so that {column!r} maps to the right column"
                    )
    return None


def _check_conversations(raw: Any) -> None:
    for split, ds in raw.items():
        if "messages" not in ds.column_names:
            if split == "test":
                continue
            raise DataError(
                f"{split} split has no 'messages' column (columns: {ds.column_names}); [task] chat = true "
                "reads conversations from it: map yours with [data] columns = {messages = '<your column>'}"
            )
        for i, value in enumerate(ds["messages"]):
            chat_format.check_messages(value, f"{split} split, record {i}", needs_reply=True)


def _check_texts(values: Sequence[Any], column: str) -> list[str]:
    """The batch's texts, or a DataError naming the first empty one (predict input, direct callers)."""
    for i, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise DataError(
                f"record {i} of this batch: {column} is empty ({value!r}); every example needs a non-empty "
                f"{column} text"
            )
    return list(values)


def _truncate_to_tokens(texts: list[str], tokenizer: Any, max_tokens: int) -> tuple[list[str], list[int]]:
    """Cut each text after its ``max_tokens``-th token (by character offsets, so no text is re-decoded).

    Cutting the source, not the rendered prompt, keeps the prompt's tail (e.g. the chat template's assistant
    header) intact. Returns the texts and their untruncated token counts.
    """
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out: list[str] = []
    lengths: list[int] = []
    for text, ids, offsets in zip(texts, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        lengths.append(len(ids))
        out.append(text[: offsets[max_tokens - 1][1]] if len(ids) > max_tokens else text)
    return out, lengths


def _warn_truncated(lengths: list[int], limit: int, what: str, key: str) -> None:
    long = [n for n in lengths if n > limit]
    if long:
        logger.warning(
            "%d of %d %ss in this batch are longer than %s = %d tokens (longest: %d) and were truncated; "
            "raise [task] %s to keep them whole",
            len(long),
            len(lengths),
            what,
            key,
            limit,
            max(long),
            key,
        )


def render_prompt(source: str, cfg: Seq2SeqConfig, fields: Mapping[str, Any] | None = None) -> str:
    """The source in the prompt template: ``{source}`` and ``{field}`` placeholders of
    ``cfg.template_fields`` replaced in one pass (so a source containing braces is never re-expanded);
    other braces are kept as written."""
    if cfg.prompt_template is None:
        return cfg.source_prefix + source
    values = {"source": source, **{k: str(v) for k, v in (fields or {}).items()}}

    def fill(match: re.Match[str]) -> str:
        return values.get(match.group(1), match.group(0))

    return FIELD_PLACEHOLDER.sub(fill, cfg.prompt_template)


def _template_values(
    batch: Mapping[str, Sequence[Any]], cfg: Seq2SeqConfig, size: int
) -> list[dict[str, Any]]:
    """Per record, the fields the prompt template reads; a DataError names a missing one."""
    for field in cfg.template_fields:
        if field not in batch:
            raise DataError(
                f"task.prompt_template uses {{{field}}}, but the records have no {field!r} field; add it to "
                "each record or remove the placeholder"
            )
    return [{field: batch[field][i] for field in cfg.template_fields} for i in range(size)]


def uses_chat_template(ctx: TaskContext) -> bool:
    """Whether decoder-only prompts are wrapped in the tokenizer's chat template."""
    has_template = bool(getattr(ctx.tokenizer, "chat_template", None))
    setting = ctx.cfg.use_chat_template
    if setting is True and not has_template:
        raise PeftkitError(
            "[task] use_chat_template = true, but the tokenizer has no chat template; set it to false or "
            "'auto', or load a tokenizer that has one ([model] tokenizer)"
        )
    if setting is True and is_encoder_decoder(ctx.model_config):
        raise PeftkitError(
            "[task] use_chat_template = true applies to decoder-only models only; this model is an "
            "encoder-decoder: remove use_chat_template"
        )
    used = has_template and setting is not False and not is_encoder_decoder(ctx.model_config)
    if ctx.cfg.system_prompt is not None and not used:
        raise PeftkitError(
            "[task] system_prompt is set, but no chat template is used (the tokenizer has none, or the model "
            "is an encoder-decoder); put the instruction in prompt_template instead"
        )
    return used


def _eos_token_id(ctx: TaskContext) -> int:
    eos = ctx.tokenizer.eos_token_id
    if eos is None:
        raise PeftkitError(
            "decoder-only seq2seq needs a tokenizer with an EOS token (it ends every target, so that "
            "generation stops); set tokenizer.eos_token or use the model's own tokenizer"
        )
    return int(eos)


def _encode_prompts(prompts: list[str], ctx: TaskContext) -> list[list[int]]:
    """Prompt token ids for a decoder-only model: chat template, or the tokenizer's BOS handling."""
    tokenizer = ctx.tokenizer
    if uses_chat_template(ctx):
        system = [{"role": "system", "content": ctx.cfg.system_prompt}] if ctx.cfg.system_prompt else []
        texts = [
            tokenizer.apply_chat_template(
                [*system, {"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            for prompt in prompts
        ]
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    texts = [prompt if ctx.cfg.prompt_template is not None else prompt + "\n" for prompt in prompts]
    encoded = [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    # Some tokenizers append EOS (or SEP) to every text; a prompt must not end as if the answer were over.
    closers = {tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)} - {None}
    return [ids[:-1] if len(ids) > 1 and ids[-1] in closers else ids for ids in encoded]


def preprocess(batch: dict[str, list[Any]], ctx: TaskContext, train: bool) -> dict[str, list[Any]]:
    """Tokenize a batch for the model family (no padding: the collator pads each batch).

    Features: encoder-decoder ``input_ids, attention_mask, labels``; decoder-only training
    ``input_ids = prompt + target + EOS`` with ``labels`` -100 on the prompt; decoder-only evaluation
    ``input_ids = prompt`` and ``labels = target + EOS``. ``labels`` are absent when the batch has no targets.
    """
    cfg: Seq2SeqConfig = ctx.cfg
    if cfg.chat:
        return _preprocess_chat(batch, ctx, train)
    sources = _check_texts(batch["source"], "source")
    targets = _check_texts(batch["target"], "target") if batch.get("target") is not None else None
    sources, source_lengths = _truncate_to_tokens(sources, ctx.tokenizer, cfg.max_source_length)
    _warn_truncated(source_lengths, cfg.max_source_length, "source", "max_source_length")
    fields = _template_values(batch, cfg, len(sources))
    prompts = [render_prompt(source, cfg, values) for source, values in zip(sources, fields, strict=True)]
    if is_encoder_decoder(ctx.model_config):
        return _preprocess_encoder_decoder(prompts, targets, ctx)
    return _preprocess_decoder_only(prompts, targets, ctx, train)


def _chat_context(ctx: TaskContext) -> None:
    if is_encoder_decoder(ctx.model_config):
        raise PeftkitError(
            "[task] chat = true applies to decoder-only models; this model is an encoder-decoder: remove "
            "chat and give source/target records"
        )
    if not getattr(ctx.tokenizer, "chat_template", None):
        raise PeftkitError(
            "[task] chat = true, but the tokenizer has no chat template; load a tokenizer that has one "
            "([model] tokenizer) or remove chat"
        )


def _preprocess_chat(batch: dict[str, list[Any]], ctx: TaskContext, train: bool) -> dict[str, Any]:
    """Conversations → features. Training: the whole conversation, assistant turns labelled. Evaluation:
    the conversation before the last assistant turn (left padded for generation) and that turn as labels.
    Conversations over budget lose their oldest exchanges; in training, one whose last exchange alone is
    over budget is skipped. Both are counted in a warning."""
    _chat_context(ctx)
    cfg: Seq2SeqConfig = ctx.cfg
    budget = cfg.max_source_length + cfg.max_target_length
    tokenizer = ctx.tokenizer
    features: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": []}
    cut = skipped = 0
    for i, messages in enumerate(batch["messages"]):
        turns = chat_format.with_system(
            chat_format.check_messages(messages, f"record {i} of this batch", needs_reply=True),
            cfg.system_prompt,
        )
        encoded = chat_format.fit(tokenizer, turns, budget, keep_long=not train)
        if encoded is None:
            skipped += 1
            continue
        cut += encoded.dropped_turns > 0
        if train:
            ids, labels = encoded.input_ids, encoded.labels
        else:
            ids = encoded.input_ids[: encoded.last_turn]
            labels = [t for t in encoded.labels[encoded.last_turn :] if t != IGNORE_INDEX]
        features["input_ids"].append(ids)
        features["attention_mask"].append([1] * len(ids))
        features["labels"].append(labels)
    if cut or skipped:
        logger.warning(
            "%d of %d conversations in this batch are longer than max_source_length + max_target_length = %d "
            "tokens: %d lost their oldest exchanges, %d were skipped (their last exchange alone is longer); "
            "raise [task] max_source_length to keep them whole",
            cut + skipped,
            len(batch["messages"]),
            budget,
            cut,
            skipped,
        )
    return features


def _preprocess_encoder_decoder(
    prompts: list[str], targets: list[str] | None, ctx: TaskContext
) -> dict[str, Any]:
    tokenizer = ctx.tokenizer
    encoded = tokenizer(prompts)
    features: dict[str, Any] = {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
    }
    if targets is not None:
        limit = ctx.cfg.max_target_length
        full = tokenizer(text_target=targets)["input_ids"]
        _warn_truncated([len(ids) for ids in full], limit, "target", "max_target_length")
        labels = tokenizer(text_target=targets, max_length=limit, truncation=True)["input_ids"]
        # The decoder is fed the start token and then the labels shifted right. A tokenizer that opens every
        # text with that same token (BERT's [CLS] in a warm-started BERT2BERT) would make the first target
        # "repeat the start token": the model learns it and then generates [CLS] forever. BART's <s> differs
        # from its start token </s> and stays.
        start = decoder_start_token_id(ctx.model_config, None, tokenizer)
        features["labels"] = [ids[1:] if len(ids) > 1 and ids[0] == start else ids for ids in labels]
    return features


def decoder_start_token_id(model_config: Any, generation_config: Any, tokenizer: Any) -> int | None:
    """The token an encoder-decoder's decoder starts from: the model's own, else (a warm-started
    ``EncoderDecoderModel`` has none) the tokenizer's [CLS], BOS or pad token."""
    return _first_set(
        getattr(model_config, "decoder_start_token_id", None),
        getattr(generation_config, "decoder_start_token_id", None),
        tokenizer.cls_token_id,
        tokenizer.bos_token_id,
        tokenizer.pad_token_id,
    )


def _preprocess_decoder_only(
    prompts: list[str], targets: list[str] | None, ctx: TaskContext, train: bool
) -> dict[str, Any]:
    eos = _eos_token_id(ctx)
    prompt_ids = _encode_prompts(prompts, ctx)
    if targets is None:
        return {"input_ids": prompt_ids, "attention_mask": [[1] * len(ids) for ids in prompt_ids]}
    limit = ctx.cfg.max_target_length - 1  # room for EOS
    target_ids = ctx.tokenizer(targets, add_special_tokens=False)["input_ids"]
    _warn_truncated([len(ids) + 1 for ids in target_ids], limit + 1, "target", "max_target_length")
    target_ids = [[*ids[:limit], eos] for ids in target_ids]
    if not train:
        return {
            "input_ids": prompt_ids,
            "attention_mask": [[1] * len(ids) for ids in prompt_ids],
            "labels": target_ids,
        }
    input_ids = [p + t for p, t in zip(prompt_ids, target_ids, strict=True)]
    return {
        "input_ids": input_ids,
        "attention_mask": [[1] * len(ids) for ids in input_ids],
        "labels": [[IGNORE_INDEX] * len(p) + t for p, t in zip(prompt_ids, target_ids, strict=True)],
    }


# --------------------------------------------------------------------------------------------------
# Collation and generation settings


class DecoderOnlyCollator:
    """Pads decoder-only features: training features on the right, prompt-only features on the left.

    Training features are told apart by their labels, which start with -100 (the prompt is never empty);
    generation features carry the bare target as labels (right padded with -100) or no labels at all.
    Keys other than input_ids/attention_mask/labels (e.g. ``length``) are dropped.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        training = all(len(f.get("labels") or ()) and f["labels"][0] == IGNORE_INDEX for f in features)
        width = max(len(f["input_ids"]) for f in features)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": []}
        for feature in features:
            ids = list(feature["input_ids"])
            gap = width - len(ids)
            if training:
                batch["input_ids"].append(ids + [self.pad_token_id] * gap)
                batch["attention_mask"].append([1] * len(ids) + [0] * gap)
            else:
                batch["input_ids"].append([self.pad_token_id] * gap + ids)
                batch["attention_mask"].append([0] * gap + [1] * len(ids))
        if all("labels" in f for f in features):
            label_width = width if training else max(len(f["labels"]) for f in features)
            batch["labels"] = [
                list(f["labels"]) + [IGNORE_INDEX] * (label_width - len(f["labels"])) for f in features
            ]
        return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}


def collator(ctx: TaskContext, model: Any) -> Any:
    """The family's collator. Also writes the [task] generation settings into the model (see below).

    This is the one hook that sees both the model and the task config, so it calls
    :func:`prepare_model_for_generation`: evaluation, ``predict`` and a merged export then generate alike.
    """
    if model is not None:
        prepare_model_for_generation(model, ctx)
    if is_encoder_decoder(ctx.model_config):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(ctx.tokenizer, model=model, label_pad_token_id=IGNORE_INDEX)
    pad = ctx.tokenizer.pad_token_id
    return DecoderOnlyCollator(pad if pad is not None else _eos_token_id(ctx))


def _unwrap(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _first_set(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def prepare_model_for_generation(model: Any, ctx: TaskContext) -> None:
    """Special token ids and [task] generation settings on the model's config and generation_config.

    A warm-started ``EncoderDecoderModel`` has no decoder start or pad id yet (the loss needs both): they
    come from the tokenizer (BERT: [CLS] starts, [SEP] ends). Decoder-only models stop at the tokenizer's
    EOS, which ends every training target. Decoding is deterministic (greedy or beam search).
    """
    base = _unwrap(model)
    config, generation = base.config, base.generation_config
    tokenizer = ctx.tokenizer
    pad = tokenizer.pad_token_id
    eos: int | list[int] | None
    if is_encoder_decoder(config):
        if getattr(config, "decoder_start_token_id", None) is None:
            config.decoder_start_token_id = decoder_start_token_id(config, generation, tokenizer)
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = pad
        eos = _first_set(
            generation.eos_token_id,
            getattr(config, "eos_token_id", None),
            tokenizer.eos_token_id,
            getattr(tokenizer, "sep_token_id", None),
        )
        if getattr(config, "eos_token_id", None) is None and isinstance(eos, int):
            config.eos_token_id = eos
        generation.decoder_start_token_id = config.decoder_start_token_id
    else:
        # Targets end with the tokenizer's EOS; keep any other stop ids the model already has.
        target_eos = chat_format.end_of_turn_id(tokenizer) if ctx.cfg.chat else _eos_token_id(ctx)
        known = generation.eos_token_id
        known_ids = [] if known is None else [known] if isinstance(known, int) else list(known)
        others = [i for i in known_ids if i != target_eos]
        eos = [target_eos, *others] if others else target_eos
    generation.eos_token_id = eos
    generation.pad_token_id = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    generation.max_new_tokens = ctx.cfg.generation_limit
    generation.num_beams = ctx.cfg.num_beams
    generation.do_sample = False


# --------------------------------------------------------------------------------------------------
# Evaluation by generation


def join_prompt_and_target(
    prompt_ids: Any, prompt_mask: Any, labels: Any, pad_token_id: int
) -> dict[str, Any]:
    """Model inputs that score the targets of left-padded prompts and right-padded (-100) targets.

    The two are joined into ``[pad.. prompt | target ..pad]`` with position ids counted over real tokens
    only, so the loss equals the training loss of the same examples (which are right padded).
    """
    import torch

    target_mask = labels != IGNORE_INDEX
    target_ids = torch.where(target_mask, labels, torch.full_like(labels, pad_token_id))
    attention_mask = torch.cat([prompt_mask, target_mask.to(prompt_mask.dtype)], dim=1)
    return {
        "input_ids": torch.cat([prompt_ids, target_ids], dim=1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0),
        "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), labels], dim=1),
    }


def generate_from_prompts(model: Any, input_ids: Any, attention_mask: Any, **gen_kwargs: Any) -> Any:
    """Generated token ids only: a decoder-only model's output is stripped of its (left-padded) prompt."""
    import torch

    encoder_decoder = is_encoder_decoder(_unwrap(model).config)
    if not encoder_decoder and getattr(
        getattr(model, "peft_config", {}).get("default"), "is_prompt_learning", False
    ):
        return _generate_one_by_one(model, input_ids, attention_mask, **gen_kwargs)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
    if encoder_decoder:
        return output
    return output[:, input_ids.shape[1] :]


def _generate_one_by_one(model: Any, input_ids: Any, attention_mask: Any, **gen_kwargs: Any) -> Any:
    """Each prompt generated alone, without padding; rows padded with -100 (skipped when decoded).

    peft's prompt-learning models put their virtual tokens (or prefix) *before* the left padding of a
    decoder-only batch, so the padding sits between the learned prompt and the text, and the positions
    shift with it: the same record generates other tokens alone and in a batch.
    """
    import torch

    rows = []
    with torch.no_grad():
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            keep = mask.bool()
            prompt = ids[keep][None, :]
            output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **gen_kwargs)
            rows.append(output[0, prompt.shape[1] :])
    width = max((len(row) for row in rows), default=0)
    padded = torch.full((len(rows), width), -100, dtype=input_ids.dtype, device=input_ids.device)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    return padded


def _generation_prediction_step(
    trainer: Any, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, gen_kwargs: dict[str, Any]
) -> tuple[Any, Any, Any]:
    """(eval loss, generated ids, labels) for one batch of either family."""
    import torch
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    inputs = trainer._prepare_inputs(inputs)
    labels = inputs.get("labels")
    encoder_decoder = is_encoder_decoder(_unwrap(trainer.model).config)
    loss = None
    if labels is not None:
        if encoder_decoder:
            loss_inputs = inputs
        else:
            pad = getattr(trainer.processing_class, "pad_token_id", None)
            pad = 0 if pad is None else pad  # the filler is masked out either way
            loss_inputs = join_prompt_and_target(inputs["input_ids"], inputs["attention_mask"], labels, pad)
        with torch.no_grad(), trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, loss_inputs).detach()
    if prediction_loss_only or not getattr(trainer.args, "predict_with_generate", True):
        return loss, None, None
    kwargs = {k: v for k, v in (gen_kwargs or getattr(trainer, "_gen_kwargs", {})).items() if v is not None}
    kwargs.setdefault("synced_gpus", is_deepspeed_zero3_enabled())  # every ZeRO-3 rank must step together
    generated = generate_from_prompts(trainer.model, inputs["input_ids"], inputs["attention_mask"], **kwargs)
    return loss, generated, labels


@functools.cache
def _trainer_class() -> type:
    from transformers import Seq2SeqTrainer

    class GenerationTrainer(Seq2SeqTrainer):
        """Seq2SeqTrainer whose evaluation generates from the source only, for both model families.

        Decoder-only eval features are prompt-only (left padded) with the target as labels: the loss joins
        them again (:func:`join_prompt_and_target`), and generation returns only the new tokens. The
        settings come from the model's generation_config (see :func:`prepare_model_for_generation`); no
        padding to a fixed length is needed, as the Trainer pads batches of predictions with -100.
        """

        def prediction_step(
            self,
            model: Any,
            inputs: dict[str, Any],
            prediction_loss_only: bool,
            ignore_keys: list[str] | None = None,
            **gen_kwargs: Any,
        ) -> tuple[Any, Any, Any]:
            return _generation_prediction_step(self, model, inputs, prediction_loss_only, gen_kwargs)

    GenerationTrainer.__module__ = __name__  # pickled by name via this module's __getattr__
    GenerationTrainer.__qualname__ = GenerationTrainer.__name__
    return GenerationTrainer


@functools.cache
def _training_args_class() -> type:
    from dataclasses import dataclass, field

    from transformers import Seq2SeqTrainingArguments

    @dataclass
    class GenerationTrainingArguments(Seq2SeqTrainingArguments):
        """Seq2SeqTrainingArguments whose evaluation generates by default (metrics need generated text)."""

        predict_with_generate: bool = field(
            default=True, metadata={"help": "Generate during evaluation to compute ROUGE/BLEU/chrF."}
        )

    GenerationTrainingArguments.__module__ = __name__  # torch.save pickles the arguments by name
    GenerationTrainingArguments.__qualname__ = GenerationTrainingArguments.__name__
    return GenerationTrainingArguments


def __getattr__(name: str) -> Any:
    """Build the transformers subclasses on first use (importing this module must not import torch).

    They are reachable by name here so that pickle finds them: the Trainer saves its arguments with
    ``torch.save`` in every checkpoint.
    """
    if name == "GenerationTrainer":
        return _trainer_class()
    if name == "GenerationTrainingArguments":
        return _training_args_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------
# Post-processing, metrics, predict


def postprocess(
    examples: Any, features: Any, eval_prediction: Any, ctx: TaskContext
) -> tuple[list[Any], list[Any]]:
    """Generated ids → texts; references are the examples' own target texts (not re-decoded tokens).

    Scoring against the raw references keeps the metric honest when the tokenizer is lossy (an uncased
    vocabulary, a truncated target).
    """
    if eval_prediction.predictions is None:
        return [], []
    predictions = eval_prediction.predictions
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    texts = decode_token_ids(predictions, ctx.tokenizer)
    if ctx.cfg.chat and examples is not None and "messages" in getattr(examples, "column_names", ()):
        references = [chat_format.last_reply(list(m)) for m in examples["messages"]]
    elif examples is not None and "target" in getattr(examples, "column_names", ()):
        references = [str(t) for t in examples["target"]]
    elif eval_prediction.label_ids is not None:
        references = decode_token_ids(eval_prediction.label_ids, ctx.tokenizer)
    else:
        references = []
    if references and len(references) != len(texts):
        raise ValueError(f"{len(texts)} generated texts for {len(references)} references")
    return texts, references


def compute_metrics(
    predictions: Sequence[Any], references: Sequence[Any], ctx: TaskContext
) -> dict[str, float]:
    if not references:
        return {}
    return generation_metrics(list(predictions), list(references), ctx.cfg.metrics)


def _chat_prompts(chunk: list[dict[str, Any]], start: int, ctx: TaskContext) -> dict[str, Any]:
    """Predict features of conversations: the turns before the last assistant turn (or all of them when
    the conversation ends with the user), ending with the assistant header."""
    _chat_context(ctx)
    prompts = []
    for offset, record in enumerate(chunk):
        turns = chat_format.check_messages(
            record.get("messages"), f"record {start + offset}", needs_reply=False
        )
        prompts.append(
            chat_format.generation_prompt(
                ctx.tokenizer, chat_format.with_system(turns, ctx.cfg.system_prompt)
            )
        )
    return {"input_ids": prompts, "attention_mask": [[1] * len(ids) for ids in prompts]}


def _source_prompts(chunk: list[dict[str, Any]], start: int, ctx: TaskContext) -> dict[str, Any]:
    """Predict features of ``{source}`` records (and the prompt template's other fields)."""
    for offset, record in enumerate(chunk):
        if not isinstance(record.get("source"), str) or not record["source"].strip():
            raise DataError(
                f"record {start + offset}: no 'source' text ({record.get('source')!r}); each record "
                "needs one (map another field with [data] columns = {source = '<field>'})"
            )
    columns = ("source", *(f for f in ctx.cfg.template_fields if all(f in r for r in chunk)))
    return preprocess({c: [r[c] for r in chunk] for c in columns}, ctx, train=False)


def predict(model: Any, ctx: TaskContext, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Generate for records ``{source}`` (or ``{messages}`` with ``[task] chat``: the reply after the last
    user turn): ``{"prediction": text}`` each; generation stops at EOS (chat: the end-of-turn token)."""
    collate = collator(ctx, model)
    model.eval()
    results: list[dict[str, Any]] = []
    size = ctx.cfg.predict_batch_size
    for start in range(0, len(records), size):
        chunk = records[start : start + size]
        features = _chat_prompts(chunk, start, ctx) if ctx.cfg.chat else _source_prompts(chunk, start, ctx)
        rows = [{k: v[i] for k, v in features.items()} for i in range(len(chunk))]
        batch = collate(rows)
        generated = generate_from_prompts(
            model, batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        )
        results += [{"prediction": text} for text in decode_token_ids(generated.cpu(), ctx.tokenizer)]
    return results


def _best_metric(cfg: Seq2SeqConfig) -> tuple[str, bool]:
    first = cfg.metrics[0]
    return ("rougeL" if first == "rouge" else first), True


def score_example(record: dict[str, Any], predicted: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """Error analysis: sentence chrF, lowest first."""
    from sacrebleu.metrics import CHRF

    if "source" not in record and "messages" in record:  # a conversation ([task] chat)
        turns = list(record["messages"])
        source, reference = str(turns[-2]["content"]) if len(turns) > 1 else "", chat_format.last_reply(turns)
    else:
        source, reference = record["source"], str(record["target"])
    prediction = str(predicted["prediction"])
    score = float(CHRF().sentence_score(prediction, [reference]).score)
    return {
        "source": source,
        "reference": reference,
        "prediction": prediction,
        "chrf": score,
        "_rank": (score,),
    }


def _produced_metrics(cfg: Seq2SeqConfig) -> tuple[str, ...]:
    """What :func:`generation_metrics` returns for ``cfg.metrics`` ("rouge" gives rouge1/rouge2/rougeL)."""
    names = [
        m for name in cfg.metrics for m in (("rouge1", "rouge2", "rougeL") if name == "rouge" else (name,))
    ]
    return (*names, "gen_len")


def inference_settings(ctx: TaskContext) -> dict[str, Any]:
    """How prompts are built: the chat template (with the system prompt) for a decoder-only model that uses
    one, else the prompt template or the source prefix; the generation settings are in generation_config."""
    cfg: Seq2SeqConfig = ctx.cfg
    if uses_chat_template(ctx):
        return {
            "chat_template": True,
            "chat": cfg.chat,
            "system_prompt": cfg.system_prompt,
            "prompt_template": None if cfg.chat else cfg.prompt_template or SOURCE_PLACEHOLDER,
        }
    return {
        "chat_template": False,
        "prompt_template": cfg.prompt_template,
        "source_prefix": cfg.source_prefix or None,
    }


def _pipeline_task(model_config: Any) -> str | None:
    # decoder-only; encoder-decoder models have no pipeline in transformers 5
    return None if is_encoder_decoder(model_config) else "text-generation"


TASK = Task(
    name="seq2seq",
    description="text to text (summarisation, translation) with encoder-decoder or decoder-only models",
    config_class=Seq2SeqConfig,
    columns=COLUMNS,
    model_class=_model_class,
    peft_task_type=_peft_task_type,
    # a warm-started EncoderDecoderModel's new layers: cross-attention, and BERT's LM-head transform
    head_modules=("crossattention", "transform"),
    model_kwargs=model_kwargs,
    prepare_labels=prepare_labels,
    preprocess=preprocess,
    collator=collator,
    postprocess=postprocess,
    compute_metrics=compute_metrics,
    predict=predict,
    primary_metric="sacrebleu",
    score_scale="0-100",
    primary_metric_for=_best_metric,
    trainer_class=_trainer_class,
    training_args_class=_training_args_class,
    title="text-to-text generation",
    pipeline_task=_pipeline_task,
    inference_settings=inference_settings,
    input_columns=("source", "messages"),
    predict_requires=(("messages", "source"),),  # a conversation, or a text (a .txt line fills source)
    score_example=score_example,
    column_kinds={"source": "text", "target": "text"},  # conversations: checked by prepare_labels
    reference_columns=("target", "messages"),  # a pair's target, or a conversation's last reply
    produced_metrics=_produced_metrics,
)
