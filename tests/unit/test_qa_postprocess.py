"""Span decoding: gold ("oracle") logits through the real windowing must give exact match 100.

The oracle logits are placed by this test from the features' own character offsets, not from the labels
that ``preprocess`` computes, so a wrong label, a wrong offset or a wrong window-to-example map each fails.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from peftkit.errors import DataError
from peftkit.metrics.squad import squad_metrics
from peftkit.tasks.base import TaskContext
from peftkit.tasks.qa import QAConfig, postprocess, postprocess_qa_predictions, preprocess
from tests.conftest import FIXTURES, REPO, minilm_path

LONG = FIXTURES / "qa" / "long_contexts.jsonl"


def read_batch(path: Path, answerable_only: bool = False) -> dict[str, list[Any]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if answerable_only:
        rows = [r for r in rows if r["answers"]["text"]]
    return {key: [r[key] for r in rows] for key in rows[0]}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def context(tokenizer: Any, **cfg: Any) -> TaskContext:
    return TaskContext(cfg=QAConfig(max_length=64, doc_stride=16, **cfg), tokenizer=tokenizer, labels=None)


def gold_tokens(offsets: list[Any], start_char: int, end_char: int) -> tuple[int, int] | None:
    """The first and last context tokens of [start_char, end_char) if this window holds all of it."""
    inside = [t for t, o in enumerate(offsets) if o is not None]
    if offsets[inside[0]][0] > start_char or offsets[inside[-1]][1] < end_char:
        return None
    covering = [t for t in inside if offsets[t][0] < end_char and offsets[t][1] > start_char]
    return covering[0], covering[-1]


def oracle_logits(
    batch: dict[str, list[Any]], features: dict[str, list[Any]], pad_to: int
) -> tuple[Any, Any]:
    """High start/end logits at the gold tokens of windows that hold the answer, high CLS elsewhere.

    Rows are padded with -100 up to ``pad_to`` as the Trainer does when batches differ in length.
    """
    spans = {
        i: (a["answer_start"][0], a["answer_start"][0] + len(a["text"][0])) if a["text"] else None
        for i, a in zip(batch["id"], batch["answers"], strict=True)
    }
    n = len(features["input_ids"])
    starts = np.full((n, pad_to), -100.0, dtype=np.float32)
    ends = np.full((n, pad_to), -100.0, dtype=np.float32)
    for f, (example_id, offsets) in enumerate(
        zip(features["example_id"], features["offset_mapping"], strict=True)
    ):
        length = len(offsets)
        starts[f, :length] = 0.0
        ends[f, :length] = 0.0
        span = spans[example_id]
        tokens = gold_tokens(offsets, *span) if span else None
        start, end = tokens if tokens else (features["cls_index"][f], features["cls_index"][f])
        starts[f, start] = 10.0
        ends[f, end] = 10.0
    return starts, ends


def window_coverage(
    batch: dict[str, list[Any]], features: dict[str, list[Any]]
) -> dict[str, tuple[int, int]]:
    """Per answerable example: index of the first window holding the answer whole, and of the first
    window holding part of it (or -1)."""
    out = {}
    for example_id, answers in zip(batch["id"], batch["answers"], strict=True):
        if not answers["text"]:
            continue
        start = answers["answer_start"][0]
        end = start + len(answers["text"][0])
        windows = [f for f, e in enumerate(features["example_id"]) if e == example_id]
        full = partial = -1
        for k, f in enumerate(windows):
            inside = [o for o in features["offset_mapping"][f] if o is not None]
            lo, hi = inside[0][0], inside[-1][1]
            if lo <= start and end <= hi:
                full = k if full < 0 else full
            elif lo < end and start < hi and partial < 0:
                partial = k
        out[example_id] = (full, partial)
    return out


def test_oracle_on_contexts_longer_than_a_window(tokenizer: Any) -> None:
    batch = read_batch(LONG, answerable_only=True)
    ctx = context(tokenizer)
    features = preprocess(batch, ctx, train=False)
    # the data exercises what the test is about: many windows, answers in later windows, and answers cut
    # by a window edge so that only a later window holds them whole
    coverage = window_coverage(batch, features)
    assert max(features["example_id"].count(i) for i in batch["id"]) >= 8
    assert sum(full >= 2 for full, _ in coverage.values()) >= 10
    straddling = [i for i, (full, partial) in coverage.items() if 0 <= partial < full]
    assert len(straddling) >= 2, coverage
    assert all(len(ids) <= 64 for ids in features["input_ids"])

    starts, ends = oracle_logits(batch, features, pad_to=64)
    decoded = postprocess_qa_predictions(batch, features, starts, ends)
    references = [a["text"] for a in batch["answers"]]
    assert squad_metrics([d.text for d in decoded], references) == {"exact_match": 100.0, "f1": 100.0}
    # the exact first gold answer, at its own character offset (not just a normalised match)
    for d, answers in zip(decoded, batch["answers"], strict=True):
        assert (d.text, d.start) == (answers["text"][0], answers["answer_start"][0])
        assert d.end == d.start + len(d.text)


def test_oracle_through_postprocess_with_trainer_padding(tokenizer: Any) -> None:
    """``postprocess`` takes the Trainer's EvalPrediction, rows padded with -100 past every feature."""
    from transformers import EvalPrediction

    batch = read_batch(LONG, answerable_only=True)
    ctx = context(tokenizer)
    features = preprocess(batch, ctx, train=False)
    starts, ends = oracle_logits(batch, features, pad_to=80)
    prediction = EvalPrediction(predictions=(starts, ends), label_ids=None)
    predictions, references = postprocess(batch, features, prediction, ctx)
    assert predictions == [a["text"][0] for a in batch["answers"]]
    assert references == [a["text"] for a in batch["answers"]]


def test_oracle_v2_with_unanswerable_questions(tokenizer: Any) -> None:
    batch = read_batch(LONG)
    ctx = context(tokenizer, version_2_with_negative=True)
    features = preprocess(batch, ctx, train=False)
    starts, ends = oracle_logits(batch, features, pad_to=64)
    decoded = postprocess_qa_predictions(batch, features, starts, ends, version_2_with_negative=True)
    references = [a["text"] for a in batch["answers"]]
    result = squad_metrics([d.text for d in decoded], references, with_no_answer_splits=True)
    assert result["NoAns_total"] == 2.0
    assert result["exact_match"] == result["HasAns_exact"] == result["NoAns_exact"] == 100.0
    assert all(d.start is None for d, r in zip(decoded, references, strict=True) if not r)


def test_oracle_on_the_shipped_fixture(tokenizer: Any) -> None:
    batch = read_batch(REPO / "data" / "qa_fixture" / "v2" / "train.jsonl")
    ctx = context(tokenizer, version_2_with_negative=True)
    features = preprocess(batch, ctx, train=False)
    starts, ends = oracle_logits(batch, features, pad_to=64)
    decoded = postprocess_qa_predictions(batch, features, starts, ends, version_2_with_negative=True)
    references = [a["text"] for a in batch["answers"]]
    assert squad_metrics([d.text for d in decoded], references)["exact_match"] == 100.0


def test_training_labels_match_the_independent_oracle(tokenizer: Any) -> None:
    batch = read_batch(LONG)
    ctx = context(tokenizer, version_2_with_negative=True)
    evaluation = preprocess(batch, ctx, train=False)
    training = preprocess(batch, ctx, train=True)
    assert training["input_ids"] == evaluation["input_ids"]
    assert "example_id" not in training and "offset_mapping" not in training
    starts, ends = oracle_logits(batch, evaluation, pad_to=64)
    assert training["start_positions"] == evaluation["start_positions"] == starts.argmax(axis=1).tolist()
    assert training["end_positions"] == evaluation["end_positions"] == ends.argmax(axis=1).tolist()
    assert any(s == 0 for s in training["start_positions"]) and any(
        s > 0 for s in training["start_positions"]
    )


# --- decoding rules, on hand-made features -------------------------------------------------------

CONTEXT = "alpha beta gamma delta epsilon"
# token 0 is CLS, 1-2 are question tokens (no offsets), 3.. are the five context words
OFFSETS = [None, None, None, (0, 5), (6, 10), (11, 16), (17, 22), (23, 30)]


def one_example(start_logits: list[float], end_logits: list[float], **kwargs: Any) -> Any:
    examples = {"id": ["q"], "context": [CONTEXT]}
    features = {"example_id": ["q"], "offset_mapping": [OFFSETS], "cls_index": [0]}
    return postprocess_qa_predictions(
        examples, features, np.array([start_logits]), np.array([end_logits]), **kwargs
    )[0]


def test_best_valid_span() -> None:
    decoded = one_example([0, 0, 0, 1, 5, 0, 0, 0], [0, 0, 0, 0, 0, 6, 0, 0])
    assert (decoded.text, decoded.start, decoded.end, decoded.score) == ("beta gamma", 6, 16, 11.0)


def test_tokens_outside_the_context_are_never_chosen() -> None:
    # the highest logits sit on CLS and the question tokens
    decoded = one_example([9, 9, 9, 0, 1, 0, 0, 0], [9, 9, 9, 0, 1, 0, 0, 0])
    assert decoded.text == "beta"


def test_end_before_start_and_too_long_spans_are_skipped() -> None:
    # best start is "delta", best end "beta" (before it): the valid best is start beta .. end beta
    decoded = one_example([0, 0, 0, 0, 4, 0, 5, 0], [0, 0, 0, 0, 5, 0, 0, 0])
    assert decoded.text == "beta"
    # alpha..epsilon scores highest but is 5 tokens long; with max_answer_length 2 the best is delta..epsilon
    decoded = one_example([0, 0, 0, 5, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 0, 5], max_answer_length=2)
    assert decoded.text == "delta epsilon"


def test_n_best_size_limits_the_search() -> None:
    # the best end ("alpha") needs the 3rd-best start; with n_best_size 1 the only pair ends before it starts
    start_logits = [0, 0, 0, 1, 2, 3, -5, -5]
    end_logits = [0, 0, 0, 9, -9, -9, -9, -9]
    assert one_example(start_logits, end_logits, n_best_size=3).text == "alpha"
    decoded = one_example(start_logits, end_logits, n_best_size=1)
    assert decoded.text == "" and decoded.best_span_score is None


def test_null_threshold_v2() -> None:
    start_logits = [3, 0, 0, 0, 2, 0, 0, 0]  # null score 3 + 3 = 6; best span "beta" 2 + 2 = 4
    end_logits = [3, 0, 0, 0, 2, 0, 0, 0]
    assert one_example(start_logits, end_logits, version_2_with_negative=False).text == "beta"
    decoded = one_example(start_logits, end_logits, version_2_with_negative=True)
    assert (decoded.text, decoded.start, decoded.score, decoded.null_score) == ("", None, 6.0, 6.0)
    assert decoded.best_span_score == 4.0
    # the null answer must win by more than the threshold (6 - 4 = 2)
    assert one_example(
        start_logits, end_logits, version_2_with_negative=True, null_score_diff_threshold=2.5
    ).text
    assert not one_example(
        start_logits, end_logits, version_2_with_negative=True, null_score_diff_threshold=1.5
    ).text


def test_best_span_over_all_windows_and_lowest_null() -> None:
    examples = {"id": ["q"], "context": [CONTEXT]}
    window_offsets = [[None, (0, 5), (6, 10), None], [None, (11, 16), (17, 22), None]]
    features = {"example_id": ["q", "q"], "offset_mapping": window_offsets}  # no cls_index: CLS is 0
    starts = np.array([[1, 2, 0, -100, -100], [4, 0, 3, -100, -100]], dtype=float)
    ends = np.array([[1, 2, 0, -100, -100], [0, 0, 3, -100, -100]], dtype=float)
    decoded = postprocess_qa_predictions(examples, features, starts, ends, version_2_with_negative=True)[0]
    assert (decoded.text, decoded.score, decoded.null_score) == ("delta", 6.0, 2.0)


def test_inconsistent_inputs_are_refused() -> None:
    examples = {"id": ["q", "q"], "context": [CONTEXT, CONTEXT]}
    features = {"example_id": ["q"], "offset_mapping": [OFFSETS]}
    logits = np.zeros((1, 8))
    with pytest.raises(DataError, match="example id 'q' occurs more than once"):
        postprocess_qa_predictions(examples, features, logits, logits)
    examples = {"id": ["q"], "context": [CONTEXT]}
    with pytest.raises(ValueError, match="2 start and 2 end logit rows for 1 features"):
        postprocess_qa_predictions(examples, features, np.zeros((2, 8)), np.zeros((2, 8)))
    with pytest.raises(ValueError, match="belongs to example 'other'"):
        postprocess_qa_predictions(
            examples, {"example_id": ["other"], "offset_mapping": [OFFSETS]}, logits, logits
        )
    with pytest.raises(ValueError, match="preprocess them with train=False"):
        postprocess_qa_predictions(examples, {"input_ids": [[1]]}, logits, logits)


# --- answers are whole words (issue 19.7: "rosene" from "kerosene") -------------------------------

LAMP = "In 1902 the lamp burned kerosene, and later (1920s) paraffin."


def lamp_answer(tokenizer: Any, first_piece: str, last_piece: str) -> Any:
    """Decode with the start logit on ``first_piece`` and the end logit on ``last_piece`` (WordPiece tokens
    of the real MiniLM tokenizer), through the real windowing."""
    batch = {"id": ["lamp"], "question": ["What fuel did the lamp use in 1902?"], "context": [LAMP]}
    features = preprocess(batch, context(tokenizer), train=False)
    pieces = tokenizer.convert_ids_to_tokens(features["input_ids"][0])
    inside = [t for t, o in enumerate(features["offset_mapping"][0]) if o is not None]
    start = next(t for t in inside if pieces[t] == first_piece)
    end = next(t for t in inside if pieces[t] == last_piece and t >= start)
    starts = np.zeros((1, len(pieces)))
    ends = np.zeros((1, len(pieces)))
    starts[0, start] = ends[0, end] = 10.0
    return postprocess_qa_predictions(batch, features, starts, ends)[0]


def test_a_sub_word_span_widens_to_the_whole_word(tokenizer: Any) -> None:
    assert tokenizer.tokenize("kerosene") == ["ke", "##rose", "##ne"]  # what the cases below cut
    for first, last in (("##rose", "##rose"), ("ke", "##rose"), ("##rose", "##ne"), ("##ne", "##ne")):
        decoded = lamp_answer(tokenizer, first, last)
        assert (decoded.text, decoded.start) == ("kerosene", LAMP.index("kerosene")), (first, last)
        assert decoded.end == decoded.start + len("kerosene")
    # a span already on word boundaries is kept; punctuation next to a word is not pulled in
    assert lamp_answer(tokenizer, "ke", "##ne").text == "kerosene"
    assert lamp_answer(tokenizer, "##ffin", "##ffin").text == "paraffin"
    assert lamp_answer(tokenizer, "##ne", ",").text == "kerosene,"
    assert lamp_answer(tokenizer, "1902", "1902").text == "1902"


def test_snapping_keeps_scripts_written_without_spaces() -> None:
    # a CJK context: characters are not separated into words by spaces, so no run of them is one word
    examples = {"id": ["q"], "context": ["東京は日本の首都です"]}
    offsets = [None, (0, 2), (2, 3), (3, 5), (5, 6), (6, 8), (8, 10)]
    features = {"example_id": ["q"], "offset_mapping": [offsets]}
    logits = np.array([[0, 9, 0, 0, 0, 0, 0]], dtype=float)
    assert postprocess_qa_predictions(examples, features, logits, logits)[0].text == "東京"
