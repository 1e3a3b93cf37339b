"""Per-example scores that rank the worst examples (token_cls, qa, seq2seq; seq_cls is tested end to end)."""

from __future__ import annotations

from typing import Any

import pytest

from peftkit.tasks import TASKS
from peftkit.tasks.base import TaskContext
from peftkit.tasks.token_cls import TokenClsConfig


def rank(task: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]], ctx: Any) -> list[dict[str, Any]]:
    score = TASKS[task].score_example
    assert score is not None
    scored = [score(record, predicted, ctx) for record, predicted in pairs]
    return sorted(scored, key=lambda e: e["_rank"])


def test_token_cls_ranks_by_sentence_entity_f1() -> None:
    labels = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
    ctx = TaskContext(cfg=TokenClsConfig(), tokenizer=None, labels=labels)
    gold = ["B-PER", "I-PER", "O", "B-LOC"]
    pairs = [
        ({"tokens": ["a", "b", "c", "d"], "tags": gold}, {"prediction": gold}),  # perfect
        (
            {"tokens": ["a", "b", "c", "d"], "tags": gold},
            {"prediction": ["B-PER", "O", "O", "B-LOC"]},
        ),  # 1 of 2
        ({"tokens": ["x", "y"], "tags": ["O", "O"]}, {"prediction": ["O", "O"]}),  # no entities: 1.0
        ({"tokens": ["a", "b", "c", "d"], "tags": gold}, {"prediction": ["O", "O", "O", "O"]}),  # none found
    ]
    ranked = rank("token_cls", pairs, ctx)
    assert [e["f1"] for e in ranked] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert ranked[0]["wrong_words"] == 3 and ranked[1]["wrong_words"] == 1


def test_token_cls_without_entities_ranks_by_word_accuracy() -> None:
    ctx = TaskContext(cfg=TokenClsConfig(), tokenizer=None, labels=("NN", "VB", "DT"))
    pairs = [
        ({"tokens": ["the", "dog", "runs"], "tags": ["DT", "NN", "VB"]}, {"prediction": ["DT", "NN", "NN"]}),
        ({"tokens": ["dogs", "run"], "tags": ["NN", "VB"]}, {"prediction": ["VB", "NN"]}),
    ]
    ranked = rank("token_cls", pairs, ctx)
    assert [e["accuracy"] for e in ranked] == pytest.approx([0.0, 2 / 3])


def test_qa_ranks_by_best_gold_f1_and_seq2seq_by_chrf() -> None:
    record = {
        "id": "q",
        "question": "who?",
        "context": "Ada Lovelace wrote it",
        "answers": {"text": ["Ada Lovelace"]},
    }
    ranked = rank("qa", [(record, {"prediction": "Ada"}), (record, {"prediction": "wrote"})], None)
    assert [e["prediction"] for e in ranked] == ["wrote", "Ada"]
    assert ranked[1]["f1"] == pytest.approx(2 / 3)
    pairs = [
        ({"source": "a", "target": "el gato negro"}, {"prediction": "el gato negro"}),
        ({"source": "b", "target": "el gato negro"}, {"prediction": "un perro"}),
    ]
    ranked = rank("seq2seq", pairs, None)
    assert ranked[0]["prediction"] == "un perro" and ranked[1]["chrf"] == pytest.approx(100.0)
