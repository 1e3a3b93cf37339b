"""Sequence classification and regression metrics (scikit-learn and scipy underneath)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def classification_metrics(
    predictions: Sequence[Any], references: Sequence[Any], labels: Sequence[Any]
) -> dict[str, float]:
    """Accuracy, macro-F1, MCC and per-class precision/recall/F1 (``f1_<label>``...).

    ``labels`` fixes the class order and makes classes absent from this split still reported (as 0).
    """
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, precision_recall_fscore_support

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return {}
    labels = list(labels)
    out: dict[str, float] = {
        "accuracy": float(accuracy_score(references, predictions)),
        "f1_macro": float(f1_score(references, predictions, labels=labels, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(references, predictions)),
    }
    precision, recall, f1, support = precision_recall_fscore_support(
        references, predictions, labels=labels, average=None, zero_division=0
    )
    for i, label in enumerate(labels):
        out[f"precision_{label}"] = float(precision[i])
        out[f"recall_{label}"] = float(recall[i])
        out[f"f1_{label}"] = float(f1[i])
        out[f"support_{label}"] = float(support[i])
    return out


def regression_metrics(predictions: Sequence[float], references: Sequence[float]) -> dict[str, float]:
    """MSE, RMSE, MAE, Pearson and Spearman correlation (NaN when a side is constant)."""
    from scipy.stats import pearsonr, spearmanr

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return {}
    n = len(references)
    errors = [float(p) - float(r) for p, r in zip(predictions, references, strict=True)]
    mse = sum(e * e for e in errors) / n
    out = {"mse": mse, "rmse": math.sqrt(mse), "mae": sum(abs(e) for e in errors) / n}
    constant = len(set(predictions)) < 2 or len(set(references)) < 2
    out["pearson"] = float("nan") if constant else float(pearsonr(predictions, references)[0])
    out["spearman"] = float("nan") if constant else float(spearmanr(predictions, references)[0])
    return out
