"""Extractive question answering (SQuAD v1.1, and v2.0 with unanswerable questions).

Examples are SQuAD-shaped: ``id, question, context, answers = {text: [...], answer_start: [...]}`` where
``answer_start`` is the character offset of each answer text in the context; v2.0 marks an unanswerable
question with empty lists. A context longer than ``max_length`` becomes several overlapping windows
(``doc_stride`` tokens of overlap), one feature each. A window's training label is the start/end token of the
first gold answer when the window holds that answer whole, and the CLS token otherwise (and for an
unanswerable question). Decoding searches the ``n_best_size`` best starts and ends of every window of an
example and maps the best span back to characters of the original context.

Bad data is refused, never silently relabelled: an ``answer_start`` that does not point at its answer text,
an empty question or context, or an unanswerable question in a v1.1 recipe raise :class:`DataError` naming the
example ids. A question too long to leave room for its context is truncated, with a warning that counts them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from peftkit.errors import DataError
from peftkit.metrics.squad import f1_score, scorable_golds, squad_metrics
from peftkit.tasks.base import Task, TaskConfig, TaskContext

logger = logging.getLogger(__name__)

COLUMNS = {"id": True, "question": True, "context": True, "answers": True}
# inputs the collator passes to the model; other feature columns (example_id, offsets) stay for decoding
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_LABELS = ("start_positions", "end_positions")
_SHOWN = 5  # problems listed in one error message; the rest are counted


class QAConfig(TaskConfig):
    """``[task] type = "qa"``."""

    type: Literal["qa"] = "qa"
    version_2_with_negative: bool = Field(
        False,
        description="SQuAD v2.0: some questions have no answer (empty answers); the model may answer ''.",
    )
    max_length: int = Field(
        384,
        ge=8,
        le=131072,
        description="Tokens per window (question, context and special tokens); longer contexts are split.",
    )
    doc_stride: int = Field(
        128,
        ge=0,
        description="Context tokens shared by consecutive windows of a context longer than a window.",
    )
    n_best_size: int = Field(
        20, ge=1, description="Best start and end tokens per window searched for a span."
    )
    max_answer_length: int = Field(
        30, ge=1, description="Longest answer, in tokens, considered when decoding."
    )
    null_score_diff_threshold: float = Field(
        0.0,
        description="v2.0: answer '' when the no-answer score beats the best span's score by more than this.",
    )
    predict_batch_size: int = Field(32, ge=1, description="Windows per forward pass in `peftkit predict`.")

    @model_validator(mode="after")
    def _stride_leaves_room(self) -> QAConfig:
        # Each window keeps at least 2 × doc_stride context tokens, so windows advance by at least doc_stride.
        if 2 * self.doc_stride >= self.max_length:
            raise ValueError(
                f"doc_stride = {self.doc_stride} must be less than half of max_length = {self.max_length}; "
                "lower doc_stride or raise max_length"
            )
        return self


@dataclass(frozen=True)
class QAPrediction:
    """The decoded answer of one example: a character span of its context, or no answer."""

    example_id: str
    text: str  # "" for no answer
    start: int | None  # character offsets in the context, end exclusive; None for no answer
    end: int | None
    score: float  # start + end logit of the chosen answer (the no-answer score when no answer is chosen)
    null_score: float | None  # lowest CLS start + end logit over the example's windows
    best_span_score: float | None  # best span's score whether chosen or not; None when no span was valid

    @property
    def is_null(self) -> bool:
        return self.start is None


def _error_list(header: str, problems: list[str], hint: str) -> DataError:
    shown = "\n".join(f"  {p}" for p in problems[:_SHOWN])
    more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    return DataError(f"{header}:\n{shown}{more}\n{hint}")


def _answer_lists(answers: Any, example_id: str) -> tuple[list[Any], list[Any]]:
    """(texts, starts) from SQuAD's {text: [...], answer_start: [...]} or a list of {text, answer_start}."""
    if answers is None:
        return [], []
    if isinstance(answers, dict) and "text" in answers and "answer_start" in answers:
        return list(answers["text"] or []), list(answers["answer_start"] or [])
    if isinstance(answers, list) and all(isinstance(a, dict) and "text" in a for a in answers):
        return [a["text"] for a in answers], [a.get("answer_start") for a in answers]
    raise DataError(
        f"example {example_id!r}: answers = {answers!r} is not in SQuAD form; "
        'write answers as {"text": ["..."], "answer_start": [<character offset>]}'
    )


def _gold_spans(
    ids: list[str], contexts: list[str], answers: list[Any], allow_unanswerable: bool
) -> list[list[tuple[int, int]]]:
    """Character spans (start, end) of every gold answer, checked against its context."""
    spans: list[list[tuple[int, int]]] = []
    mismatched: list[str] = []
    unanswerable: list[str] = []
    for example_id, context, raw in zip(ids, contexts, answers, strict=True):
        texts, starts = _answer_lists(raw, example_id)
        if len(texts) != len(starts):
            raise DataError(
                f"example {example_id!r}: {len(texts)} answer texts but {len(starts)} answer_start values; "
                "give one answer_start per answer text"
            )
        if not texts:
            unanswerable.append(example_id)
        example_spans = []
        for text, start in zip(texts, starts, strict=True):
            valid_start = isinstance(start, int) and not isinstance(start, bool)
            if not isinstance(text, str) or not text or not valid_start:
                mismatched.append(f"example {example_id!r}: answer {text!r} with answer_start={start!r}")
                continue
            found = context[start : start + len(text)]
            if found != text:
                where = context.find(text)
                located = (
                    f"the text first occurs at {where}" if where >= 0 else "the text is not in the context"
                )
                mismatched.append(
                    f"example {example_id!r}: answer {text!r} at answer_start={start} "
                    f"reads {found!r} in the context; {located}"
                )
                continue
            example_spans.append((start, start + len(text)))
        spans.append(example_spans)
    if mismatched:
        raise _error_list(
            f"{len(mismatched)} answer(s) do not match their context",
            mismatched,
            "answer_start must be the offset of the answer text in the context, in characters counted from 0 "
            "(not bytes or words); fix these rows or remove them",
        )
    if unanswerable and not allow_unanswerable:
        raise _error_list(
            f"{len(unanswerable)} question(s) have no answer but [task] version_2_with_negative = false",
            [f"example {example_id!r}" for example_id in unanswerable],
            "set [task] version_2_with_negative = true for SQuAD v2.0 data, or give every question an answer",
        )
    return spans


def _check_texts(ids: list[str], questions: list[Any], contexts: list[Any]) -> None:
    problems = [
        f"example {example_id!r}: empty {name}"
        for example_id, question, context in zip(ids, questions, contexts, strict=True)
        for name, text in (("question", question), ("context", context))
        if not isinstance(text, str) or not text.strip()
    ]
    if problems:
        raise _error_list(
            f"{len(problems)} empty question(s) or context(s)",
            problems,
            "every example needs a question and the context that holds its answer; check [data] columns",
        )


def _fit_questions(questions: list[str], ids: list[str], tokenizer: Any, cfg: QAConfig) -> list[str]:
    """Cut questions whose tokens would leave a window fewer than 2 × doc_stride context tokens.

    The tokenizer cannot split a context into windows when the question fills the window (it fails with a
    Rust panic), so long questions are shortened here, at a token boundary, and counted in a warning.
    """
    special = tokenizer.num_special_tokens_to_add(pair=True)
    budget = cfg.max_length - special - max(2 * cfg.doc_stride, 1)
    if budget < 1:
        raise DataError(
            f"[task] max_length = {cfg.max_length} leaves no room for a question: a window holds {special} "
            f"special tokens and at least 2 × doc_stride = {2 * cfg.doc_stride} context tokens; "
            "raise max_length or lower doc_stride"
        )
    fitted = list(questions)
    cut: list[str] = []
    lengths = [len(ids_) for ids_ in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    for i, length in enumerate(lengths):
        if length <= budget:
            continue
        encoded = tokenizer(fitted[i], add_special_tokens=False, return_offsets_mapping=True)
        while len(encoded["input_ids"]) > budget:
            # cut after the budget-th token; re-tokenizing a prefix may merge differently (BPE), so re-check,
            # always dropping at least one character so the loop ends
            end = encoded["offset_mapping"][budget - 1][1]
            fitted[i] = fitted[i][: min(end, len(fitted[i]) - 1)]
            encoded = tokenizer(fitted[i], add_special_tokens=False, return_offsets_mapping=True)
        cut.append(ids[i])
    if cut:
        logger.warning(
            "%d of %d questions are longer than %d tokens and were truncated to leave room for the context "
            "(max_length = %d, doc_stride = %d); examples: %s. Raise [task] max_length, or check that "
            "[data] columns does not swap question and context",
            len(cut),
            len(questions),
            budget,
            cfg.max_length,
            cfg.doc_stride,
            ", ".join(repr(i) for i in cut[:_SHOWN]),
        )
    return fitted


def _cls_index(input_ids: list[int], tokenizer: Any) -> int:
    """Where a window's no-answer label points: its CLS token, or the first token for models without one."""
    cls_id = tokenizer.cls_token_id
    if cls_id is not None and cls_id in input_ids:
        return input_ids.index(cls_id)
    return 0


def _token_span(
    span: tuple[int, int], offsets: list[tuple[int, int]], context_tokens: list[int]
) -> tuple[int, int] | None:
    """Start/end token of a character span when this window's context holds all of it, else None."""
    start_char, end_char = span
    first, last = context_tokens[0], context_tokens[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return None
    start_token = next(t for t in context_tokens if offsets[t][1] > start_char)
    end_token = next(t for t in reversed(context_tokens) if offsets[t][0] < end_char)
    return start_token, end_token


def preprocess(batch: dict[str, list[Any]], ctx: TaskContext, train: bool) -> dict[str, list[Any]]:
    """Examples → window features with start/end labels; evaluation features also map back to examples.

    Evaluation features (``train=False``) carry ``example_id``, ``offset_mapping`` (character offsets for
    context tokens, None elsewhere) and ``cls_index`` for decoding, and labels too when the batch has
    answers, so that the evaluation loss exists. Features are not padded: the collator pads each batch.
    A tokenizer that pads on the left puts the context first (XLNet's convention), otherwise the question.
    """
    cfg: QAConfig = ctx.cfg
    tokenizer = ctx.tokenizer
    ids = [str(i) for i in batch["id"]]
    questions = batch["question"]
    contexts = batch["context"]
    _check_texts(ids, questions, contexts)
    answers = batch.get("answers")
    if answers is None and train:
        raise DataError("training examples need an 'answers' column; map yours with [data] columns")
    spans = _gold_spans(ids, contexts, answers, cfg.version_2_with_negative) if answers is not None else None
    # SQuAD has questions with leading spaces; they only waste window tokens
    questions = _fit_questions([q.strip() for q in questions], ids, tokenizer, cfg)

    context_first = tokenizer.padding_side == "left"
    context_sequence = 0 if context_first else 1
    encoded = tokenizer(
        contexts if context_first else questions,
        questions if context_first else contexts,
        truncation="only_first" if context_first else "only_second",
        max_length=cfg.max_length,
        stride=cfg.doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    example_of_feature = encoded["overflow_to_sample_mapping"]
    features: dict[str, list[Any]] = {key: list(encoded[key]) for key in _MODEL_INPUTS if key in encoded}
    starts: list[int] = []
    ends: list[int] = []
    example_ids: list[str] = []
    offset_mapping: list[list[tuple[int, int] | None]] = []
    cls_indices: list[int] = []
    for feature, example in enumerate(example_of_feature):
        sequence_ids = encoded.sequence_ids(feature)
        offsets = [tuple(o) for o in encoded["offset_mapping"][feature]]
        cls_index = _cls_index(features["input_ids"][feature], tokenizer)
        context_tokens = [t for t, s in enumerate(sequence_ids) if s == context_sequence]
        if spans is not None:
            gold = spans[example]
            token_span = _token_span(gold[0], offsets, context_tokens) if gold and context_tokens else None
            start, end = token_span if token_span is not None else (cls_index, cls_index)
            starts.append(start)
            ends.append(end)
        if not train:
            example_ids.append(ids[example])
            offset_mapping.append(
                [o if s == context_sequence else None for o, s in zip(offsets, sequence_ids, strict=True)]
            )
            cls_indices.append(cls_index)
    if spans is not None:
        features["start_positions"] = starts
        features["end_positions"] = ends
    if not train:
        features["example_id"] = example_ids
        features["offset_mapping"] = offset_mapping
        features["cls_index"] = cls_indices
    return features


def collator(ctx: TaskContext, model: Any) -> Any:
    """Pad each batch on the right, whatever the tokenizer's padding side.

    Right padding keeps a logit's position equal to its token's position in the feature, so decoding needs
    no shift (and the Trainer's -100 padding across batches also sits on the right). It is correct for a
    single forward pass of both bidirectional and causal models, given the attention mask.
    """
    pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(row["input_ids"]) for row in rows)
        batch: dict[str, Any] = {}
        for key, fill in zip(_MODEL_INPUTS, (pad_id, 0, 0), strict=True):
            if key in rows[0]:
                batch[key] = torch.tensor([list(r[key]) + [fill] * (longest - len(r[key])) for r in rows])
        for key in _LABELS:
            if key in rows[0]:
                batch[key] = torch.tensor([r[key] for r in rows])
        return batch

    return collate


def _column(table: Any, name: str) -> list[Any] | None:
    """A column of a datasets.Dataset or a dict of lists, None when absent."""
    names = table.column_names if hasattr(table, "column_names") else table.keys()
    return list(table[name]) if name in names else None


def _best_span(
    start_logits: Any, end_logits: Any, valid: Any, n_best_size: int, max_answer_length: int
) -> tuple[float, int, int] | None:
    """(score, start token, end token) of the best valid span among the n-best starts and ends."""
    import numpy as np

    masked_starts = np.where(valid, start_logits, -np.inf)
    masked_ends = np.where(valid, end_logits, -np.inf)
    top_starts = np.argsort(masked_starts)[::-1][:n_best_size]
    top_ends = np.argsort(masked_ends)[::-1][:n_best_size]
    top_starts = top_starts[valid[top_starts]]
    top_ends = top_ends[valid[top_ends]]
    if not len(top_starts) or not len(top_ends):
        return None
    scores = start_logits[top_starts][:, None] + end_logits[top_ends][None, :]
    lengths = top_ends[None, :] - top_starts[:, None] + 1
    scores = np.where((lengths >= 1) & (lengths <= max_answer_length), scores, -np.inf)
    best = np.unravel_index(int(np.argmax(scores)), scores.shape)
    if not np.isfinite(scores[best]):
        return None
    return float(scores[best]), int(top_starts[best[0]]), int(top_ends[best[1]])


def decode_answers(
    cfg: QAConfig, examples: Any, features: Any, start_logits: Any, end_logits: Any
) -> list[QAPrediction]:
    """The best answer per example under the task's decoding settings (``[task]`` n-best, length, v2)."""
    return postprocess_qa_predictions(
        examples,
        features,
        start_logits,
        end_logits,
        n_best_size=cfg.n_best_size,
        max_answer_length=cfg.max_answer_length,
        version_2_with_negative=cfg.version_2_with_negative,
        null_score_diff_threshold=cfg.null_score_diff_threshold,
    )


def postprocess_qa_predictions(
    examples: Any,
    features: Any,
    start_logits: Sequence[Any],
    end_logits: Sequence[Any],
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> list[QAPrediction]:
    """Decode one answer per example (in example order) from the logits of all its windows.

    ``examples`` has ``id`` and ``context``; ``features`` has ``example_id``, ``offset_mapping`` (None for
    tokens outside the context) and optionally ``cls_index`` (default 0); both may be a datasets.Dataset or
    a dict of lists. ``start_logits[i]``/``end_logits[i]`` belong to feature ``i``; positions past the
    feature's length (the Trainer's -100 padding) are ignored. The best span maximises start + end logit
    over the n-best starts and ends of every window, ending after it starts, at most ``max_answer_length``
    tokens long. With ``version_2_with_negative`` the answer is '' when the lowest no-answer (CLS) score over
    the windows exceeds the best span's score by more than ``null_score_diff_threshold``.
    """
    import numpy as np

    example_ids = [str(i) for i in examples["id"]]
    contexts = list(examples["context"])
    index_of: dict[str, int] = {}
    for index, example_id in enumerate(example_ids):
        if example_id in index_of:
            raise DataError(
                f"example id {example_id!r} occurs more than once; every example needs its own id"
            )
        index_of[example_id] = index
    feature_example_ids = _column(features, "example_id")
    feature_offsets = _column(features, "offset_mapping")
    if feature_example_ids is None or feature_offsets is None:
        raise ValueError("features need 'example_id' and 'offset_mapping': preprocess them with train=False")
    cls_indices = _column(features, "cls_index") or [0] * len(feature_example_ids)
    if not len(start_logits) == len(end_logits) == len(feature_example_ids):
        raise ValueError(
            f"{len(start_logits)} start and {len(end_logits)} end logit rows for "
            f"{len(feature_example_ids)} features"
        )
    windows: list[list[int]] = [[] for _ in example_ids]
    for feature, example_id in enumerate(feature_example_ids):
        if example_id not in index_of:
            raise ValueError(f"feature {feature} belongs to example {example_id!r}, which is not in examples")
        windows[index_of[example_id]].append(feature)

    results = []
    for index, example_id in enumerate(example_ids):
        best: tuple[float, int, int] | None = None  # score, start char, end char
        null_score: float | None = None
        for feature in windows[index]:
            offsets = feature_offsets[feature]
            length = len(offsets)
            starts = np.asarray(start_logits[feature], dtype=np.float64)[:length]
            ends = np.asarray(end_logits[feature], dtype=np.float64)[:length]
            if len(starts) < length or len(ends) < length:
                raise ValueError(f"feature {feature} has {length} tokens but fewer logits")
            cls_index = cls_indices[feature]
            feature_null = float(starts[cls_index] + ends[cls_index])
            null_score = feature_null if null_score is None else min(null_score, feature_null)
            valid = np.array([o is not None for o in offsets], dtype=bool)
            span = _best_span(starts, ends, valid, n_best_size, max_answer_length)
            if span is not None and (best is None or span[0] > best[0]):
                best = (span[0], int(offsets[span[1]][0]), int(offsets[span[2]][1]))
        answer_null = best is None or (
            version_2_with_negative
            and null_score is not None
            and null_score - best[0] > null_score_diff_threshold
        )
        if best is None or answer_null:
            score = null_score if null_score is not None else float("-inf")
            results.append(
                QAPrediction(example_id, "", None, None, score, null_score, best[0] if best else None)
            )
        else:
            score = best[0]
            start, end = _snap_to_words(contexts[index], best[1], best[2])
            results.append(
                QAPrediction(example_id, contexts[index][start:end], start, end, score, null_score, score)
            )
    return results


def _is_word_char(char: str) -> bool:
    """A letter or digit of a script that separates words with spaces.

    Thai, Lao and the CJK scripts (U+2E80 on) write words without spaces, so a run of their letters is not one
    word and is never snapped to.
    """
    code = ord(char)
    return char.isalnum() and not 0x0E00 <= code <= 0x0EFF and code < 0x2E80


def _snap_to_words(context: str, start: int, end: int) -> tuple[int, int]:
    """``[start, end)`` widened to the whole words it cuts, and without surrounding whitespace.

    A span's ends are token offsets, and a sub-word token can start or end inside a word: "rosene" from
    "kerosene" scores 0 against the gold "kerosene" in SQuAD's exact match and F1, which compare whole words.
    """
    while start < end and context[start].isspace():
        start += 1
    while end > start and context[end - 1].isspace():
        end -= 1
    if start < end:
        while start > 0 and _is_word_char(context[start]) and _is_word_char(context[start - 1]):
            start -= 1
        while end < len(context) and _is_word_char(context[end - 1]) and _is_word_char(context[end]):
            end += 1
    return start, end


def _start_end_logits(predictions: Any) -> tuple[Any, Any]:
    import numpy as np

    if isinstance(predictions, (tuple, list)) and len(predictions) >= 2:
        return predictions[0], predictions[1]
    array = np.asarray(predictions)
    if array.ndim == 3 and array.shape[0] == 2:
        return array[0], array[1]
    raise ValueError(
        f"QA predictions must be (start_logits, end_logits); got {type(predictions).__name__} "
        f"of shape {getattr(array, 'shape', None)}"
    )


def postprocess(
    examples: Any, features: Any, eval_prediction: Any, ctx: TaskContext
) -> tuple[list[Any], list[Any]]:
    """Answer strings per example, and the gold answer texts per example ([] for unanswerable)."""
    cfg: QAConfig = ctx.cfg
    start_logits, end_logits = _start_end_logits(eval_prediction.predictions)
    decoded = decode_answers(cfg, examples, features, start_logits, end_logits)
    answers = _column(examples, "answers")
    ids = [str(i) for i in examples["id"]]
    references = (
        [[str(t) for t in _answer_lists(a, i)[0]] for a, i in zip(answers, ids, strict=True)]
        if answers
        else []
    )
    return [d.text for d in decoded], references


def compute_metrics(
    predictions: Sequence[Any], references: Sequence[Any], ctx: TaskContext
) -> dict[str, float]:
    """SQuAD exact match and F1 (0-100); with v2.0 also the answerable / unanswerable splits."""
    if not references:
        return {}
    return squad_metrics(predictions, references, with_no_answer_splits=ctx.cfg.version_2_with_negative)


def predict(model: Any, ctx: TaskContext, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Answer records ``{question, context}``: ``{prediction, start, end, score}`` in context characters.

    No answer (v2.0) is ``prediction = ""`` with ``start = end = None``. ``score`` is the chosen answer's
    start + end logit. Runs the same windowing and decoding as evaluation, under ``torch.no_grad()``.
    """
    import torch

    cfg: QAConfig = ctx.cfg
    for i, record in enumerate(records):
        missing = [key for key in ("question", "context") if not isinstance(record.get(key), str)]
        if missing:
            raise DataError(
                f"record {i}: {' and '.join(missing)} missing or not text; give {{question, context}}"
            )
    if not records:
        return []
    examples = {
        "id": [str(i) for i in range(len(records))],
        "question": [r["question"] for r in records],
        "context": [r["context"] for r in records],
    }
    features = preprocess(examples, ctx, train=False)
    collate = collator(ctx, model)
    device = next(model.parameters()).device
    n_features = len(features["input_ids"])
    start_logits: list[Any] = []
    end_logits: list[Any] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in range(0, n_features, cfg.predict_batch_size):
                rows = [
                    {key: features[key][f] for key in _MODEL_INPUTS if key in features}
                    for f in range(first, min(first + cfg.predict_batch_size, n_features))
                ]
                inputs = {key: value.to(device) for key, value in collate(rows).items()}
                outputs = model(**inputs)
                start_logits.extend(outputs.start_logits.float().cpu().numpy())
                end_logits.extend(outputs.end_logits.float().cpu().numpy())
    finally:
        model.train(was_training)
    decoded = decode_answers(cfg, examples, features, start_logits, end_logits)
    return [{"prediction": d.text, "start": d.start, "end": d.end, "score": d.score} for d in decoded]


def inference_settings(ctx: TaskContext) -> dict[str, Any]:
    """The span decoding of :func:`postprocess_qa_predictions`, which a user of the weights must repeat."""
    cfg: QAConfig = ctx.cfg
    return {
        "doc_stride": cfg.doc_stride,
        "n_best_size": cfg.n_best_size,
        "max_answer_length": cfg.max_answer_length,
        "version_2_with_negative": cfg.version_2_with_negative,
        "null_score_diff_threshold": cfg.null_score_diff_threshold,
    }


def _model_class(model_config: Any) -> Any:
    from transformers import AutoModelForQuestionAnswering

    return AutoModelForQuestionAnswering


def score_example(record: dict[str, Any], predicted: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """Error analysis: per-question F1 against the best gold answer (SQuAD normalisation)."""
    golds = list((record.get("answers") or {}).get("text") or [])
    answer = str(predicted["prediction"])
    score = max(f1_score(answer, gold) for gold in scorable_golds(golds))
    return {
        "id": record.get("id"),
        "question": record["question"],
        "context": record["context"],
        "reference": golds,
        "prediction": answer,
        "f1": score,
        "_rank": (score,),
    }


def is_detail_metric(key: str) -> bool:
    """The SQuAD v2.0 split scores (``HasAns_exact``, ``NoAns_f1``, ``HasAns_total``, ...)."""
    return key.endswith(("_exact", "_f1", "_total"))


TASK = Task(
    name="qa",
    description="extractive question answering (SQuAD v1.1; v2.0 unanswerable questions with "
    "version_2_with_negative)",
    config_class=QAConfig,
    columns=COLUMNS,
    model_class=_model_class,
    # Not "QUESTION_ANS": peft 0.21.2's PeftModelForQuestionAnswering.forward drops token_type_ids and
    # position_ids, so BERT-style models would train on all-zero segment ids and disagree with the merged
    # model. A plain PeftModel passes every input through; qa_outputs is saved via head_modules.
    peft_task_type=lambda model_config: None,
    head_modules=("qa_outputs",),
    model_kwargs=lambda ctx: {},
    prepare_labels=lambda raw, cfg: None,
    preprocess=preprocess,
    collator=collator,
    postprocess=postprocess,
    compute_metrics=compute_metrics,
    predict=predict,
    primary_metric="f1",
    score_scale="0-100",
    title="extractive question answering",
    usage_note="# transformers 5 has no question-answering pipeline: `peftkit predict` decodes spans",
    inference_settings=inference_settings,
    onnx_outputs=("start_logits", "end_logits"),
    input_columns=("id", "question", "context"),
    predict_requires=(("question",), ("context",)),
    score_example=score_example,
    is_detail_metric=is_detail_metric,
    column_kinds={"id": "id", "question": "text", "context": "text", "answers": "answers"},
    reference_columns=("answers",),
    produced_metrics=lambda cfg: ("exact_match", "f1"),
)
