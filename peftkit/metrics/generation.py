"""Text generation metrics (ROUGE, sacreBLEU, chrF), computed offline, and decoding of generated ids.

All scores are on a 0-100 scale. sacreBLEU and chrF are corpus-level (the statistics of every
sentence are pooled before the score is taken), as in the sacreBLEU reference implementation;
ROUGE is the mean of the per-example F-measures, as in the usual summarisation reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

GENERATION_METRICS = ("rouge", "sacrebleu", "chrf")


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures (Porter stemming), averaged over examples.

    rouge-score's tokenizer keeps only ``[a-z0-9]`` runs after lower-casing, so ROUGE is meaningful for
    English text only; use chrF for other languages.
    """
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    if not references:
        return {}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # rouge-score's order is (target, prediction)
        for name in totals:
            totals[name] += scores[name].fmeasure
    return {name: 100.0 * total / len(references) for name, total in totals.items()}


def sacrebleu_score(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU with sacreBLEU's defaults (13a tokenization, exponential smoothing), one reference each."""
    from sacrebleu.metrics import BLEU

    _check_lengths(predictions, references)
    return float(BLEU().corpus_score(list(predictions), [list(references)]).score)


def chrf_score(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (character 6-grams, beta 2, no word n-grams) with sacreBLEU's defaults."""
    from sacrebleu.metrics import CHRF

    _check_lengths(predictions, references)
    return float(CHRF().corpus_score(list(predictions), [list(references)]).score)


def generation_metrics(
    predictions: Sequence[str], references: Sequence[str], names: Sequence[str] = GENERATION_METRICS
) -> dict[str, float]:
    """The metrics named in ``names`` ("rouge" gives rouge1/rouge2/rougeL), plus the mean prediction length.

    ``gen_len`` (mean number of whitespace-separated words per prediction) shows at a glance whether a model
    stops too early or never stops.
    """
    unknown = [n for n in names if n not in GENERATION_METRICS]
    if unknown:
        raise ValueError(f"unknown generation metric(s) {unknown}; choose from {list(GENERATION_METRICS)}")
    _check_lengths(predictions, references)
    if not references:
        return {}
    out: dict[str, float] = {}
    if "rouge" in names:
        out.update(rouge_scores(predictions, references))
    if "sacrebleu" in names:
        out["sacrebleu"] = sacrebleu_score(predictions, references)
    if "chrf" in names:
        out["chrf"] = chrf_score(predictions, references)
    out["gen_len"] = sum(len(p.split()) for p in predictions) / len(predictions)
    return out


def decode_token_ids(token_ids: Any, tokenizer: Any) -> list[str]:
    """Token id rows (generated ids or labels, possibly padded with -100) → stripped texts.

    -100 (the Trainer's padding of predictions and the label mask) becomes the pad token, and special tokens
    (pad, EOS, BOS, chat markers) are skipped, so padding never reaches the text.
    """
    import numpy as np

    ids = np.asarray(token_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; cannot decode padded ids")
    ids = np.where(ids < 0, pad_id, ids)
    texts = tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
    return [text.strip() for text in texts]


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
