"""seq_cls: label discovery, preprocessing, collator padding, and metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from peftkit.errors import DataError
from peftkit.metrics.classification import classification_metrics, regression_metrics
from peftkit.tasks.base import TaskContext
from peftkit.tasks.seq_cls import SeqClsConfig, postprocess, prepare_labels, preprocess


def dsdict(**splits: dict) -> object:
    from datasets import Dataset, DatasetDict

    return DatasetDict({name: Dataset.from_dict(columns) for name, columns in splits.items()})


def test_string_labels_are_discovered_sorted() -> None:
    raw = dsdict(train={"text": ["a", "b", "c"], "label": ["spam", "ham", "spam"]})
    assert prepare_labels(raw, SeqClsConfig()) == ("ham", "spam")


def test_int_labels_sorted_numerically() -> None:
    raw = dsdict(train={"text": list("abcd"), "label": [10, 2, 1, 2]})
    assert prepare_labels(raw, SeqClsConfig()) == ("1", "2", "10")


def test_class_label_names_are_used() -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    raw = DatasetDict({"train": Dataset.from_dict({"text": ["x", "y"], "label": [1, 1]}, features=features)})
    assert prepare_labels(raw, SeqClsConfig()) == ("neg", "pos")


def test_label_list_fixes_the_order() -> None:
    raw = dsdict(train={"text": ["a", "b"], "label": ["x", "y"]})
    assert prepare_labels(raw, SeqClsConfig(label_list=["y", "x", "z"])) == ("y", "x", "z")


def test_label_absent_from_train_is_an_error() -> None:
    raw = dsdict(
        train={"text": ["a", "b"], "label": ["ham", "spam"]},
        validation={"text": ["c", "d"], "label": ["ham", "eggs"]},
    )
    with pytest.raises(
        DataError, match=r"validation split, record 1: label 'eggs' does not occur in the train"
    ):
        prepare_labels(raw, SeqClsConfig())


def test_single_class_and_fractional_labels_are_errors() -> None:
    with pytest.raises(DataError, match="at least 2"):
        prepare_labels(dsdict(train={"text": ["a"], "label": ["x"]}), SeqClsConfig())
    with pytest.raises(DataError, match="num_labels = 1"):
        prepare_labels(dsdict(train={"text": ["a", "b"], "label": [0.5, 1.5]}), SeqClsConfig())


def test_regression_needs_numbers() -> None:
    cfg = SeqClsConfig(num_labels=1)
    assert prepare_labels(dsdict(train={"text": ["a", "b"], "label": [0.5, 2.0]}), cfg) is None
    with pytest.raises(DataError, match="train split, record 1: regression target None is not a number"):
        prepare_labels(dsdict(train={"text": ["a", "b"], "label": [1.0, None]}), cfg)


@pytest.fixture(scope="module")
def tokenizer() -> object:
    from transformers import AutoTokenizer

    from tests.conftest import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def test_preprocess_pairs_truncation_and_label_ids(tokenizer: object) -> None:
    ctx = TaskContext(cfg=SeqClsConfig(max_length=8), tokenizer=tokenizer, labels=("ham", "spam"))
    batch = {"text": ["win money now", "a " * 50], "text_pair": ["ok", "b"], "label": ["spam", "ham"]}
    out = preprocess(batch, ctx, train=True)
    assert out["labels"] == [1, 0]
    assert max(len(ids) for ids in out["input_ids"]) == 8
    assert 1 in out["token_type_ids"][0]  # the pair's second segment


def test_collator_pads_to_longest_in_batch(tokenizer: object) -> None:
    from peftkit.tasks.seq_cls import collator

    ctx = TaskContext(cfg=SeqClsConfig(), tokenizer=tokenizer, labels=("a", "b"))
    rows = [
        {"input_ids": [101, 7, 102], "attention_mask": [1, 1, 1], "labels": 0},
        {"input_ids": [101, 7, 8, 9, 10, 102], "attention_mask": [1] * 6, "labels": 1},
    ]
    batch = collator(ctx, None)(rows)
    assert batch["input_ids"].shape == (2, 6)  # longest in the batch, not max_length
    assert batch["input_ids"][0].tolist() == [101, 7, 102, 0, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert batch["labels"].tolist() == [0, 1]


def test_postprocess_maps_logits_to_names() -> None:
    import numpy as np
    from transformers import EvalPrediction

    ctx = TaskContext(cfg=SeqClsConfig(), tokenizer=None, labels=("ham", "spam"))
    prediction = EvalPrediction(predictions=np.array([[2.0, 1.0], [0.0, 3.0]]), label_ids=np.array([0, 0]))
    assert postprocess(None, None, prediction, ctx) == (["ham", "spam"], ["ham", "ham"])


def test_classification_metrics_hand_computed() -> None:
    # refs: a a a b b ; preds: a a b b a  -> tp_a=2 fp_a=1 fn_a=1 ; tp_b=1 fp_b=1 fn_b=1
    refs = ["a", "a", "a", "b", "b"]
    preds = ["a", "a", "b", "b", "a"]
    m = classification_metrics(preds, refs, ["a", "b"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision_a"] == pytest.approx(2 / 3) and m["recall_a"] == pytest.approx(2 / 3)
    assert m["precision_b"] == pytest.approx(1 / 2) and m["recall_b"] == pytest.approx(1 / 2)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) with b positive: tp=1 tn=2 fp=1 fn=1
    assert m["mcc"] == pytest.approx((1 * 2 - 1 * 1) / math.sqrt(2 * 2 * 3 * 3))
    assert m["support_a"] == 3 and m["support_b"] == 2


def test_classification_metrics_report_absent_classes() -> None:
    m = classification_metrics(["a", "a"], ["a", "a"], ["a", "b", "c"])
    assert m["f1_b"] == 0.0 and m["support_c"] == 0.0


def test_regression_metrics_hand_computed() -> None:
    m = regression_metrics([1.0, 2.0, 4.0], [1.0, 3.0, 3.0])
    assert m["mse"] == pytest.approx(2 / 3)
    assert m["mae"] == pytest.approx(2 / 3)
    # spearman: ranks (1,2,3) vs (1,2.5,2.5) -> 0.866...
    assert m["spearman"] == pytest.approx(0.8660254, abs=1e-6)
    assert m["pearson"] == pytest.approx(0.7559289, abs=1e-6)
    assert math.isnan(regression_metrics([1.0, 1.0], [0.0, 1.0])["pearson"])


def test_predict_refuses_records_without_text() -> None:
    from peftkit.tasks.seq_cls import predict

    ctx = TaskContext(cfg=SeqClsConfig(), tokenizer=None, labels=("a", "b"))
    with pytest.raises(DataError, match=r"record 2: 'text' must be a string, got keys \['message'\]"):
        predict(None, ctx, [{"text": "ok"}, {"message": "hello"}])
    with pytest.raises(DataError, match=r"record 1: 'text' must be a string, got int 5"):
        predict(None, ctx, [{"text": 5}])
