"""Extractive question-answering metrics: SQuAD exact match and token F1 (v1.1, and v2.0 with splits).

Written to agree with the official SQuAD v2.0 evaluation script (``evaluate``'s ``squad`` metrics fetch their
scripts from the Hub, so they do not work offline). Scores are on the official 0-100 scale. An unanswerable
question has no gold answers and is right only when the prediction is empty after normalisation.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation and the articles a/an/the, and collapse whitespace (SQuAD's rule)."""
    text = text.lower()
    text = "".join(char for char in text if char not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    """1.0 when prediction and gold are equal after normalisation, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall (bag of normalised tokens), in [0, 1].

    When either side is empty (a no-answer), the score is 1.0 only if both are empty, as in SQuAD v2.0.
    """
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not prediction_tokens or not gold_tokens:
        return float(prediction_tokens == gold_tokens)
    common = collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def scorable_golds(golds: Sequence[str]) -> list[str]:
    """Gold answers that survive normalisation; none left means the question counts as unanswerable."""
    kept = [gold for gold in golds if normalize_answer(gold)]
    return kept or [""]


def squad_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    with_no_answer_splits: bool = False,
) -> dict[str, float]:
    """``exact_match`` and ``f1`` (0-100), each the mean over questions of the best score over gold answers.

    ``references[i]`` lists the gold answer texts of question ``i``; an empty list marks an unanswerable
    question (SQuAD v2.0). With ``with_no_answer_splits`` the result also holds ``HasAns_exact``,
    ``HasAns_f1``, ``NoAns_exact`` and ``NoAns_f1`` (left out when the split has no question, as the official
    script does) and the counts ``HasAns_total`` and ``NoAns_total``.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return {}
    exact: list[float] = []
    f1: list[float] = []
    for prediction, golds in zip(predictions, references, strict=True):
        scorable = scorable_golds(golds)
        exact.append(max(exact_match_score(prediction, gold) for gold in scorable))
        f1.append(max(f1_score(prediction, gold) for gold in scorable))
    out = {"exact_match": 100.0 * sum(exact) / len(exact), "f1": 100.0 * sum(f1) / len(f1)}
    if with_no_answer_splits:
        for split, wanted in (("HasAns", True), ("NoAns", False)):
            members = [i for i, golds in enumerate(references) if bool(golds) == wanted]
            out[f"{split}_total"] = float(len(members))
            if members:
                out[f"{split}_exact"] = 100.0 * sum(exact[i] for i in members) / len(members)
                out[f"{split}_f1"] = 100.0 * sum(f1[i] for i in members) / len(members)
    return out
