"""Token classification: label alignment on the real MiniLM tokenizer, windows, labels, postprocess."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from peftkit.errors import DataError
from peftkit.tasks.base import TaskContext
from peftkit.tasks.token_cls import (
    IGNORED_LABEL,
    TASK,
    TokenClsConfig,
    align_labels_with_tokens,
    encode_words,
    plan_windows,
    postprocess,
    prepare_labels,
    preprocess,
    resolve_scheme,
    split_words,
    window_owners,
)
from tests.conftest import minilm_path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
NER_LABELS = ("O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER")
NER_LABEL2ID = {name: i for i, name in enumerate(NER_LABELS)}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def ctx_for(tokenizer: Any, labels: tuple[str, ...] = NER_LABELS, **cfg: Any) -> TaskContext:
    return TaskContext(cfg=TokenClsConfig(**cfg), tokenizer=tokenizer, labels=labels)


def tags_of(label_ids: list[int], labels: tuple[str, ...] = NER_LABELS) -> list[str | None]:
    return [None if i == IGNORED_LABEL else labels[i] for i in label_ids]


def dataset_dict(**splits: list[dict[str, Any]]) -> Any:
    from datasets import Dataset, DatasetDict

    return DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()})


# ── alignment ───────────────────────────────────────────────────────────────────────────────────────


def test_a_word_split_into_pieces_is_labelled_on_its_first_piece_only(tokenizer: Any) -> None:
    words = ["Arnold", "Schwarzenegger", "visited", "Zürichsee"]
    tags = ["B-PER", "I-PER", "O", "B-LOC"]
    encoding = tokenizer(words, is_split_into_words=True)
    assert tokenizer.convert_ids_to_tokens(encoding["input_ids"]) == [
        "[CLS]", "arnold", "schwarz", "##ene", "##gger", "visited", "zurich", "##see", "[SEP]"
    ]  # fmt: skip
    ids = align_labels_with_tokens(encoding.word_ids(), tags, NER_LABEL2ID, False)
    assert tags_of(ids) == [None, "B-PER", "I-PER", None, None, "O", "B-LOC", None, None]


def test_label_all_tokens_turns_b_into_i_on_continuation_pieces(tokenizer: Any) -> None:
    words = ["Arnold", "Schwarzenegger", "visited", "Zürichsee"]
    encoding = tokenizer(words, is_split_into_words=True)
    ids = align_labels_with_tokens(encoding.word_ids(), ["B-PER", "I-PER", "O", "B-LOC"], NER_LABEL2ID, True)
    assert tags_of(ids) == [None, "B-PER", "I-PER", "I-PER", "I-PER", "O", "B-LOC", "I-LOC", None]


def test_label_all_tokens_with_iobes_ends_single_and_end_words_with_e(tokenizer: Any) -> None:
    labels = ("O", "B-LOC", "I-LOC", "E-LOC", "S-LOC", "B-PER", "I-PER", "E-PER", "S-PER")
    label2id = {name: i for i, name in enumerate(labels)}
    words = ["Greta", "Thunberg", "spoke", "in", "Stratford-upon-Avon", "and", "Thunberg"]
    tags = ["B-PER", "E-PER", "O", "O", "S-LOC", "O", "S-PER"]
    encoding = tokenizer(words, is_split_into_words=True)
    assert tokenizer.convert_ids_to_tokens(encoding["input_ids"])[1:-1] == [
        "greta", "th", "##un", "##berg", "spoke", "in", "stratford", "-", "upon", "-", "avon", "and",
        "th", "##un", "##berg",
    ]  # fmt: skip
    ids = align_labels_with_tokens(encoding.word_ids(), tags, label2id, True)
    assert tags_of(ids, labels)[1:-1] == [
        "B-PER", "E-PER", "I-PER", "E-PER", "O", "O", "S-LOC", "I-LOC", "I-LOC", "I-LOC", "E-LOC", "O",
        "S-PER", "I-PER", "E-PER",
    ]  # fmt: skip
    # without label_all_tokens the first piece still carries the word's own tag
    plain = tags_of(align_labels_with_tokens(encoding.word_ids(), tags, label2id, False), labels)
    assert [t for t in plain if t is not None] == tags


def test_label_all_tokens_keeps_the_word_tag_when_the_converted_tag_is_unknown() -> None:
    label2id = {"O": 0, "B-X": 1}  # no I-X
    assert align_labels_with_tokens([None, 0, 0, None], ["B-X"], label2id, True) == [-100, 1, 1, -100]


def test_words_lost_by_the_tokenizer_are_counted_and_do_not_shift_labels(tokenizer: Any) -> None:
    words = ["Paris", "\u200b", "is", "\x00", "lovely", "\ufeff"]
    tags = ["B-LOC", "B-MISC", "O", "O", "O", "O"]
    encoded = encode_words([words], tokenizer, TokenClsConfig())
    (window,) = encoded.windows
    assert window.word_ids == [None, 0, 2, 4, None]
    assert encoded.lost_words == 3 and encoded.cut_words == 0
    ids = align_labels_with_tokens(window.word_ids, tags, NER_LABEL2ID, False)
    assert tags_of(ids) == [None, "B-LOC", "O", "O", None]


def test_truncation_keeps_the_first_piece_at_the_edge_and_counts_cut_words(
    tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    words = ["The", "regatta", "Schwarzenegger", "won", "\u200b", "."]
    tags = ["O", "B-MISC", "B-PER", "O", "O", "O"]
    ctx = ctx_for(tokenizer, max_length=8)  # [CLS] the regatta schwarz ##ene ##gger won [SEP]: "." is cut
    with caplog.at_level(logging.WARNING, logger="peftkit.tasks.token_cls"):
        features = preprocess({"tokens": [words, ["a"]], "tags": [tags, ["O"]]}, ctx, True)
    assert tags_of(features["labels"][0]) == [None, "O", "B-MISC", "B-PER", None, None, "O", None]
    assert "1 word(s) in 1 of 2 sentences were cut by max_length = 8" in caplog.text
    assert "1 word(s) produce no token at all" in caplog.text

    words = ["The", "regatta", "on", "the", "Schwarzenegger", "won", "\u200b", "."]
    tags = ["O", "B-MISC", "O", "O", "B-PER", "O", "O", "O"]
    ctx = ctx_for(
        tokenizer, max_length=8
    )  # [CLS] the regatta on the schwarz ##ene [SEP]: the edge splits a word
    encoded = encode_words([words], tokenizer, ctx.cfg)
    assert encoded.windows[0].word_ids == [None, 0, 1, 2, 3, 4, 4, None]
    assert (encoded.cut_words, encoded.examples_cut, encoded.lost_words) == (2, 1, 1)
    features = preprocess({"tokens": [words], "tags": [tags]}, ctx, True)
    assert tags_of(features["labels"][0]) == [None, "O", "B-MISC", "O", "O", "B-PER", None, None]
    ctx = ctx_for(tokenizer, max_length=8, label_all_tokens=True)
    features = preprocess({"tokens": [words], "tags": [tags]}, ctx, True)
    assert tags_of(features["labels"][0]) == [None, "O", "B-MISC", "O", "O", "B-PER", "I-PER", None]


# ── windows ─────────────────────────────────────────────────────────────────────────────────────────


def test_plan_windows_by_hand() -> None:
    assert plan_windows([1] * 10, budget=4, stride=1) == [(0, 4), (3, 7), (6, 10)]
    assert plan_windows([1] * 10, budget=4, stride=0) == [(0, 4), (4, 8), (8, 10)]
    assert plan_windows([2, 2, 2, 2, 2], budget=5, stride=2) == [(0, 2), (1, 3), (2, 4), (3, 5)]
    assert plan_windows([1, 10, 1], budget=4, stride=2) == [(0, 1), (1, 2), (2, 3)]  # an overlong word alone
    assert plan_windows([], budget=4, stride=1) == [(0, 0)]
    assert window_owners([(0, 4), (3, 7), (6, 10)], 10) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert window_owners([(0, 6), (2, 8)], 8) == [0, 0, 0, 0, 1, 1, 1, 1]


def long_sentence() -> list[str]:
    text = (
        "The unbelievably long regatta on the Zürichsee was won by Hans-Peter Müller of Switzerland in 2019 "
        "after a long struggle against strong winds , while Arnold Schwarzenegger watched from the shore "
        "with Greta Thunberg and hundreds of spectators who had travelled from Stratford-upon-Avon ."
    )
    return text.split()


def test_windows_cover_every_word_once_and_never_split_a_word(tokenizer: Any) -> None:
    words = long_sentence()
    cfg = TokenClsConfig(max_length=16, long_inputs="window", stride=4)
    encoded = encode_words([words, ["Short", "one"]], tokenizer, cfg)
    full = tokenizer(words, is_split_into_words=True, add_special_tokens=False).word_ids()
    pieces = {word: full.count(word) for word in range(len(words))}
    windows = [w for w in encoded.windows if w.example_index == 0]
    assert len(windows) > 3 and [w.example_index for w in encoded.windows].count(1) == 1
    owned: list[int] = []
    for window in windows:
        assert len(window.inputs["input_ids"]) <= 16
        present = [w for w in window.word_ids if w is not None]
        assert present == sorted(present) and set(present) == set(range(present[0], present[-1] + 1))
        assert all(present.count(word) == pieces[word] for word in set(present))  # whole words only
        owned += list(window.first_token_of_owned_words())
    assert sorted(owned) == list(range(len(words)))  # each word predicted by exactly one window
    assert encoded.cut_words == 0
    # consecutive windows share at most `stride` tokens
    for before, after in itertools.pairwise(windows):
        shared = set(before.word_ids) & set(after.word_ids) - {None}
        assert 0 < sum(pieces[word] for word in shared) <= 4


def labelled_words(windows: list[Any], labels: list[list[int]]) -> list[int]:
    """The word index of every labelled token (one entry per labelled word and window)."""
    return [
        word
        for window, window_labels in zip(windows, labels, strict=True)
        for word, label in zip(window.word_ids, window_labels, strict=True)
        if label != IGNORED_LABEL
    ]


def test_window_labels_each_word_once_for_evaluation_and_in_every_window_for_training(tokenizer: Any) -> None:
    words = long_sentence()
    tags = ["O"] * len(words)
    ctx = ctx_for(tokenizer, max_length=16, long_inputs="window", stride=4)
    encoded = encode_words([words], tokenizer, ctx.cfg)
    evaluation = preprocess({"tokens": [words], "tags": [tags]}, ctx, False)
    training = preprocess({"tokens": [words], "tags": [tags]}, ctx, True)
    assert len(evaluation["input_ids"]) == len(encoded.windows) == len(training["labels"])
    labelled_eval = labelled_words(encoded.windows, evaluation["labels"])
    labelled_train = labelled_words(encoded.windows, training["labels"])
    assert sorted(labelled_eval) == list(range(len(words)))
    assert set(labelled_train) == set(range(len(words))) and len(labelled_train) > len(words)


# ── labels ──────────────────────────────────────────────────────────────────────────────────────────


def test_labels_of_the_ner_fixture() -> None:
    from peftkit.conll import read_conll

    raw = dataset_dict(
        train=read_conll(REPO / "data/ner_fixture/train.conll"),
        validation=read_conll(REPO / "data/ner_fixture/validation.conll"),
    )
    assert prepare_labels(raw, TokenClsConfig()) == NER_LABELS


def test_entity_tags_are_completed_and_o_is_always_there() -> None:
    raw = dataset_dict(train=[{"tokens": ["EU", "Kyoto"], "tags": ["B-ORG", "B-MISC"]}])
    assert prepare_labels(raw, TokenClsConfig()) == ("O", "B-MISC", "I-MISC", "B-ORG", "I-ORG")
    raw = dataset_dict(train=[{"tokens": ["Peter", "in", "Rome"], "tags": ["S-PER", "O", "S-LOC"]}])
    assert prepare_labels(raw, TokenClsConfig()) == (
        "O", "B-LOC", "I-LOC", "E-LOC", "S-LOC", "B-PER", "I-PER", "E-PER", "S-PER"
    )  # fmt: skip


def test_pos_tags_are_ordered_by_training_frequency_then_name() -> None:
    raw = dataset_dict(
        train=[{"tokens": ["a", "b", "c", "d", "e", "f"], "tags": ["VB", "NN", "DT", "NN", "DT", "JJ"]}],
        test=[{"tokens": ["x"], "tags": ["JJ"]}],
    )
    assert prepare_labels(raw, TokenClsConfig()) == ("DT", "NN", "JJ", "VB")


def test_scheme_detection() -> None:
    assert resolve_scheme("auto", ["O", "B-PER", "I-PER"]) == "IOB2"
    assert resolve_scheme("auto", ["O", "B-PER", "E-PER", "S-LOC"]) == "IOBES"
    assert resolve_scheme("auto", ["NN", "VB", "O"]) == "none"
    assert resolve_scheme("auto", ["O"]) == "none"
    assert resolve_scheme("auto", ["B-NP", "I-NP", "B-VP", "O"]) == "IOB2"  # chunking: entity-style spans
    assert resolve_scheme("none", ["B-PER"]) == "none"


def test_integer_tags_use_classlabel_names_or_label_list() -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    features = Features({"tokens": List(Value("string")), "tags": List(ClassLabel(names=names))})
    train = Dataset.from_dict({"tokens": [["Ada", "Lovelace", "in", "London"]], "tags": [[1, 2, 0, 3]]},
                              features=features)  # fmt: skip
    assert prepare_labels(DatasetDict(train=train), TokenClsConfig()) == tuple(names)

    plain = dataset_dict(train=[{"tokens": ["Ada", "in", "Paris"], "tags": [1, 0, 2]}])
    assert prepare_labels(plain, TokenClsConfig(label_list=["O", "B-PER", "B-LOC"])) == (
        "O", "B-PER", "B-LOC", "I-LOC", "I-PER"  # declared ids kept, missing I- tags appended
    )  # fmt: skip
    with pytest.raises(DataError, match=r"train split, record 0: tags are integers \(1\) but no tag names"):
        prepare_labels(plain, TokenClsConfig())
    with pytest.raises(
        DataError, match=r"train split, record 0: tag id 2 is out of range for the 2 tag names"
    ):
        prepare_labels(plain, TokenClsConfig(label_list=["O", "B-PER"]))


def test_integer_tags_are_aligned_by_id(tokenizer: Any) -> None:
    labels = ("O", "B-PER", "B-LOC", "I-LOC", "I-PER")
    ctx = ctx_for(tokenizer, labels, label_list=["O", "B-PER", "B-LOC"])
    features = preprocess({"tokens": [["Ada", "in", "Paris"]], "tags": [[1, 0, 2]]}, ctx, True)
    assert tags_of(features["labels"][0], labels) == [None, "B-PER", "O", "B-LOC", None]


def test_token_and_tag_counts_that_differ_name_split_and_record() -> None:
    from peftkit.data import load_raw_datasets
    from peftkit.recipe import DataSection

    raw = load_raw_datasets(DataSection(dataset=str(FIXTURES / "token_cls/mismatch")), TASK)
    with pytest.raises(DataError) as caught:
        prepare_labels(raw, TokenClsConfig())
    assert str(caught.value).startswith(
        "train split, record 2: 4 tokens but 3 tags (tokens=['She', 'reads', 'books', '.']); every word "
        "needs exactly one tag"
    )


def test_a_validation_tag_missing_from_train_names_split_record_and_tag() -> None:
    from peftkit.data import load_raw_datasets
    from peftkit.recipe import DataSection

    raw = load_raw_datasets(DataSection(dataset=str(FIXTURES / "ner/unknown_tag")), TASK)
    with pytest.raises(DataError) as caught:
        prepare_labels(raw, TokenClsConfig())
    message = str(caught.value)
    assert message.startswith("validation split, record 1: tag 'B-EVENT' does not occur in the train split")
    assert "known tags: ['B-LOC', 'B-ORG', 'B-PER', 'I-LOC', 'I-ORG', 'I-PER', 'O']" in message


def test_an_explicit_scheme_the_tags_do_not_follow_is_an_error() -> None:
    raw = dataset_dict(train=[{"tokens": ["Time", "flies"], "tags": ["NN", "VBZ"]}])
    with pytest.raises(DataError, match=r"tag 'NN' is not an IOB2 tag"):
        prepare_labels(raw, TokenClsConfig(scheme="IOB2"))
    raw = dataset_dict(train=[{"tokens": ["Rome"], "tags": ["S-LOC"]}, {"tokens": ["a"], "tags": ["O"]}])
    with pytest.raises(DataError, match=r"tag 'S-LOC' is not an IOB2 tag"):
        prepare_labels(raw, TokenClsConfig(scheme="IOB2"))


def test_config_checks() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="stride = 64 must be less than half of max_length = 128"):
        TokenClsConfig(max_length=128, long_inputs="window", stride=64)
    TokenClsConfig(max_length=64, stride=32)  # stride only matters for windows
    with pytest.raises(ValidationError, match="label_list has duplicates"):
        TokenClsConfig(label_list=["O", "O"])
    with pytest.raises(ValidationError):
        TokenClsConfig(scheme="BILOU")


def test_model_kwargs_and_task_wiring(tokenizer: Any) -> None:
    kwargs = TASK.model_kwargs(ctx_for(tokenizer))
    assert kwargs["num_labels"] == 9 and kwargs["id2label"][7] == "B-PER" and kwargs["label2id"]["I-PER"] == 8
    assert TASK.peft_task_type(None) == "TOKEN_CLS" and TASK.head_modules == ("classifier", "score")
    assert TASK.best_metric(TokenClsConfig()) == ("f1", True)
    assert TASK.model_class(None).__name__ == "AutoModelForTokenClassification"


# ── postprocess and metrics ─────────────────────────────────────────────────────────────────────────


def oracle_logits(features: dict[str, list[Any]], num_labels: int, pad_to: int) -> Any:
    """Logits that put all mass on the gold label where there is one, padded with -100 like the Trainer."""
    import numpy as np

    logits = np.full((len(features["labels"]), pad_to, num_labels), -100.0, dtype=np.float32)
    for row, labels in enumerate(features["labels"]):
        logits[row, : len(labels)] = 0.0
        for position, label in enumerate(labels):
            if label != IGNORED_LABEL:
                logits[row, position, label] = 10.0
    return logits


@pytest.mark.parametrize("long_inputs", ["truncate", "window"])
def test_postprocess_gives_one_tag_per_word_and_cut_words_count_as_errors(
    tokenizer: Any, long_inputs: str, caplog: pytest.LogCaptureFixture
) -> None:
    words = long_sentence()
    tags = ["O"] * len(words)
    tags[words.index("Hans-Peter")], tags[words.index("Müller")] = "B-PER", "I-PER"
    tags[words.index("Stratford-upon-Avon")] = "B-LOC"
    examples = dataset_dict(test=[{"tokens": words, "tags": tags}, {"tokens": ["Rome", "\u200b"], "tags": [
        "B-LOC", "O"]}])["test"]  # fmt: skip
    ctx = ctx_for(tokenizer, max_length=24, long_inputs=long_inputs, stride=6)
    features = preprocess(examples.to_dict(), ctx, False)
    eval_prediction = SimpleNamespace(predictions=oracle_logits(features, 9, pad_to=40), label_ids=None)
    with caplog.at_level(logging.WARNING, logger="peftkit.tasks.token_cls"):
        predictions, references = postprocess(examples, features["input_ids"], eval_prediction, ctx)
    assert references == [tags, ["B-LOC", "O"]]
    assert [len(p) for p in predictions] == [len(words), 2]
    assert predictions[1] == ["B-LOC", "O"]
    metrics = TASK.compute_metrics(predictions, references, ctx)
    if long_inputs == "window":
        assert predictions[0] == tags
        assert metrics["f1"] == 1.0 and metrics["accuracy"] == 1.0
        assert "cut by max_length" not in caplog.text
    else:
        kept = len(
            {w for w in encode_words([words], tokenizer, ctx.cfg).windows[0].word_ids if w is not None}
        )
        assert predictions[0][:kept] == tags[:kept] and predictions[0][kept:] == ["O"] * (len(words) - kept)
        assert metrics["LOC_recall"] == 0.5  # Stratford-upon-Avon was cut: a missed entity, not a dropped one
        assert metrics["accuracy"] == pytest.approx((len(words) + 2 - 1) / (len(words) + 2))
        assert f"{len(words) - kept} word(s) in 1 of 2 sentences were cut by max_length = 24" in caplog.text


def test_postprocess_refuses_predictions_that_do_not_match_the_examples(tokenizer: Any) -> None:
    examples = {"tokens": [["a"], ["b"]], "tags": [["O"], ["O"]]}
    eval_prediction = SimpleNamespace(predictions=oracle_logits({"labels": [[0]]}, 9, 3))
    with pytest.raises(ValueError, match="1 predictions for 2 windows of 2 examples"):
        postprocess(examples, None, eval_prediction, ctx_for(tokenizer))


def test_compute_metrics_for_pos_tags_reports_accuracy_and_macro_f1(tokenizer: Any) -> None:
    ctx = ctx_for(tokenizer, ("NN", "DT", "VB"))
    metrics = TASK.compute_metrics([["DT", "NN", "NN"]], [["DT", "NN", "VB"]], ctx)
    assert metrics == {"accuracy": pytest.approx(2 / 3), "f1": pytest.approx((1 + 2 / 3 + 0) / 3)}


def test_split_words_keeps_exact_offsets() -> None:
    text = "  Dr. O'Neil paid $3,500.50 for the third-party café\u0301 in São Paulo!\u200b ok\t"
    words, offsets = split_words(text)
    assert words == ["Dr", ".", "O'Neil", "paid", "$", "3,500.50", "for", "the", "third-party", "café\u0301",
                     "in", "São", "Paulo", "!", "\u200b", "ok"]  # fmt: skip
    assert [text[start:end] for start, end in offsets] == words
