"""Evaluation of a trained model: one split through the Trainer, or a saved run from its directory."""

from __future__ import annotations

import os
from typing import Any

from peftkit import runs
from peftkit.tasks.base import Task, TaskContext


def evaluate_split(
    trainer: Any, task: Task, ctx: TaskContext, examples: Any, features: Any, split: str
) -> tuple[dict[str, float], list[Any], list[Any]]:
    """Predict a split with the trainer; return its metrics, per-example predictions and references."""
    saved = trainer.compute_metrics
    trainer.compute_metrics = None  # postprocess once, here
    try:
        output = trainer.predict(features, metric_key_prefix=split)
    finally:
        trainer.compute_metrics = saved
    predictions, references = task.postprocess(examples, features, output, ctx)
    metrics = {k.removeprefix(f"{split}_"): v for k, v in output.metrics.items()}
    metrics.update(task.compute_metrics(predictions, references, ctx))
    return metrics, predictions, references


def evaluate_run(
    run_dir: str | os.PathLike[str], split: str = "test", *, trust_remote_code: bool = False
) -> dict[str, float]:
    """Re-evaluate a saved run on one of its recipe's splits (from the run directory alone)."""
    from transformers import Trainer, TrainingArguments

    from peftkit.data import load_raw_datasets, tokenize_splits
    from peftkit.errors import DataError

    loaded = runs.load_run(run_dir, trust_remote_code=trust_remote_code)
    raw = load_raw_datasets(loaded.recipe.data, loaded.task)
    if split not in raw:
        raise DataError(f"the recipe's data has no {split!r} split (it has {sorted(raw)})")
    check_split_labels(loaded, raw, split)
    features = tokenize_splits({split: raw[split]}, loaded.task, loaded.ctx, loaded.recipe.data.num_proc)
    import tempfile

    import torch

    args_cls = loaded.task.training_args_class() if loaded.task.training_args_class else TrainingArguments
    with tempfile.TemporaryDirectory() as scratch:
        args = args_cls(  # the task's class: seq2seq's carries the generation settings
            output_dir=scratch,
            per_device_eval_batch_size=loaded.recipe.train.get("per_device_eval_batch_size", 64),
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            dataloader_pin_memory=False,
        )
        trainer_cls = loaded.task.trainer_class() if loaded.task.trainer_class else Trainer
        trainer = trainer_cls(
            model=loaded.model,
            args=args,
            processing_class=loaded.ctx.tokenizer,
            data_collator=loaded.task.collator(loaded.ctx, loaded.model),
        )
        metrics, _, _ = evaluate_split(trainer, loaded.task, loaded.ctx, raw[split], features[split], split)
    return metrics


def check_split_labels(loaded: runs.LoadedRun, raw: Any, split: str) -> None:
    """The split has labels (a split without them is predicted, never scored), and they are ones the run
    was trained on (else tokenizing it fails deep inside a map).

    The task's own label discovery runs on the train split and this one, as in training, and must find
    the run's labels (labels.json) again.
    """
    from datasets import DatasetDict

    from peftkit.data import is_labelled
    from peftkit.errors import DataError

    if not is_labelled(raw[split], loaded.task):
        origin = split_origin(loaded.recipe.data, split)
        raise DataError(
            f"{origin + ': ' if origin else ''}the {split} split has no labels "
            f"({', '.join(loaded.task.reference_columns)}): there is nothing to score it against; the run's "
            f"{runs.predictions_file(split)} holds its predictions, or use peftkit predict"
        )
    subset = DatasetDict({name: raw[name] for name in dict.fromkeys(("train", split))})
    try:
        labels = loaded.task.prepare_labels(subset, loaded.recipe.task)
    except DataError as exc:
        message = str(exc)
        named = next((name for name in subset if message.startswith(f"{name} split")), None)
        origin = split_origin(loaded.recipe.data, named) if named else None
        raise DataError(f"{origin}: {message}" if origin else message) from None
    expected = loaded.ctx.labels
    found = tuple(labels) if labels is not None else None
    if found != (tuple(expected) if expected is not None else None):
        origin = split_origin(loaded.recipe.data, "train")
        raise DataError(
            f"{origin + ': ' if origin else ''}the data's labels {list(found or [])} differ from the run's "
            f"{list(expected or [])} ({loaded.run_dir / runs.LABELS}): the data changed since training; "
            "evaluate on the data the run was trained on"
        )


def split_origin(section: Any, split: str) -> str | None:
    """Where a split of the recipe's data comes from, for messages: its file, or the dataset."""
    files = {"train": section.train_file, "validation": section.validation_file, "test": section.test_file}
    if section.dataset:
        return f"{section.dataset} ({split} split)"
    if split == "validation" and not files["validation"]:
        return files["train"]  # carved out of the training file
    return files.get(split)
