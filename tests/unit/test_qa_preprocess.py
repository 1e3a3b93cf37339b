"""Windowing, labels and the errors for bad QA data; left-padding tokenizers put the context first."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from pydantic import ValidationError

from peftkit.errors import DataError
from peftkit.tasks.base import TaskContext
from peftkit.tasks.qa import QAConfig, collator, postprocess_qa_predictions, preprocess
from tests.conftest import FIXTURES, REPO, minilm_path

CONTEXT = (
    "The Amazon River flows across South America from the Andes mountains in Peru to the Atlantic Ocean in "
    "Brazil. For most of its length no bridge crosses it."
)


def example(
    example_id: str, question: str, context: str, texts: list[str], starts: list[int]
) -> dict[str, Any]:
    return {
        "id": example_id,
        "question": question,
        "context": context,
        "answers": {"text": texts, "answer_start": starts},
    }


def batch_of(*rows: dict[str, Any]) -> dict[str, list[Any]]:
    return {key: [r[key] for r in rows] for key in rows[0]}


GOOD = example(
    "amazon-1",
    "Into which ocean does the Amazon flow?",
    CONTEXT,
    ["the Atlantic Ocean"],
    [CONTEXT.index("the Atlantic Ocean")],
)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def left_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path(), padding_side="left")


def context(tokenizer: Any, **cfg: Any) -> TaskContext:
    return TaskContext(cfg=QAConfig(**cfg), tokenizer=tokenizer, labels=None)


def label_text(features: dict[str, list[Any]], f: int, source: str, offsets: list[Any]) -> str:
    start, end = features["start_positions"][f], features["end_positions"][f]
    return source[offsets[start][0] : offsets[end][1]]


# --- labels -------------------------------------------------------------------------------------


def test_labels_point_at_the_answer(tokenizer: Any) -> None:
    features = preprocess(batch_of(GOOD), context(tokenizer), train=False)
    assert len(features["input_ids"]) == 1  # fits one window with the defaults
    assert label_text(features, 0, CONTEXT, features["offset_mapping"][0]) == "the Atlantic Ocean"
    assert features["example_id"] == ["amazon-1"]
    assert features["cls_index"] == [0]
    # offsets only for context tokens: CLS, question and SEP have None
    offsets = features["offset_mapping"][0]
    question_tokens = len(
        tokenizer("Into which ocean does the Amazon flow?", add_special_tokens=False)["input_ids"]
    )
    assert offsets[: question_tokens + 2] == [None] * (question_tokens + 2)
    assert offsets[-1] is None and all(o is not None for o in offsets[question_tokens + 2 : -1])


def test_windows_without_the_whole_answer_point_at_cls(tokenizer: Any) -> None:
    features = preprocess(batch_of(GOOD), context(tokenizer, max_length=24, doc_stride=4), train=True)
    assert len(features["input_ids"]) >= 3
    labelled = [f for f, s in enumerate(features["start_positions"]) if s != 0]
    assert labelled and len(labelled) < len(features["input_ids"])
    unlabelled = [f for f in range(len(features["input_ids"])) if f not in labelled]
    assert all(features["end_positions"][f] == 0 for f in unlabelled)


def test_answers_as_a_list_of_objects(tokenizer: Any) -> None:
    row = dict(GOOD, answers=[{"text": "Brazil", "answer_start": CONTEXT.index("Brazil")}])
    features = preprocess(batch_of(row), context(tokenizer), train=False)
    assert label_text(features, 0, CONTEXT, features["offset_mapping"][0]) == "Brazil"


def test_unanswerable_v2_question_points_at_cls(tokenizer: Any) -> None:
    row = example("amazon-noans", "How long is the Amazon?", CONTEXT, [], [])
    features = preprocess(batch_of(GOOD, row), context(tokenizer, version_2_with_negative=True), train=True)
    assert features["start_positions"][1] == features["end_positions"][1] == 0
    assert features["start_positions"][0] > 0


def test_left_padding_tokenizer_puts_context_first(left_tokenizer: Any) -> None:
    ctx = context(left_tokenizer, max_length=32, doc_stride=8)
    features = preprocess(batch_of(GOOD), ctx, train=False)
    assert len(features["input_ids"]) >= 2
    for f, ids in enumerate(features["input_ids"]):
        tokens = left_tokenizer.convert_ids_to_tokens(ids)
        first_sep = tokens.index("[SEP]")
        # the question is the second sequence, whole in every window, after the context
        question = left_tokenizer.tokenize("Into which ocean does the Amazon flow?")
        assert tokens[first_sep + 1 : first_sep + 1 + len(question)] == question
        offsets = features["offset_mapping"][f]
        assert all(o is not None for o in offsets[1:first_sep]) and all(
            o is None for o in offsets[first_sep:]
        )
    labelled = [f for f, s in enumerate(features["start_positions"]) if s != 0]
    assert labelled
    for f in labelled:
        offsets = features["offset_mapping"][f]
        assert label_text(features, f, CONTEXT, offsets) == "the Atlantic Ocean"
        tokens = left_tokenizer.convert_ids_to_tokens(features["input_ids"][f])
        start, end = features["start_positions"][f], features["end_positions"][f]
        assert tokens[start : end + 1] == ["the", "atlantic", "ocean"]


def test_left_padding_oracle_decodes_the_answer(left_tokenizer: Any) -> None:
    import numpy as np

    rows = [json.loads(line) for line in (FIXTURES / "qa" / "long_contexts.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["answers"]["text"]]
    batch = batch_of(*rows)
    features = preprocess(batch, context(left_tokenizer, max_length=64, doc_stride=16), train=False)
    n = len(features["input_ids"])
    starts, ends = np.zeros((n, 64)), np.zeros((n, 64))
    for f in range(n):
        starts[f, features["start_positions"][f]] = 10
        ends[f, features["end_positions"][f]] = 10
    decoded = postprocess_qa_predictions(batch, features, starts, ends)
    assert [d.text for d in decoded] == [r["answers"]["text"][0] for r in rows]


def test_collator_pads_right_even_for_left_padding_tokenizers(left_tokenizer: Any) -> None:
    ctx = context(left_tokenizer)
    short = dict(
        GOOD,
        id="short",
        context="It flows into the Atlantic Ocean.",
        answers={"text": [], "answer_start": []},
    )
    features = preprocess(batch_of(GOOD, short), context(left_tokenizer, version_2_with_negative=True), False)
    rows = [{k: features[k][i] for k in features} for i in range(2)]
    batch = collator(ctx, None)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"}
    short_length = len(features["input_ids"][1])
    assert batch["input_ids"][1, :short_length].tolist() == features["input_ids"][1]
    assert batch["input_ids"][1, short_length:].eq(left_tokenizer.pad_token_id).all()
    assert batch["attention_mask"][1].tolist() == [1] * short_length + [0] * (
        batch["input_ids"].shape[1] - short_length
    )
    assert batch["start_positions"].tolist() == features["start_positions"]


# --- bad input ------------------------------------------------------------------------------------


def test_answer_start_that_does_not_match_names_the_example(tokenizer: Any) -> None:
    rows = [
        json.loads(line) for line in (FIXTURES / "qa" / "bad_answer_start.jsonl").read_text().splitlines()
    ]
    with pytest.raises(DataError) as error:
        preprocess(batch_of(*rows), context(tokenizer), train=True)
    message = str(error.value)
    assert "2 answer(s) do not match their context" in message
    assert "example 'moon-off-by-one': answer 'maria' at answer_start=266 reads 'aria,'" in message
    assert "the text first occurs at 265" in message
    assert "example 'moon-wrong-text': answer 'lunar seas'" in message and "not in the context" in message
    assert "'moon-ok'" not in message
    assert "characters counted from 0" in message


def test_many_bad_answers_are_counted(tokenizer: Any) -> None:
    rows = [dict(GOOD, id=f"bad-{i}", answers={"text": ["Brazil"], "answer_start": [i]}) for i in range(8)]
    with pytest.raises(DataError, match=r"8 answer\(s\) do not match[\s\S]*\.\.\. and 3 more"):
        preprocess(batch_of(*rows), context(tokenizer), train=False)


def test_answer_lists_of_different_lengths(tokenizer: Any) -> None:
    row = dict(GOOD, answers={"text": ["Brazil", "Peru"], "answer_start": [5]})
    with pytest.raises(DataError, match="example 'amazon-1': 2 answer texts but 1 answer_start values"):
        preprocess(batch_of(row), context(tokenizer), train=True)


def test_answers_not_in_squad_form(tokenizer: Any) -> None:
    row = dict(GOOD, answers="Brazil")
    with pytest.raises(DataError, match="example 'amazon-1': answers = 'Brazil' is not in SQuAD form"):
        preprocess(batch_of(row), context(tokenizer), train=True)


@pytest.mark.parametrize("empty", ["", "   \n"])
def test_empty_context_is_an_error(tokenizer: Any, empty: str) -> None:
    row = example("blank", "What is here?", empty, [], [])
    with pytest.raises(
        DataError, match=r"1 empty question\(s\) or context\(s\):\n  example 'blank': empty context"
    ):
        preprocess(batch_of(GOOD, row), context(tokenizer, version_2_with_negative=True), train=True)


def test_empty_question_is_an_error(tokenizer: Any) -> None:
    with pytest.raises(DataError, match="example 'amazon-1': empty question"):
        preprocess(batch_of(dict(GOOD, question=" ")), context(tokenizer), train=False)


def test_unanswerable_question_in_a_v1_recipe(tokenizer: Any) -> None:
    row = example("amazon-noans", "How long is the Amazon?", CONTEXT, [], [])
    with pytest.raises(DataError, match="version_2_with_negative = false:\n  example 'amazon-noans'\nset"):
        preprocess(batch_of(GOOD, row), context(tokenizer), train=True)


def test_long_questions_are_truncated_with_a_count(tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    long_question = (
        "Which ocean, after a very long journey " + "through the rainforest " * 24 + "does it reach?"
    )
    rows = [
        GOOD,
        dict(GOOD, id="long-1", question=long_question),
        dict(GOOD, id="long-2", question=long_question),
    ]
    cfg = {"max_length": 64, "doc_stride": 16}
    budget = 64 - 3 - 2 * 16
    assert len(tokenizer(long_question, add_special_tokens=False)["input_ids"]) > 64  # alone, it cannot fit
    with caplog.at_level(logging.WARNING, logger="peftkit.tasks.qa"):
        features = preprocess(batch_of(*rows), context(tokenizer, **cfg), train=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"2 of 3 questions are longer than {budget} tokens and were truncated")
    assert "'long-1', 'long-2'" in warnings[0]
    ids = features["example_id"]
    for f, example_id in enumerate(ids):
        context_tokens = sum(o is not None for o in features["offset_mapping"][f])
        if f + 1 < len(ids) and ids[f + 1] == example_id:  # all but an example's last window are full
            assert context_tokens >= 2 * 16
        if example_id != "amazon-1":
            first_sep = features["input_ids"][f].index(tokenizer.sep_token_id)
            assert first_sep - 1 == budget
    # the answer is still found and labelled
    assert any(
        features["start_positions"][f] > 0 for f, e in enumerate(features["example_id"]) if e == "long-1"
    )


def test_max_length_too_small_for_stride(tokenizer: Any) -> None:
    with pytest.raises(ValidationError, match="doc_stride = 16 must be less than half of max_length = 32"):
        QAConfig(max_length=32, doc_stride=16)
    with pytest.raises(DataError, match="max_length = 20 leaves no room for a question"):
        preprocess(batch_of(GOOD), context(tokenizer, max_length=20, doc_stride=9), train=True)


def test_training_needs_answers(tokenizer: Any) -> None:
    batch = {k: v for k, v in batch_of(GOOD).items() if k != "answers"}
    with pytest.raises(DataError, match="training examples need an 'answers' column"):
        preprocess(batch, context(tokenizer), train=True)
    features = preprocess(batch, context(tokenizer), train=False)  # prediction: no labels
    assert "start_positions" not in features and features["example_id"] == ["amazon-1"]


def test_shipped_fixture_is_valid_and_as_documented(tokenizer: Any) -> None:
    folder = REPO / "data" / "qa_fixture"
    expected = {"train": (64, 76), "validation": (13, 16), "test": (15, 19)}
    for split, (v1_rows, v2_rows) in expected.items():
        v1 = [
            json.loads(line) for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        ]
        v2 = [
            json.loads(line)
            for line in (folder / "v2" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        ]
        assert (len(v1), len(v2)) == (v1_rows, v2_rows)
        assert all(r["answers"]["text"] for r in v1)
        assert v2[: len(v1)] == v1 or {r["id"] for r in v1} <= {r["id"] for r in v2}
        preprocess(batch_of(*v1), context(tokenizer), train=True)  # raises on any bad answer_start
        preprocess(batch_of(*v2), context(tokenizer, version_2_with_negative=True), train=True)
        assert len({r["id"] for r in v2}) == len(v2)
