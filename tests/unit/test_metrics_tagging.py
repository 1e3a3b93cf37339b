"""Tagging metrics on hand-computed examples: strict entity scores, token accuracy, macro tag F1."""

from __future__ import annotations

import pytest

from peftkit.metrics.tagging import decode_entities, entity_scores, tag_scores, token_accuracy


def test_a_predicted_entity_with_the_wrong_boundary_is_both_a_false_positive_and_a_miss() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    # PER predicted one word short; LOC and ORG right. Gold: 3 entities, predicted: 3, correct: 2.
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "O"]]
    scores = entity_scores(gold, pred, "IOB2")
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["accuracy"] == pytest.approx(5 / 6)  # one word of six wrong
    assert scores["PER_precision"] == 0.0 and scores["PER_recall"] == 0.0 and scores["PER_f1"] == 0.0
    assert scores["LOC_f1"] == 1.0 and scores["ORG_f1"] == 1.0
    assert scores["PER_support"] == 1.0 and scores["LOC_support"] == 1.0


def test_wrong_type_and_extra_entities_per_type() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"]]
    # PER right; LOC labelled ORG (a false ORG and a missed LOC); an extra MISC.
    pred = [["B-PER", "I-PER", "B-MISC", "B-ORG", "I-ORG", "O"]]
    scores = entity_scores(gold, pred, "IOB2")
    # predicted 3, gold 2, correct 1: P = 1/3, R = 1/2, F1 = 2PR/(P+R) = 0.4
    assert scores["precision"] == pytest.approx(1 / 3)
    assert scores["recall"] == pytest.approx(1 / 2)
    assert scores["f1"] == pytest.approx(0.4)
    assert scores["LOC_recall"] == 0.0 and scores["LOC_support"] == 1.0
    assert scores["ORG_precision"] == 0.0 and scores["ORG_support"] == 0.0
    assert scores["MISC_precision"] == 0.0
    assert scores["PER_f1"] == 1.0
    assert scores["accuracy"] == pytest.approx(3 / 6)


def test_strict_mode_an_i_tag_after_o_is_not_an_entity() -> None:
    # The lenient (conlleval) reading would accept I-PER as a PER entity here; strict IOB2 does not.
    scores = entity_scores([["O", "B-PER"]], [["O", "I-PER"]], "IOB2")
    assert scores["f1"] == 0.0 and scores["precision"] == 0.0 and scores["recall"] == 0.0
    assert scores["accuracy"] == 0.5


def test_iobes_entity_without_its_end_tag_does_not_count() -> None:
    gold = [["S-PER", "O", "B-LOC", "E-LOC"]]
    pred = [["S-PER", "O", "B-LOC", "I-LOC"]]  # LOC never closed: no entity under strict IOBES
    scores = entity_scores(gold, pred, "IOBES")
    assert scores["precision"] == 1.0
    assert scores["recall"] == 0.5
    assert scores["f1"] == pytest.approx(2 / 3)
    assert decode_entities(["B-LOC", "I-LOC", "E-LOC", "S-PER"], "IOBES") == [("LOC", 0, 3), ("PER", 3, 4)]


def test_agrees_with_seqeval_classification_report_in_strict_mode() -> None:
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    gold = [
        ["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "I-ORG", "I-ORG"],
        ["O", "B-MISC", "I-MISC", "O", "B-PER"],
        ["B-LOC", "B-LOC", "O"],
    ]
    pred = [
        ["B-PER", "I-PER", "O", "B-ORG", "O", "B-ORG", "I-ORG", "O"],
        ["O", "I-MISC", "I-MISC", "O", "B-PER"],
        ["B-LOC", "I-LOC", "O"],
    ]
    ours = entity_scores(gold, pred, "IOB2")
    report = classification_report(gold, pred, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    assert ours["precision"] == pytest.approx(report["micro avg"]["precision"])
    assert ours["recall"] == pytest.approx(report["micro avg"]["recall"])
    assert ours["f1"] == pytest.approx(report["micro avg"]["f1-score"])
    for entity_type in ("PER", "LOC", "ORG", "MISC"):
        assert ours[f"{entity_type}_f1"] == pytest.approx(report[entity_type]["f1-score"]), entity_type
        assert ours[f"{entity_type}_support"] == report[entity_type]["support"]


def test_no_entities_anywhere_scores_zero_f1_without_warnings() -> None:
    scores = entity_scores([["O", "O"]], [["O", "O"]], "IOB2")
    assert scores == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 1.0}


def test_tag_scores_macro_f1_by_hand() -> None:
    gold = [["NN", "VB", "NN"], ["DT", "NN"]]
    pred = [["NN", "NN", "NN"], ["DT", "JJ"]]
    # NN: tp 2, fp 1, fn 1 → P 2/3, R 2/3, F1 2/3. VB: F1 0. DT: F1 1. JJ (only predicted): F1 0.
    scores = tag_scores(gold, pred)
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["f1"] == pytest.approx((2 / 3 + 0 + 1 + 0) / 4)


def test_misaligned_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="sentence 1: 2 gold tags but 1 predicted"):
        token_accuracy([["O"], ["O", "O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="2 gold sentences but 1 predicted"):
        tag_scores([["NN"], ["NN"]], [["NN"]])
