"""The fine-tuning run: recipe → data → model → adapter → Trainer → run directory.

``finetune`` reads top to bottom; each step is one call into the module that owns it.
"""

from __future__ import annotations

import logging
import os
import resource
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit import runs
from peftkit.recipe import TRAIN_OWN_KEYS, Recipe
from peftkit.tasks import TASKS
from peftkit.tasks.base import Task, TaskContext

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]


def finetune(recipe: Recipe, *, overwrite: bool = False, resume: bool = False) -> RunResult:
    """Fine-tune the recipe's base model with its adapter and write the run directory."""
    from transformers import set_seed

    from peftkit.adapters import apply_adapter, count_parameters
    from peftkit.data import data_fingerprints, load_raw_datasets, tokenize_splits
    from peftkit.modeling import load_model, load_model_config, load_tokenizer

    started = time.time()
    run_dir = recipe.output_dir.resolve()
    main = runs.is_main_process()
    if main:
        runs.prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
    task = TASKS[recipe.task_name]
    set_seed(recipe.train["seed"])
    if main:
        runs.write_json_atomic(run_dir / runs.RUN_META, _run_meta(recipe, status="running"))

    try:
        # setup
        tokenizer = load_tokenizer(recipe.model)
        model_config = load_model_config(recipe.model)
        # data
        raw = load_raw_datasets(recipe.data, task.columns)
        labels = task.prepare_labels(raw, recipe.task)
        ctx = TaskContext(cfg=recipe.task, tokenizer=tokenizer, labels=labels, model_config=model_config)
        features = tokenize_splits(raw, task, ctx, num_proc=recipe.data.num_proc)
        # model and adapter
        model = load_model(recipe.model, task, ctx, recipe.quantization)
        if recipe.quantization is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=bool(recipe.train.get("gradient_checkpointing"))
            )
        model = apply_adapter(model, recipe.adapter, task, model_config)
        trainable, total = count_parameters(model)
        # train
        trainer = build_trainer(recipe, task, ctx, model, raw, features, run_dir)
        checkpoint = _resume_checkpoint(run_dir) if resume else None
        train_output = trainer.train(resume_from_checkpoint=checkpoint)
        # evaluate the kept (best) model on validation and test
        metrics: dict[str, Any] = {"train": dict(train_output.metrics)}
        for split in ("validation", "test"):
            if split not in features:
                continue
            split_metrics, predictions, references = evaluate_split(
                trainer, task, ctx, raw[split], features[split], split
            )
            metrics[split] = split_metrics
            if main:
                records = [
                    {"prediction": p, **({"reference": references[i]} if references else {})}
                    for i, p in enumerate(predictions)
                ]
                runs.write_jsonl_atomic(run_dir / f"predictions_{split}.jsonl", records)
        metrics["trainable_params"] = trainable
        metrics["total_params"] = total
        metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        metrics["wall_time_s"] = round(time.time() - started, 1)
        metrics["best_checkpoint"] = trainer.state.best_model_checkpoint
        # save
        if main:
            save_run(trainer, recipe, task, ctx, run_dir, metrics, data_fingerprints(raw))
    except BaseException as exc:
        if main and (run_dir / runs.RUN_META).exists():
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            runs.update_meta(
                run_dir, status=status, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()
            )
        raise
    return RunResult(run_dir=run_dir, metrics=metrics)


def training_arguments(recipe: Recipe, task: Task, run_dir: Path) -> Any:
    """[train] (defaults applied) → the task's TrainingArguments class."""
    import torch
    from transformers import TrainingArguments

    args_cls = task.training_args_class() if task.training_args_class else TrainingArguments
    kwargs = {k: v for k, v in recipe.train.items() if k not in TRAIN_OWN_KEYS}
    metric, greater = task.best_metric(recipe.task)
    kwargs.setdefault("metric_for_best_model", metric)
    kwargs.setdefault("greater_is_better", greater)
    if recipe.train.get("deepspeed"):
        kwargs["deepspeed"] = recipe.train["deepspeed"]
    if not torch.cuda.is_available():
        kwargs.setdefault("use_cpu", True)  # multi-process CPU runs split data only with it (STACK-NOTES)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs.setdefault("average_tokens_across_devices", False)  # else the loss doubles (STACK-NOTES)
    return args_cls(output_dir=str(run_dir), **kwargs)


def build_trainer(
    recipe: Recipe,
    task: Task,
    ctx: TaskContext,
    model: Any,
    raw: Any,
    features: dict[str, Any],
    run_dir: Path,
) -> Any:
    from transformers import EarlyStoppingCallback, Trainer

    trainer_cls = with_shuffled_length_groups(task.trainer_class() if task.trainer_class else Trainer)
    args = training_arguments(recipe, task, run_dir)
    callbacks = []
    if recipe.train.get("early_stopping_patience"):
        callbacks.append(
            EarlyStoppingCallback(
                early_stopping_patience=recipe.train["early_stopping_patience"],
                early_stopping_threshold=recipe.train.get("early_stopping_threshold", 0.0),
            )
        )
    validation = "validation" in features and args.eval_strategy != "no"
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=features["train"],
        eval_dataset=features["validation"] if validation else None,
        processing_class=ctx.tokenizer,
        data_collator=task.collator(ctx, model),
        compute_metrics=metrics_function(task, ctx, raw["validation"], features["validation"])
        if validation
        else None,
        callbacks=callbacks,
    )


def with_shuffled_length_groups(trainer_cls: Any) -> Any:
    """The Trainer class with shuffled length-grouped training batches and evaluation in dataset order."""
    import torch

    from peftkit.batching import ShuffledLengthGroupedSampler

    class PeftkitTrainer(trainer_cls):
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            # The Trainer drops unused columns (our "length" too) before asking for a sampler: read the
            # lengths from the full training set, whose rows are the same in the same order.
            column = self.args.length_column_name
            lengths = getattr(self.train_dataset, "column_names", ())
            if self.args.train_sampling_strategy != "group_by_length" or column not in lengths:
                return super()._get_train_sampler(train_dataset)
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return ShuffledLengthGroupedSampler(self.train_dataset[column], batch)

        def _get_eval_sampler(self, eval_dataset: Any) -> Any:
            # transformers 5 also length-groups *evaluation* under group_by_length, which returns
            # predictions in a permuted order: per-example outputs (saved predictions, QA feature → example
            # maps) would silently pair with the wrong example. Evaluation keeps the dataset's order.
            if eval_dataset is None or self.args.world_size > 1:
                return super()._get_eval_sampler(eval_dataset)
            return torch.utils.data.SequentialSampler(eval_dataset)

    PeftkitTrainer.__name__ = PeftkitTrainer.__qualname__ = f"Peftkit{trainer_cls.__name__}"
    return PeftkitTrainer


def metrics_function(task: Task, ctx: TaskContext, examples: Any, features: Any) -> Any:
    """The Trainer's compute_metrics for one split: postprocess, then the task's metrics."""

    def compute(eval_prediction: Any) -> dict[str, float]:
        predictions, references = task.postprocess(examples, features, eval_prediction, ctx)
        return task.compute_metrics(predictions, references, ctx)

    return compute


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


def save_run(
    trainer: Any,
    recipe: Recipe,
    task: Task,
    ctx: TaskContext,
    run_dir: Path,
    metrics: dict[str, Any],
    fingerprints: dict[str, Any],
) -> None:
    """Adapter, tokenizer, config with labels, labels.json, metrics, plots; status last."""
    from peftkit.plots import plot_curves

    trainer.save_model(str(run_dir))  # adapter_config.json + adapter_model.safetensors + tokenizer
    # the Trainer also pickles its arguments there; the resolved recipe in peftkit_run.json replaces it
    (run_dir / "training_args.bin").unlink(missing_ok=True)
    base_config = trainer.model.get_base_model().config
    base_config.save_pretrained(str(run_dir))  # id2label/label2id travel with the adapter
    runs.write_json_atomic(
        run_dir / runs.LABELS,
        {"labels": list(ctx.labels) if ctx.labels is not None else None, "task": task.name},
    )
    runs.write_json_atomic(run_dir / runs.METRICS, metrics)
    metric, _ = task.best_metric(recipe.task)
    plot_curves(trainer.state.log_history, run_dir / "plots", metric)
    runs.write_json_atomic(run_dir / "log_history.json", trainer.state.log_history)
    runs.update_meta(
        run_dir, status="completed", data=fingerprints, labels=list(ctx.labels or []), error=None
    )


def _run_meta(recipe: Recipe, status: str) -> dict[str, Any]:
    return {
        "name": recipe.name,
        "status": status,
        "recipe_source": str(Path(recipe.source).resolve()) if recipe.source != "<dict>" else recipe.source,
        "recipe": recipe.to_dict(),
        "seed": recipe.train["seed"],
        "versions": runs.package_versions(),
        "git_commit": runs.git_commit(Path(__file__).parent),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _resume_checkpoint(run_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    if last is None:
        logger.warning("--resume: no checkpoint in %s, starting from the beginning", run_dir)
    return last


def evaluate_run(run_dir: str | os.PathLike[str], split: str = "test") -> dict[str, float]:
    """Re-evaluate a saved run on one of its recipe's splits (from the run directory alone)."""
    from transformers import Trainer, TrainingArguments

    from peftkit.data import load_raw_datasets, tokenize_splits
    from peftkit.errors import DataError

    loaded = runs.load_run(run_dir)
    raw = load_raw_datasets(loaded.recipe.data, loaded.task.columns)
    if split not in raw:
        raise DataError(f"the recipe's data has no {split!r} split (it has {sorted(raw)})")
    features = tokenize_splits({split: raw[split]}, loaded.task, loaded.ctx, loaded.recipe.data.num_proc)
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
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
