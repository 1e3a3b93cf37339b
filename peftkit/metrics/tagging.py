"""Metrics for word-level tagging: entity-level scores for BIO-style tags, tag scores for everything else.

Both functions take one tag list per sentence (gold first, prediction second, as sklearn and seqeval do)
and always report ``accuracy`` (the fraction of words whose tag is right) and ``f1``, so that a run can
select checkpoints on ``f1`` whatever the tag set:

- entity tags (IOB2/IOBES): ``f1`` is the micro entity F1 under seqeval's *strict* mode, in which an entity
  counts only when its type and both boundaries match, and a tag sequence that the scheme forbids (an
  ``I-`` after ``O`` in IOB2) does not make an entity;
- other tags (part-of-speech tagging): ``f1`` is the macro F1 over the tags seen in gold or prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

EntityScheme = Literal["IOB2", "IOBES"]


def _check_aligned(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> None:
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} gold sentences but {len(predictions)} predicted ones")
    for index, (gold, predicted) in enumerate(zip(references, predictions, strict=True)):
        if len(gold) != len(predicted):
            raise ValueError(f"sentence {index}: {len(gold)} gold tags but {len(predicted)} predicted tags")


def token_accuracy(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> float:
    """Fraction of words tagged right (0.0 when there are no words)."""
    _check_aligned(references, predictions)
    total = sum(len(gold) for gold in references)
    correct = sum(
        g == p
        for gold, predicted in zip(references, predictions, strict=True)
        for g, p in zip(gold, predicted, strict=True)
    )
    return correct / total if total else 0.0


def decode_entities(tags: Sequence[str], scheme: EntityScheme) -> list[tuple[str, int, int]]:
    """The ``(type, start, end)`` word spans (end exclusive) that strict ``scheme`` decoding finds."""
    from seqeval.scheme import IOB2, IOBES, Tokens

    token_class = IOB2 if scheme == "IOB2" else IOBES
    return [(entity.tag, entity.start, entity.end) for entity in Tokens(list(tags), token_class).entities]


def _prf(true_positives: int, predicted: int, gold: int) -> tuple[float, float, float]:
    precision = true_positives / predicted if predicted else 0.0
    recall = true_positives / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def entity_scores(
    references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]], scheme: EntityScheme
) -> dict[str, float]:
    """Strict entity precision/recall/F1 (micro over all entities), per entity type, and token accuracy.

    Keys: ``precision recall f1 accuracy`` and, for each type seen in gold or prediction,
    ``<TYPE>_precision <TYPE>_recall <TYPE>_f1 <TYPE>_support`` (support = number of gold entities).
    A score whose denominator is zero is 0.0 (no entity predicted → precision 0).
    """
    _check_aligned(references, predictions)
    gold_entities = {
        (index, *span) for index, tags in enumerate(references) for span in decode_entities(tags, scheme)
    }
    predicted_entities = {
        (index, *span) for index, tags in enumerate(predictions) for span in decode_entities(tags, scheme)
    }
    precision, recall, f1 = _prf(
        len(gold_entities & predicted_entities), len(predicted_entities), len(gold_entities)
    )
    scores = {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": token_accuracy(references, predictions),
    }
    for entity_type in sorted({entity[1] for entity in gold_entities | predicted_entities}):
        gold_of_type = {entity for entity in gold_entities if entity[1] == entity_type}
        predicted_of_type = {entity for entity in predicted_entities if entity[1] == entity_type}
        type_precision, type_recall, type_f1 = _prf(
            len(gold_of_type & predicted_of_type), len(predicted_of_type), len(gold_of_type)
        )
        scores[f"{entity_type}_precision"] = type_precision
        scores[f"{entity_type}_recall"] = type_recall
        scores[f"{entity_type}_f1"] = type_f1
        scores[f"{entity_type}_support"] = float(len(gold_of_type))
    return scores


def tag_scores(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> dict[str, float]:
    """Token accuracy and macro F1 over tags (for tag sets without entity structure, e.g. POS).

    Macro F1 averages the per-tag F1 over every tag that occurs in gold or prediction, so rare tags
    weigh as much as frequent ones; a tag only ever predicted (never gold) scores 0.
    """
    from sklearn.metrics import f1_score

    _check_aligned(references, predictions)
    gold_flat = [tag for tags in references for tag in tags]
    predicted_flat = [tag for tags in predictions for tag in tags]
    macro_f1 = (
        float(f1_score(gold_flat, predicted_flat, average="macro", zero_division=0)) if gold_flat else 0.0
    )
    return {"accuracy": token_accuracy(references, predictions), "f1": macro_f1}
