"""Token classification: one tag per pre-tokenized word (named entities, part-of-speech tags, chunks).

Words are split into sub-tokens by a fast tokenizer; a word's tag is trained on, and predicted from, its
*first* sub-token (continuation pieces are ignored, or trained too with ``label_all_tokens``). Every
function below that maps tokens back to words goes through :func:`encode_words`, so training labels,
evaluation and ``peftkit predict`` agree on which token speaks for which word.

Two kinds of word get no prediction from the model, and both are predicted as the *fallback tag*
(``"O"`` for entity tags, else the first label, which is the most frequent training tag) so that they
count as errors in the metrics instead of silently vanishing:

- words cut off by ``max_length`` (``long_inputs = "truncate"``; a warning gives the count; use
  ``long_inputs = "window"`` to predict every word with overlapping windows instead);
- words the tokenizer drops entirely (only control or zero-width characters).

Metrics: ``accuracy`` (per word) and ``f1`` are always reported. ``f1`` is the strict entity F1 for
IOB2/IOBES tags and the macro F1 over tags otherwise; it picks the best checkpoint.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from peftkit.errors import DataError, PeftkitError
from peftkit.metrics.tagging import decode_entities, entity_scores, tag_scores
from peftkit.tasks.base import Task, TaskConfig, TaskContext
from peftkit.tasks.seq_cls import check_class_weights

logger = logging.getLogger(__name__)

Scheme = Literal["IOB2", "IOBES", "none"]
ENTITY_TAG = re.compile(r"^([BIES])-(.+)$")
SCHEME_PREFIXES = {"IOB2": "BI", "IOBES": "BIES"}
IGNORED_LABEL = -100  # positions the loss skips (torch CrossEntropyLoss ignore_index)
# Raw text → words: numbers with separators, words with inner hyphens/apostrophes, any other symbol alone.
WORD_PATTERN = re.compile(r"\d+(?:[.,]\d+)*|[\w\u0300-\u036f]+(?:[-'’][\w\u0300-\u036f]+)*|[^\w\s]")


class TokenClsConfig(TaskConfig):
    """``[task] type = "token_cls"``."""

    type: Literal["token_cls"] = "token_cls"
    label_all_tokens: bool = Field(
        False,
        description="Also train on a word's continuation sub-tokens (B- becomes I-; the last piece of an "
        "E-/S- word becomes E-) instead of ignoring them. Predictions always read a word's first sub-token.",
    )
    scheme: Literal["auto", "IOB2", "IOBES", "none"] = Field(
        "auto",
        description="Tag scheme. auto: O/B-/I- tags → IOB2, with E-/S- → IOBES (entity metrics), anything "
        "else → none (per-tag metrics, e.g. POS tagging).",
    )
    long_inputs: Literal["truncate", "window"] = Field(
        "truncate",
        description="Sentences longer than max_length: truncate (cut words are predicted as the fallback tag "
        "and counted as errors) or window (overlapping windows; every word predicted once).",
    )
    stride: int = Field(
        32,
        ge=0,
        description="window mode: how many tokens consecutive windows share (at most; windows end "
        "between words).",
    )
    label_list: list[str] | None = Field(
        None,
        description="Tag names in id order, for datasets whose tags are integers (a ClassLabel feature "
        "supplies them otherwise).",
    )
    predict_batch_size: int = Field(32, ge=1, description="Batch size (windows) of `peftkit predict`.")
    class_weights: Literal["balanced"] | list[float] | None = Field(
        None,
        description="Weighted cross-entropy for rare tags: 'balanced' (n / (k * n_c) over the training "
        "split's labelled tokens) or one weight per tag in id order.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TokenClsConfig:
        if self.label_list is not None and len(set(self.label_list)) != len(self.label_list):
            raise ValueError("label_list has duplicates; list each tag once, in id order")
        check_class_weights(self.class_weights, len(self.label_list) if self.label_list else None)
        if self.long_inputs == "window" and self.stride * 2 >= self.max_length:
            raise ValueError(
                f"stride = {self.stride} must be less than half of max_length = {self.max_length} "
                "so that each window moves forward; lower task.stride"
            )
        return self


COLUMNS = {"tokens": True, "tags": True}


# ── tag sets ────────────────────────────────────────────────────────────────────────────────────────


def resolve_scheme(requested: str, tags: Sequence[str]) -> Scheme:
    """The scheme in force: ``requested`` unless it is "auto", which detects it from the tag names."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    prefixes = set()
    for tag in tags:
        if tag == "O":
            continue
        match = ENTITY_TAG.match(tag)
        if match is None:
            return "none"
        prefixes.add(match.group(1))
    if not prefixes:
        return "none"
    return "IOBES" if prefixes & {"E", "S"} else "IOB2"


def fallback_tag(labels: Sequence[str], scheme: Scheme) -> str:
    """The tag given to words the model cannot see: "O" for entities, else the first (most frequent) label."""
    return "O" if scheme != "none" else labels[0]


def _complete_entity_tags(tags: set[str], scheme: Literal["IOB2", "IOBES"]) -> list[str]:
    """O first, then every prefix of the scheme for each entity type, types sorted by name."""
    types = sorted({match.group(2) for tag in tags if (match := ENTITY_TAG.match(tag))})
    return ["O"] + [f"{prefix}-{entity_type}" for entity_type in types for prefix in SCHEME_PREFIXES[scheme]]


def _check_scheme(tags: set[str], scheme: Scheme) -> None:
    if scheme == "none":
        return
    allowed = SCHEME_PREFIXES[scheme]
    for tag in sorted(tags):
        match = ENTITY_TAG.match(tag)
        if tag != "O" and (match is None or match.group(1) not in allowed):
            raise DataError(
                f"tag {tag!r} is not an {scheme} tag (O, or {'/'.join(allowed)}-TYPE); set [task] scheme = "
                '"auto" to detect the scheme, or "none" for tags without entity structure'
            )


def _declared_names(train: Any, cfg: TokenClsConfig) -> list[str] | None:
    """Tag names in id order for integer tags: task.label_list, else the dataset's ClassLabel names."""
    if cfg.label_list is not None:
        return list(cfg.label_list)
    feature = train.features.get("tags") if hasattr(train, "features") else None
    names = getattr(getattr(feature, "feature", None), "names", None)
    return list(names) if names else None


def _tag_names(tags: Any, declared: Sequence[str] | None, where: str) -> list[str]:
    """A record's tags as names; integer tags index ``declared``."""
    if not isinstance(tags, (list, tuple)):
        raise DataError(
            f"{where}: tags must be a list (one tag per word), got {type(tags).__name__} {tags!r}"
        )
    names = []
    for tag in tags:
        if isinstance(tag, str):
            names.append(tag)
        elif isinstance(tag, int) and not isinstance(tag, bool):
            if declared is None:
                raise DataError(
                    f"{where}: tags are integers ({tag}) but no tag names are known; list them in id order "
                    'with [task] label_list = ["O", "B-PER", ...]'
                )
            if not 0 <= tag < len(declared):
                raise DataError(
                    f"{where}: tag id {tag} is out of range for the {len(declared)} tag names "
                    f"{list(declared)}"
                )
            names.append(declared[tag])
        else:
            raise DataError(f"{where}: tag {tag!r} is neither a name nor an integer id")
    return names


def _records(split: str, dataset: Any, declared: Sequence[str] | None) -> list[tuple[list[str], list[str]]]:
    """(words, tag names) for every record of a split, checking one tag per word."""
    records = []
    for index, (words, tags) in enumerate(zip(dataset["tokens"], dataset["tags"], strict=True)):
        where = f"{split} split, record {index}"
        if not isinstance(words, (list, tuple)) or not all(isinstance(word, str) for word in words):
            raise DataError(f"{where}: tokens must be a list of words (strings), got {words!r}")
        names = _tag_names(tags, declared, where)
        if len(words) != len(names):
            raise DataError(
                f"{where}: {len(words)} tokens but {len(names)} tags (tokens={list(words)!r}); every word "
                "needs exactly one tag: fix the record or drop it"
            )
        records.append((list(words), names))
    return records


def prepare_labels(raw: Any, cfg: TokenClsConfig) -> tuple[str, ...]:
    """Tag names in id order, checked against every split.

    String tags: for entity schemes "O" then B-/I-(/E-/S-) of each type, complete even when the train
    split lacks some (so ``label_all_tokens`` and the model can use them); otherwise by training frequency
    (most frequent first: it is the fallback tag), ties by name. Integer tags keep the declared id order,
    completed at the end. A validation/test tag outside this set, or a record whose token and tag counts
    differ, is a :class:`DataError` naming the split and record.
    """
    if "train" not in raw:
        raise DataError(f"no train split (found {sorted(raw)}); token classification learns its tags from it")
    declared = _declared_names(raw["train"], cfg)
    split_records = {
        split: _records(split, dataset, declared)
        for split, dataset in raw.items()
        if "tags" in dataset.column_names
    }
    counts = Counter(tag for _, tags in split_records["train"] for tag in tags)
    scheme = resolve_scheme(cfg.scheme, [*counts, *(declared or ())])
    _check_scheme(set(counts) | set(declared or ()), scheme)

    if scheme == "none":
        discovered = sorted(counts, key=lambda tag: (-counts[tag], tag))
    else:
        discovered = _complete_entity_tags(set(counts) | set(declared or ()), scheme)
    labels = list(declared or ()) + [tag for tag in discovered if tag not in (declared or ())]
    if len(labels) < 2:
        raise DataError(f"train split has only the tag(s) {labels}; token classification needs at least 2")

    known = set(labels)
    for split, records in split_records.items():
        for index, (_, tags) in enumerate(records):
            unknown = next((tag for tag in tags if tag not in known), None)
            if unknown is not None:
                raise DataError(
                    f"{split} split, record {index}: tag {unknown!r} does not occur in the train split "
                    f"(known tags: {sorted(known)}). The model cannot learn a tag it never sees: fix the "
                    "tag, add training sentences with it, or list it in [task] label_list"
                )
    return tuple(labels)


# ── words → tokens ──────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Window:
    """One model input: a run of consecutive words of one example, tokenized."""

    example_index: int
    inputs: dict[str, list[int]]  # input_ids, attention_mask (token_type_ids): what the model takes
    word_ids: list[int | None]  # the example's word index of each token; None for special tokens
    owned_word_ids: list[int | None]  # like word_ids, but None for words another window predicts

    def first_token_of_owned_words(self) -> dict[int, int]:
        """word index → position of its first sub-token, for the words this window predicts."""
        positions: dict[int, int] = {}
        for position, word in enumerate(self.owned_word_ids):
            if word is not None and word not in positions:
                positions[word] = position
        return positions


@dataclass(frozen=True)
class EncodedWords:
    windows: list[Window]
    cut_words: int  # words cut off by max_length (truncate mode)
    examples_cut: int
    lost_words: int  # words the tokenizer turned into no token at all


def _require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise PeftkitError(
            f"token classification maps sub-tokens back to words, which needs a fast tokenizer; "
            f"{type(tokenizer).__name__} is a slow one. Use a model that ships tokenizer.json"
        )


def plan_windows(token_counts: Sequence[int], budget: int, stride: int) -> list[tuple[int, int]]:
    """Word ranges ``[start, end)`` covering all words, each at most ``budget`` tokens, ending between words.

    Consecutive windows share the last words of the previous one, up to ``stride`` tokens; a single word
    longer than ``budget`` gets a window of its own (the tokenizer truncates its tail pieces).
    """
    count = len(token_counts)
    windows: list[tuple[int, int]] = []
    start = 0
    while True:
        end, used = start, 0
        while end < count and (end == start or used + token_counts[end] <= budget):
            used += token_counts[end]
            end += 1
        windows.append((start, end))
        if end >= count:
            return windows
        next_start, shared = end, 0
        while next_start - 1 > start and shared + token_counts[next_start - 1] <= stride:
            next_start -= 1
            shared += token_counts[next_start]
        start = next_start


def window_owners(windows: Sequence[tuple[int, int]], word_count: int) -> list[int]:
    """For each word, the window that predicts it: the one giving it the most context on both sides."""
    owners = [0] * word_count
    best_context = [-1] * word_count
    for window_index, (start, end) in enumerate(windows):
        for word in range(start, end):
            context = min(word - start, end - 1 - word)
            if context > best_context[word]:
                owners[word], best_context[word] = window_index, context
    return owners


def needs_leading_spaces(tokenizer: Any) -> bool:
    """Whether pre-split words must carry their leading space to get the pieces they have in running text.

    WordPiece and SentencePiece tokenizers mark word starts themselves when given pre-split words; a
    byte-level BPE one (GPT-2, Llama 3, Qwen, SmolLM) without ``add_prefix_space`` tokenizes each word as if
    it began the text ("world", not "Ġworld"): pieces the model rarely saw mid-sentence. Probed once per
    tokenizer by comparing both forms with the text itself."""
    cached = getattr(tokenizer, "_peftkit_leading_spaces", None)
    if cached is not None:
        return bool(cached)
    words = ["Tagging", "words", "of", "London"]
    text = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    plain = tokenizer(words, is_split_into_words=True, add_special_tokens=False)["input_ids"]
    spaced = tokenizer(with_leading_spaces(words), is_split_into_words=True, add_special_tokens=False)[
        "input_ids"
    ]
    answer = plain != text and spaced == text
    tokenizer._peftkit_leading_spaces = answer
    return answer


def with_leading_spaces(words: Sequence[str]) -> list[str]:
    """Every word but the first with the space that precedes it in running text."""
    return [word if index == 0 else f" {word}" for index, word in enumerate(words)]


def encode_words(word_lists: Sequence[Sequence[str]], tokenizer: Any, cfg: TokenClsConfig) -> EncodedWords:
    """Tokenize pre-split sentences into model windows (one per sentence when truncating)."""
    _require_fast(tokenizer)
    sentences = [list(words) for words in word_lists]
    spaced = needs_leading_spaces(tokenizer)
    if spaced:
        sentences = [with_leading_spaces(words) for words in sentences]
    window_mode = cfg.long_inputs == "window"
    # window mode tokenizes in full first to measure each word; verbose=False silences the
    # "longer than the model's maximum" warning that is expected here.
    encoding = tokenizer(
        sentences,
        is_split_into_words=True,
        truncation=not window_mode,
        max_length=cfg.max_length,
        verbose=False,
    )
    windows: list[Window] = []
    missing: list[tuple[int, int]] = []  # (example, word) pairs without a token in any window
    for example_index, words in enumerate(sentences):
        word_ids = encoding.word_ids(example_index)
        inputs = {key: encoding[key][example_index] for key in encoding}
        if not window_mode or len(word_ids) <= cfg.max_length:
            windows.append(Window(example_index, inputs, word_ids, word_ids))
        else:
            windows += _split_into_windows(example_index, words, word_ids, tokenizer, cfg)
        present = set(word_ids)  # windows are cut between words, so the full encoding tells which words exist
        missing += [(example_index, word) for word in range(len(words)) if word not in present]

    # A missing word is lost (no token even on its own) or was cut by truncation.
    own_tokens = (
        tokenizer(
            [[sentences[example][word]] for example, word in missing],
            is_split_into_words=True,
            add_special_tokens=False,
        )["input_ids"]
        if missing
        else []
    )
    cut = [pair for pair, ids in zip(missing, own_tokens, strict=True) if ids]
    return EncodedWords(
        windows=windows,
        cut_words=len(cut),
        examples_cut=len({example for example, _ in cut}),
        lost_words=len(missing) - len(cut),
    )


def _split_into_windows(
    example_index: int, words: list[str], word_ids: list[int | None], tokenizer: Any, cfg: TokenClsConfig
) -> list[Window]:
    token_counts = Counter(word for word in word_ids if word is not None)
    budget = cfg.max_length - tokenizer.num_special_tokens_to_add(pair=False)
    ranges = plan_windows([token_counts[word] for word in range(len(words))], budget, cfg.stride)
    owners = window_owners(ranges, len(words))
    encoding = tokenizer(
        [words[start:end] for start, end in ranges],
        is_split_into_words=True,
        truncation=True,
        max_length=cfg.max_length,
    )
    windows = []
    for window_index, (start, _) in enumerate(ranges):
        local_ids = encoding.word_ids(window_index)
        absolute = [None if word is None else word + start for word in local_ids]
        owned = [word if word is not None and owners[word] == window_index else None for word in absolute]
        inputs = {key: encoding[key][window_index] for key in encoding}
        windows.append(Window(example_index, inputs, absolute, owned))
    return windows


def _continuation_tag(tag: str, is_last_piece: bool) -> str:
    """The tag of a word's non-first sub-token: inside the same entity, and its end for E-/S- words."""
    match = ENTITY_TAG.match(tag)
    if match is None:
        return tag
    prefix, entity_type = match.groups()
    return f"E-{entity_type}" if prefix in "ES" and is_last_piece else f"I-{entity_type}"


def align_labels_with_tokens(
    word_ids: Sequence[int | None],
    word_labels: Sequence[str],
    label2id: dict[str, int],
    label_all_tokens: bool,
) -> list[int]:
    """Token label ids for one window: the word's tag on its first sub-token, -100 on special tokens.

    Continuation sub-tokens get -100, or with ``label_all_tokens`` a tag that keeps the entity going:
    ``B-X``/``I-X`` → ``I-X``; for ``E-X``/``S-X`` the middle pieces get ``I-X`` and the last one ``E-X``
    (the first piece keeps the word's own tag, since predictions are read from it). A converted tag that
    the label set lacks falls back to the word's tag. Words with no token are simply absent here.
    """
    labels = []
    for position, word in enumerate(word_ids):
        if word is None:
            labels.append(IGNORED_LABEL)
            continue
        tag = word_labels[word]
        if position == 0 or word_ids[position - 1] != word:
            labels.append(label2id[tag])
        elif label_all_tokens:
            is_last_piece = position + 1 == len(word_ids) or word_ids[position + 1] != word
            labels.append(label2id.get(_continuation_tag(tag, is_last_piece), label2id[tag]))
        else:
            labels.append(IGNORED_LABEL)
    return labels


def _warn_unseen_words(encoded: EncodedWords, total_examples: int, cfg: TokenClsConfig, what: str) -> None:
    """Say how many words the model cannot see (they get the fallback tag)."""
    if encoded.cut_words:
        logger.warning(
            "%s: %d word(s) in %d of %d sentences were cut by max_length = %d; they are predicted as the "
            'fallback tag and count as errors. Raise [task] max_length or set long_inputs = "window".',
            what,
            encoded.cut_words,
            encoded.examples_cut,
            total_examples,
            cfg.max_length,
        )
    if encoded.lost_words:
        logger.warning(
            "%s: %d word(s) produce no token at all (only control or zero-width characters); they are "
            "predicted as the fallback tag.",
            what,
            encoded.lost_words,
        )


# ── the task functions ──────────────────────────────────────────────────────────────────────────────


def model_kwargs(ctx: TaskContext) -> dict[str, Any]:
    labels = ctx.labels or ()
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": ctx.label2id}


def _example_tags(tags: Any, ctx: TaskContext) -> list[str]:
    """Tags of one example as names (integer tags are ids into the declared names, which come first)."""
    return [ctx.labels[tag] if isinstance(tag, int) else tag for tag in tags]  # type: ignore[index]


def preprocess(batch: dict[str, list[Any]], ctx: TaskContext, train: bool) -> dict[str, list[Any]]:
    """Tokenize words (no padding) and align tags. Evaluation labels each word in one window only."""
    encoded = encode_words(batch["tokens"], ctx.tokenizer, ctx.cfg)
    _warn_unseen_words(
        encoded, len(batch["tokens"]), ctx.cfg, "tokenizing" if train else "tokenizing for evaluation"
    )
    features: dict[str, list[Any]] = (
        {key: [window.inputs[key] for window in encoded.windows] for key in encoded.windows[0].inputs}
        if encoded.windows
        else {}
    )
    if "tags" in batch:
        label2id = ctx.label2id
        features["labels"] = [
            align_labels_with_tokens(
                window.word_ids if train else window.owned_word_ids,
                _example_tags(batch["tags"][window.example_index], ctx),
                label2id,
                ctx.cfg.label_all_tokens,
            )
            for window in encoded.windows
        ]
    return features


def collator(ctx: TaskContext, model: Any) -> Any:
    from transformers import DataCollatorForTokenClassification

    return DataCollatorForTokenClassification(
        ctx.tokenizer, label_pad_token_id=IGNORED_LABEL, pad_to_multiple_of=None
    )


def _word_predictions(
    encoded: EncodedWords, label_ids_or_logits: Any, word_counts: Sequence[int]
) -> list[dict[int, int]]:
    """Per example: word index → predicted label id, read at the first sub-token in the owning window."""
    import numpy as np

    per_example: list[dict[int, int]] = [{} for _ in word_counts]
    for window, scores in zip(encoded.windows, label_ids_or_logits, strict=True):
        scores = np.asarray(scores)
        for word, position in window.first_token_of_owned_words().items():
            per_example[window.example_index][word] = int(
                scores[position].argmax() if scores.ndim == 2 else scores[position]
            )
    return per_example


def postprocess(
    examples: Any, features: Any, eval_prediction: Any, ctx: TaskContext
) -> tuple[list[list[str]], list[list[str]]]:
    """Logits per window → one predicted tag per word of each example; and the gold tags.

    The windows are rebuilt from ``examples`` with :func:`encode_words` (deterministic, the same call that
    made ``features``), so the features need no bookkeeping columns. Words without a prediction (cut by
    truncation, or dropped by the tokenizer) get the fallback tag.
    """
    predictions = eval_prediction.predictions
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    sentences = [list(words) for words in examples["tokens"]]
    encoded = encode_words(sentences, ctx.tokenizer, ctx.cfg)
    if len(encoded.windows) != len(predictions) or (
        features is not None and len(features) != len(predictions)
    ):
        raise ValueError(
            f"{len(predictions)} predictions for {len(encoded.windows)} windows of {len(sentences)} "
            "examples; "
            "the features must come from token_cls.preprocess over these examples, in order"
        )
    _warn_unseen_words(encoded, len(sentences), ctx.cfg, "evaluation")
    labels = ctx.labels or ()
    fallback = fallback_tag(labels, resolve_scheme(ctx.cfg.scheme, labels))
    predicted_ids = _word_predictions(encoded, predictions, [len(words) for words in sentences])
    predicted = [
        [labels[ids[word]] if word in ids else fallback for word in range(len(words))]
        for ids, words in zip(predicted_ids, sentences, strict=True)
    ]
    references = (
        [_example_tags(tags, ctx) for tags in examples["tags"]] if "tags" in _columns(examples) else []
    )
    return predicted, references


def _columns(examples: Any) -> list[str]:
    return list(getattr(examples, "column_names", None) or examples.keys())


def compute_metrics(
    predictions: Sequence[Any], references: Sequence[Any], ctx: TaskContext
) -> dict[str, float]:
    """``accuracy`` and ``f1`` always (entity F1 for IOB2/IOBES, macro tag F1 otherwise), per-type scores."""
    if not references:
        return {}
    scheme = resolve_scheme(ctx.cfg.scheme, ctx.labels or ())
    if scheme == "none":
        return tag_scores(references, predictions)
    return entity_scores(references, predictions, scheme)


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Raw text → words and their ``(start, end)`` character offsets; punctuation becomes its own word."""
    matches = list(WORD_PATTERN.finditer(text))
    return [match.group() for match in matches], [match.span() for match in matches]


def _record_words(index: int, record: dict[str, Any]) -> tuple[list[str], str, list[tuple[int, int]]]:
    """(words, text, offsets of each word in text) of a predict record with ``tokens`` or ``text``."""
    if "tokens" in record:
        words = record["tokens"]
        if not isinstance(words, (list, tuple)) or not all(isinstance(word, str) for word in words):
            raise DataError(f"record {index}: 'tokens' must be a list of words (strings), got {words!r}")
        offsets, position = [], 0
        for word in words:  # offsets into the words joined by single spaces
            offsets.append((position, position + len(word)))
            position += len(word) + 1
        return list(words), " ".join(words), offsets
    if isinstance(record.get("text"), str):
        words, offsets = split_words(record["text"])
        return words, record["text"], offsets
    raise DataError(
        f"record {index}: needs 'tokens' (a list of words) or 'text' (a string); it has keys {sorted(record)}"
    )


def predict(model: Any, ctx: TaskContext, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tag records ``{"tokens": [...]}`` or ``{"text": "..."}``.

    Each result has ``prediction`` (one tag per word, as in training's predictions file) and ``words``;
    for entity tags also ``entities``: ``{entity, text, start, end, word_start, word_end, score}``, where
    ``text == input[start:end]`` (input = the record's text, or its tokens joined by single spaces),
    ``word_end`` is exclusive and ``score`` is the mean probability of the entity's word tags (each read
    at the word's first sub-token). Entities are decoded strictly, exactly as the F1 metric counts them.
    """
    import torch

    parsed = [_record_words(index, record) for index, record in enumerate(records)]
    encoded = encode_words([words for words, _, _ in parsed], ctx.tokenizer, ctx.cfg)
    _warn_unseen_words(encoded, len(parsed), ctx.cfg, "predict")
    labels = ctx.labels or ()
    scheme = resolve_scheme(ctx.cfg.scheme, labels)
    fallback = fallback_tag(labels, scheme)
    word_tags: list[dict[int, tuple[str, float]]] = [{} for _ in parsed]
    collate = collator(ctx, model)
    device = next(model.parameters()).device
    size = ctx.cfg.predict_batch_size
    model.eval()
    for start in range(0, len(encoded.windows), size):
        chunk = encoded.windows[start : start + size]
        inputs = collate([window.inputs for window in chunk])
        with torch.no_grad():
            probabilities = model(**{key: value.to(device) for key, value in inputs.items()}).logits.float()
        probabilities = probabilities.softmax(dim=-1).cpu()
        for window, window_probabilities in zip(chunk, probabilities, strict=True):
            for word, position in window.first_token_of_owned_words().items():
                score, label_id = window_probabilities[position].max(dim=-1)
                word_tags[window.example_index][word] = (labels[int(label_id)], float(score))

    results = []
    for (words, text, offsets), tags_and_scores in zip(parsed, word_tags, strict=True):
        prediction = [
            tags_and_scores[word][0] if word in tags_and_scores else fallback for word in range(len(words))
        ]
        result: dict[str, Any] = {"prediction": prediction, "words": words}
        if scheme != "none":
            result["entities"] = [
                {
                    "entity": entity_type,
                    "text": text[offsets[first][0] : offsets[end - 1][1]],
                    "start": offsets[first][0],
                    "end": offsets[end - 1][1],
                    "word_start": first,
                    "word_end": end,
                    "score": sum(tags_and_scores[word][1] for word in range(first, end)) / (end - first),
                }
                for entity_type, first, end in decode_entities(prediction, scheme)
            ]
        results.append(result)
    return results


def inference_settings(ctx: TaskContext) -> dict[str, Any]:
    """Entity tags: the token-classification pipeline's ``aggregation_strategy="first"`` reads each word's tag
    at its first sub-token, as training and :func:`predict` do, and groups the words into entities."""
    if resolve_scheme(ctx.cfg.scheme, ctx.labels or ()) == "none":
        return {"word_tag": "first sub-token"}
    return {"aggregation_strategy": "first", "word_tag": "first sub-token"}


def _model_class(model_config: Any) -> Any:
    from transformers import AutoModelForTokenClassification

    return AutoModelForTokenClassification


def score_example(record: dict[str, Any], predicted: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """Error analysis: per-sentence entity F1 (IOB2/IOBES) or word accuracy, lowest first, then most wrong."""
    reference = _example_tags(record["tags"], ctx)
    prediction = list(predicted["prediction"])
    wrong = sum(g != p for g, p in zip(reference, prediction, strict=True))
    scheme = resolve_scheme(ctx.cfg.scheme, ctx.labels or ())
    if scheme == "none":
        score_name, score = "accuracy", 1 - wrong / len(reference) if reference else 1.0
    else:
        gold = set(decode_entities(reference, scheme))
        found = set(decode_entities(prediction, scheme))
        hits = len(gold & found)
        score_name = "f1"
        score = 1.0 if not gold and not found else 2 * hits / (len(gold) + len(found))
    return {
        "tokens": record["tokens"],
        "reference": reference,
        "prediction": prediction,
        "wrong_words": wrong,
        score_name: score,
        "_rank": (score, -wrong),
    }


def is_detail_metric(key: str) -> bool:
    """Per-entity-type scores (``<TYPE>_precision``, ``<TYPE>_f1``, ...)."""
    return key.endswith(("_precision", "_recall", "_f1", "_support"))


TASK = Task(
    name="token_cls",
    description="token classification (NER with IOB2/IOBES tags, POS tagging): one tag per word",
    config_class=TokenClsConfig,
    columns=COLUMNS,
    model_class=_model_class,
    peft_task_type=lambda model_config: "TOKEN_CLS",
    head_modules=("classifier", "score"),  # BERT-style heads; "score" on decoder-only models (Llama, Qwen)
    model_kwargs=model_kwargs,
    prepare_labels=prepare_labels,
    preprocess=preprocess,
    collator=collator,
    postprocess=postprocess,
    compute_metrics=compute_metrics,
    predict=predict,
    primary_metric="f1",
    title="token classification",
    pipeline_task=lambda model_config: "token-classification",
    inference_settings=inference_settings,
    onnx_outputs=("logits",),
    input_columns=("tokens",),
    predict_requires=(("tokens", "text"),),
    score_example=score_example,
    is_detail_metric=is_detail_metric,
    column_kinds={"tokens": "words", "tags": "tags"},
    reference_columns=("tags",),
    produced_metrics=lambda cfg: ("precision", "recall", "f1", "accuracy"),
)
