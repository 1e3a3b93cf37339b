"""``predict``: windowing, batching and decoding of raw {question, context} records."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from peftkit.errors import DataError
from peftkit.tasks.base import TaskContext
from peftkit.tasks.qa import TASK, QAConfig, predict
from tests.conftest import FIXTURES, REPO, minilm_path

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


class WordPointer(torch.nn.Module):
    """A stand-in QA model: high start logit on one context token id, high end logit on another,
    and a high CLS score for questions it is told to refuse."""

    def __init__(self, start_id: int, end_id: int, refuse_token: int | None = None) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.start_id, self.end_id, self.refuse_token = start_id, end_id, refuse_token
        self.calls: list[int] = []

    def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
        self.calls.append(input_ids.shape[0])
        in_context = token_type_ids == 1
        start = torch.where(in_context & (input_ids == self.start_id), 10.0, 0.0) + self.anchor
        end = torch.where(in_context & (input_ids == self.end_id), 10.0, 0.0) + self.anchor
        if self.refuse_token is not None:
            refuse = ((input_ids == self.refuse_token) & ~in_context).any(dim=1)
            start[refuse, 0] = end[refuse, 0] = 50.0
        return SimpleNamespace(start_logits=start, end_logits=end)


def long_context_records() -> list[dict[str, Any]]:
    lines = (FIXTURES / "qa" / "long_contexts.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_predict_finds_the_answer_in_a_late_window(tokenizer: Any) -> None:
    rows = long_context_records()
    row = next(r for r in rows if r["id"] == "long-a-4")  # "Neil Armstrong and Buzz Aldrin", last windows
    answer = row["answers"]["text"][0]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    model = WordPointer(answer_ids[0], answer_ids[-1])
    cfg = QAConfig(max_length=64, doc_stride=16, predict_batch_size=3)
    ctx = TaskContext(cfg=cfg, tokenizer=tokenizer, labels=None)
    model.train()
    records = [{"question": row["question"], "context": row["context"], "extra": 1}] * 2
    results = predict(model, ctx, records)
    start = row["answers"]["answer_start"][0]
    expected = {"prediction": answer, "start": start, "end": start + len(answer), "score": 20.0}
    assert results == [expected, expected]
    assert max(model.calls) == 3 and sum(model.calls) > 6  # several windows, in batches of at most 3
    assert model.training  # the caller's mode is restored


def test_predict_v2_can_answer_nothing(tokenizer: Any) -> None:
    rows = long_context_records()
    answerable = next(r for r in rows if r["id"] == "long-a-3")  # maria
    refused = next(r for r in rows if r["id"] == "long-a-noans-1")  # "How far is the Moon ...?"
    maria = tokenizer("maria", add_special_tokens=False)["input_ids"]
    far = tokenizer("far", add_special_tokens=False)["input_ids"][0]
    model = WordPointer(maria[0], maria[-1], refuse_token=far)
    ctx = TaskContext(cfg=QAConfig(version_2_with_negative=True), tokenizer=tokenizer, labels=None)
    records = [{"question": r["question"], "context": r["context"]} for r in (answerable, refused)]
    results = predict(model, ctx, records)
    assert results[0]["prediction"] == "maria"
    assert answerable["context"][results[0]["start"] : results[0]["end"]] == "maria"
    assert results[1] == {"prediction": "", "start": None, "end": None, "score": 100.0}


def test_predict_with_a_real_model_is_batch_invariant(tiny_bert_dir: Any, tokenizer: Any) -> None:
    from transformers import AutoModelForQuestionAnswering

    torch.manual_seed(0)
    model = AutoModelForQuestionAnswering.from_pretrained(tiny_bert_dir, dtype=torch.float32)
    records = [{"question": r["question"], "context": r["context"]} for r in long_context_records()[:5]]
    results = {}
    for size in (1, 64):
        ctx = TaskContext(
            cfg=QAConfig(max_length=64, doc_stride=16, predict_batch_size=size),
            tokenizer=tokenizer,
            labels=None,
        )
        results[size] = predict(model, ctx, records)
    for one, many, record in zip(results[1], results[64], records, strict=True):
        assert one["prediction"] == many["prediction"] == record["context"][one["start"] : one["end"]]
        assert one["score"] == pytest.approx(many["score"], abs=1e-4)
        assert isinstance(one["score"], float)


def test_predict_refuses_records_without_question_or_context(tokenizer: Any) -> None:
    ctx = TaskContext(cfg=QAConfig(), tokenizer=tokenizer, labels=None)
    model = WordPointer(0, 0)
    with pytest.raises(
        DataError, match=re.escape("record 1: context missing or not text; give {question, context}")
    ):
        predict(model, ctx, [{"question": "a?", "context": "b"}, {"question": "a?"}])
    with pytest.raises(DataError, match="empty context"):
        predict(model, ctx, [{"question": "a?", "context": ""}])
    assert predict(model, ctx, []) == []


def test_task_declaration() -> None:
    from transformers import AutoModelForQuestionAnswering

    assert TASK.name == "qa"
    assert TASK.config_class is QAConfig
    assert TASK.columns == {"id": True, "question": True, "context": True, "answers": True}
    assert TASK.model_class(None) is AutoModelForQuestionAnswering
    assert TASK.peft_task_type(None) is None  # plain PeftModel, see the comment in peftkit.tasks.qa
    assert TASK.head_modules == ("qa_outputs",)
    assert TASK.best_metric(QAConfig()) == ("f1", True)
    assert TASK.prepare_labels(None, QAConfig()) is None
    defaults = QAConfig()
    assert (defaults.type, defaults.max_length, defaults.doc_stride, defaults.n_best_size) == (
        "qa",
        384,
        128,
        20,
    )
    assert (defaults.max_answer_length, defaults.null_score_diff_threshold) == (30, 0.0)
    assert defaults.version_2_with_negative is False


def test_compute_metrics_uses_the_v2_switch(tokenizer: Any) -> None:
    v1 = TaskContext(cfg=QAConfig(), tokenizer=tokenizer, labels=None)
    v2 = TaskContext(cfg=QAConfig(version_2_with_negative=True), tokenizer=tokenizer, labels=None)
    predictions, references = ["Paris", ""], [["Paris"], []]
    assert TASK.compute_metrics(predictions, references, v1) == {"exact_match": 100.0, "f1": 100.0}
    assert TASK.compute_metrics(predictions, references, v2)["NoAns_total"] == 1.0
    assert TASK.compute_metrics([], [], v1) == {}


def test_shipped_recipe_loads() -> None:
    from peftkit.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "qa_lora.toml")
    assert recipe.task_name == "qa"
    assert isinstance(recipe.task, QAConfig)
    assert (recipe.task.max_length, recipe.task.doc_stride) == (384, 128)
    assert recipe.data.dataset is not None and Path(recipe.data.dataset) == REPO / "data" / "qa_fixture"
