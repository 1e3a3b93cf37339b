"""Error analysis: ``peftkit evaluate RUN_DIR --errors N`` writes the worst N examples of a split.

The examples are predicted with the task's own ``predict`` (the path ``peftkit predict`` takes, which
reproduces the run's saved predictions) and ranked by the task's per-example score (``Task.score_example``),
worst first:

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
from pathlib import Path
from typing import Any

from peftkit.errors import DataError, PeftkitError


def worst_examples(
    run_dir: str | os.PathLike[str],
    split: str,
    count: int,
    output: str | os.PathLike[str] | None = None,
    *,
    trust_remote_code: bool = False,
) -> tuple[Path, list[dict[str, Any]]]:
    """Predict ``split`` with the run, rank its examples worst first, write the first ``count`` as JSONL."""
    from peftkit import runs
    from peftkit.data import load_raw_datasets
    from peftkit.evaluation import check_split_labels

    if count < 1:
        raise PeftkitError(f"--errors {count}: give the number of worst examples to write (at least 1)")
    loaded = runs.load_run(run_dir, trust_remote_code=trust_remote_code)
    raw = load_raw_datasets(loaded.recipe.data, loaded.task)
    if split not in raw:
        raise DataError(f"the recipe's data has no {split!r} split (it has {sorted(raw)})")
    check_split_labels(loaded, raw, split)
    records = raw[split].to_list()
    scorer = loaded.task.score_example
    if scorer is None:
        raise PeftkitError(f"--errors is not available for the {loaded.task.name!r} task")
    inputs = [{k: v for k, v in r.items() if k in loaded.task.input_columns} for r in records]
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
