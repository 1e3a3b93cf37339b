"""SQuAD exact match / F1 against hand-computed values: normalisation, several gold answers, v2 splits."""

from __future__ import annotations

import pytest

from peftkit.metrics.squad import exact_match_score, f1_score, normalize_answer, squad_metrics


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The Cat!", "cat"),
        ("an apple, a pear and the plum.", "apple pear and plum"),
        ("  Theory   of\teverything ", "theory of everything"),  # "the" inside a word stays
        ("U.S.A.", "usa"),
        ("A", ""),
        ("Émile's (1889) fair", "émiles 1889 fair"),  # ASCII punctuation only; accents stay
    ],
)
def test_normalize_answer(text: str, normalised: str) -> None:
    assert normalize_answer(text) == normalised


def test_exact_match_ignores_case_punctuation_and_articles() -> None:
    assert exact_match_score("The Ring of Fire.", "ring of fire") == 1.0
    assert exact_match_score("Ring of Fire", "Ring of Fires") == 0.0


def test_f1_by_hand() -> None:
    # prediction tokens {cat, sat}; gold {cat, sat, down}: precision 1, recall 2/3 -> F1 0.8
    assert f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # repeated tokens count once each side: pred {red, red}, gold {red}: overlap 1, P 1/2, R 1 -> 2/3
    assert f1_score("red red", "red") == pytest.approx(2 / 3)
    assert f1_score("blue", "green") == 0.0
    # an empty side scores 1 only when both are empty (a correct no-answer)
    assert f1_score("", "") == 1.0
    assert f1_score("", "Paris") == 0.0
    assert f1_score("the", "") == 1.0  # "the" normalises to nothing


def test_metrics_by_hand_with_several_gold_answers() -> None:
    predictions = ["Paris", "the big red dog", "blue", "queen"]
    references = [["Paris"], ["red dog"], ["green"], ["A single queen", "queen"]]
    # EM: 1, 0, 0, 1 (best over the two golds) -> 50; F1: 1, 0.8, 0, 1 -> 70
    result = squad_metrics(predictions, references)
    assert result == {"exact_match": pytest.approx(50.0), "f1": pytest.approx(70.0)}


def test_best_gold_is_taken_per_metric() -> None:
    # gold "the dog" matches exactly; gold "big red dog" has the better F1 for another prediction
    assert squad_metrics(["dog"], [["big red dog", "the dog"]]) == {"exact_match": 100.0, "f1": 100.0}
    result = squad_metrics(["red dog"], [["big red dog", "cat"]])
    assert result["exact_match"] == 0.0
    assert result["f1"] == pytest.approx(100 * 0.8)  # P 1, R 2/3


def test_v2_splits_and_counts() -> None:
    predictions = ["Paris", "", "something", "", "x"]
    references = [["Paris"], [], [], ["x y"], ["x y"]]
    result = squad_metrics(predictions, references, with_no_answer_splits=True)
    # answerable: #0 EM1 F1 1; #3 EM0 F1 0; #4 EM0 F1 2/3 (P 1, R 1/2)
    # unanswerable: #1 right (empty), #2 wrong
    assert result["HasAns_total"] == 3.0
    assert result["NoAns_total"] == 2.0
    assert result["HasAns_exact"] == pytest.approx(100 / 3)
    assert result["HasAns_f1"] == pytest.approx(100 * (1 + 0 + 2 / 3) / 3)
    assert result["NoAns_exact"] == pytest.approx(50.0)
    assert result["NoAns_f1"] == pytest.approx(50.0)
    assert result["exact_match"] == pytest.approx(100 * 2 / 5)
    assert result["f1"] == pytest.approx(100 * (1 + 1 + 0 + 0 + 2 / 3) / 5)


def test_empty_split_scores_are_left_out_but_counted() -> None:
    result = squad_metrics(["Paris"], [["Paris"]], with_no_answer_splits=True)
    assert result["NoAns_total"] == 0.0
    assert "NoAns_exact" not in result and "NoAns_f1" not in result
    assert result["HasAns_exact"] == 100.0


def test_gold_that_normalises_to_nothing_counts_as_no_answer() -> None:
    # as in the official v2.0 script: such a gold is dropped and the question scored against ''
    assert squad_metrics([""], [["The"]]) == {"exact_match": 100.0, "f1": 100.0}


def test_length_mismatch_and_empty_input() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        squad_metrics(["a", "b"], [["a"]])
    assert squad_metrics([], []) == {}
