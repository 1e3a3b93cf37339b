"""Error analysis: ``peftkit evaluate RUN_DIR --errors N`` writes the worst N examples of a split.

The examples are predicted with the task's own ``predict`` (the path ``peftkit predict`` takes, which
reproduces the run's saved predictions) and ranked by a per-example score, worst first:

- seq_cls: misclassified examples first, then by the probability given to the true class (lowest first);
  regression: largest absolute error first;
- token_cls: per-sentence entity F1 (IOB2/IOBES tags; 1.0 when neither side has an entity) or per-word
  accuracy (other tags), lowest first, then most wrong words;
- qa: per-question F1 against the best gold answer (SQuAD normalisation), lowest first;
- seq2seq: sentence chrF, lowest first.

Each line of the output file holds the example's index in the split, its inputs, reference, prediction
and score.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftkit.errors import DataError, PeftkitError


def worst_examples(
    run_dir: str | os.PathLike[str], split: str, count: int, output: str | os.PathLike[str] | None = None
) -> tuple[Path, list[dict[str, Any]]]:
    """Predict ``split`` with the run, rank its examples worst first, write the first ``count`` as JSONL."""
    from peftkit import runs
    from peftkit.data import load_raw_datasets
    from peftkit.evaluation import check_split_labels

    if count < 1:
        raise PeftkitError(f"--errors {count}: give the number of worst examples to write (at least 1)")
    loaded = runs.load_run(run_dir)
    raw = load_raw_datasets(loaded.recipe.data, loaded.task.columns)
    if split not in raw:
        raise DataError(f"the recipe's data has no {split!r} split (it has {sorted(raw)})")
    check_split_labels(loaded, raw, split)
    records = raw[split].to_list()
    scorer = SCORERS.get(loaded.task.name)
    if scorer is None:
        raise PeftkitError(f"--errors is not available for the {loaded.task.name!r} task")
    inputs = [{k: v for k, v in r.items() if k in INPUT_COLUMNS[loaded.task.name]} for r in records]
    predictions = loaded.task.predict(loaded.model, loaded.ctx, inputs)
    ranked = []
    for index, (record, predicted) in enumerate(zip(records, predictions, strict=True)):
        entry = scorer(record, predicted, loaded.ctx)
        ranked.append({"index": index, **entry})
    ranked.sort(key=lambda e: e.pop("_rank"))
    worst = ranked[:count]
    path = Path(output) if output else Path(run_dir) / f"errors_{split}.jsonl"
    runs.write_jsonl_atomic(path, worst)
    return path, worst


INPUT_COLUMNS = {
    "seq_cls": ("text", "text_pair"),
    "token_cls": ("tokens",),
    "qa": ("id", "question", "context"),
    "seq2seq": ("source",),
}


def _seq_cls(record: dict[str, Any], predicted: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from peftkit.tasks.seq_cls import _label_id

    inputs: dict[str, Any] = {k: record[k] for k in ("text", "text_pair") if k in record}
    if ctx.labels is None:
        reference = float(record["label"])
        error = abs(predicted["prediction"] - reference)
        return {
            **inputs,
            "reference": reference,
            "prediction": predicted["prediction"],
            "abs_error": error,
            "_rank": (-error,),
        }
    reference = ctx.labels[int(_label_id(record["label"], ctx))]
    true_probability = float(predicted["scores"][reference])
    wrong = predicted["prediction"] != reference
    return {
        **inputs,
        "reference": reference,
        "prediction": predicted["prediction"],
        "correct": not wrong,
        "true_class_probability": true_probability,
        "scores": predicted["scores"],
        "_rank": (not wrong, true_probability),
    }


def _token_cls(record: dict[str, Any], predicted: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from peftkit.metrics.tagging import decode_entities
    from peftkit.tasks.token_cls import _example_tags, resolve_scheme

    reference = _example_tags(record["tags"], ctx)
    prediction = list(predicted["prediction"])
    wrong = sum(g != p for g, p in zip(reference, prediction, strict=True))
    scheme = resolve_scheme(ctx.cfg.scheme, ctx.labels or ())
    if scheme == "none":
        score_name, score = "accuracy", 1 - wrong / len(reference) if reference else 1.0
    else:
        gold = set(decode_entities(reference, scheme))
        found = set(decode_entities(prediction, scheme))
        hits = len(gold & found)
        score_name = "f1"
        score = 1.0 if not gold and not found else 2 * hits / (len(gold) + len(found))
    return {
        "tokens": record["tokens"],
        "reference": reference,
        "prediction": prediction,
        "wrong_words": wrong,
        score_name: score,
        "_rank": (score, -wrong),
    }


def _qa(record: dict[str, Any], predicted: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from peftkit.metrics.squad import _scorable_golds, f1_score

    golds = list((record.get("answers") or {}).get("text") or [])
    answer = str(predicted["prediction"])
    score = max(f1_score(answer, gold) for gold in _scorable_golds(golds))
    return {
        "id": record.get("id"),
        "question": record["question"],
        "context": record["context"],
        "reference": golds,
        "prediction": answer,
        "f1": score,
        "_rank": (score,),
    }


def _seq2seq(record: dict[str, Any], predicted: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from sacrebleu.metrics import CHRF

    reference, prediction = str(record["target"]), str(predicted["prediction"])
    score = float(CHRF().sentence_score(prediction, [reference]).score)
    return {
        "source": record["source"],
        "reference": reference,
        "prediction": prediction,
        "chrf": score,
        "_rank": (score,),
    }


SCORERS: dict[str, Callable[[dict[str, Any], dict[str, Any], Any], dict[str, Any]]] = {
    "seq_cls": _seq_cls,
    "token_cls": _token_cls,
    "qa": _qa,
    "seq2seq": _seq2seq,
}
