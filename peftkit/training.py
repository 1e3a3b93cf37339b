"""The fine-tuning run: recipe → data → model → adapter → Trainer → run directory.

``finetune`` reads top to bottom; each step is one call into the module that owns it. The run's life
around training (run directory, status, resume, signals, rank 0) is :func:`peftkit.lifecycle.run_lifecycle`;
the Trainer is built by :mod:`peftkit.trainer`; evaluation is :mod:`peftkit.evaluation`.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.recipe import Recipe

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    kept: str = ""  # which weights the run kept and why (trainer.kept_model)


def finetune(
    recipe: Recipe, *, overwrite: bool = False, resume: bool = False, callbacks: Sequence[Any] = ()
) -> RunResult:
    """Fine-tune the recipe's base model with its adapter and write the run directory.

    ``resume`` (or ``[train] resume = "auto"``) continues the run in the output directory from its newest
    complete checkpoint; with none there, training starts from the beginning. ``callbacks`` are extra
    TrainerCallbacks (``peftkit sweep`` reports intermediate metrics to Optuna through one).
    """
    from transformers import set_seed

    from peftkit import fused_lora, runs
    from peftkit.adapters import (
        apply_adapter,
        count_parameters,
        fill_planned_steps,
        initialize_from_data,
    )
    from peftkit.card import write_run_card
    from peftkit.data import data_fingerprints, is_labelled, load_raw_datasets, tokenize_splits
    from peftkit.evaluation import evaluate_split
    from peftkit.lifecycle import run_lifecycle
    from peftkit.modeling import load_model_config, load_model_for_training, load_tokenizer_and_pad_policy
    from peftkit.plan import measure_optimizer_state
    from peftkit.preflight import check_recipe, training_arguments
    from peftkit.tasks import TASKS
    from peftkit.tasks.base import TaskContext
    from peftkit.trainer import build_trainer, kept_model, save_trained_model

    started = time.time()
    task = TASKS[recipe.task_name]
    # what peftkit validate checks against the libraries and the model, before anything is written
    check_recipe(recipe, with_training_arguments=False)
    args = training_arguments(recipe, task, recipe.output_dir.resolve())
    with run_lifecycle(recipe, args, overwrite=overwrite, resume=resume) as run:
        # setup
        set_seed(recipe.train["seed"])
        tokenizer, pad_policy = load_tokenizer_and_pad_policy(recipe.model)
        run.main_only(runs.update_meta, run.dir, pad_token=pad_policy)
        model_config = load_model_config(recipe.model)
        # data: in a distributed launch the main process loads and tokenizes first, filling the datasets
        # cache, and the others then read it
        with args.main_process_first(local=True, desc="loading and tokenizing data"):
            raw = load_raw_datasets(recipe.data, task)
            labels = task.prepare_labels(raw, recipe.task)
            # early, so that a checkpoint of an interrupted run can be used on its own
            run.main_only(runs.write_labels, run.dir, task.name, labels)
            ctx = TaskContext(cfg=recipe.task, tokenizer=tokenizer, labels=labels, model_config=model_config)
            features = tokenize_splits(raw, task, ctx, num_proc=recipe.data.num_proc)
        # model and adapter
        gradient_checkpointing = bool(recipe.train.get("gradient_checkpointing"))
        model = load_model_for_training(recipe.model, task, ctx, recipe.quantization, gradient_checkpointing)
        adapter_options = fill_planned_steps(recipe.adapter, planned_steps(args, len(features["train"])))
        model = apply_adapter(model, adapter_options, task, model_config, seed=recipe.train["seed"])
        trainable, total = count_parameters(model)
        # train
        trainer = build_trainer(
            recipe, task, ctx, model, raw, features, args, stop=run.stop, extra_callbacks=callbacks
        )
        if run.checkpoint is None:  # a resumed run loads its trained adapter instead
            initialize_from_data(model, trainer.get_train_dataloader())  # EVA only
        if recipe.train.get("fused_lora", True) and recipe.adapter["method"] == "lora":
            # after EVA's data pass (it hooks peft's layers); the same run as peft's layers, with fewer
            # saved activations (peftkit.fused_lora)
            fused_lora.install(model)
        with run.training(trainer):
            checkpoint = str(run.checkpoint) if run.checkpoint else None
            train_output = trainer.train(resume_from_checkpoint=checkpoint)
        # save first: nothing that can fail later (evaluation, a test split without labels) loses the
        # adapter. Every rank joins (under ZeRO-3 save_model gathers the adapter's shards); rank 0 writes
        saved = save_trained_model(
            trainer,
            run.dir,
            task.best_metric(recipe.task)[0],
            main=run.main,
            # seq2seq cuts the source text (max_source_length) before the prompt is built, and ignores
            # max_length: no length of the rendered prompt to record
            model_max_length=None
            if hasattr(recipe.task, "max_source_length")
            else getattr(recipe.task, "max_length", None),
            base_weights=bool(recipe.train.get("save_base_weights", True)),
            base_record=runs.base_model_record(recipe, run.dir),
            system_prompt=task.inference_settings(ctx).get("system_prompt"),
        )
        # evaluate the kept (best) model on validation and test; a split without labels is only predicted
        # transformers' PrinterCallback (the log without progress bars) pops total_flos from the very dict
        # train() returns; the state still holds it
        metrics: dict[str, Any] = {
            "train": {**train_output.metrics, "total_flos": float(trainer.state.total_flos)}
        }
        for split in ("validation", "test"):
            if split not in features:
                continue
            split_metrics, predictions, references = evaluate_split(
                trainer, task, ctx, raw[split], features[split], split
            )
            run.main_only(runs.write_predictions, run.dir, split, predictions, references)
            if is_labelled(raw[split], task):
                metrics[split] = split_metrics
            elif run.main:
                logger.info(
                    "the %s split has no labels: %d predictions written to %s, no %s metrics",
                    split,
                    len(predictions),
                    runs.predictions_file(split),
                    split,
                )
        metrics["trainable_params"] = trainable
        metrics["total_params"] = total
        # how much optimizer state is really 8-bit: bitsandbytes keeps tensors < 4096 elements in fp32
        metrics.update(measure_optimizer_state(trainer.optimizer))
        metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        metrics["wall_time_s"] = round(time.time() - started, 1)
        metrics["best_checkpoint"] = trainer.state.best_model_checkpoint
        if run.checkpoint is not None:
            metrics["resumed_from"] = str(run.checkpoint)
        # SHA-256 of what was saved and the base model's fingerprint: checked by every command loading the run
        integrity = run.main_only(runs.integrity_record, run.dir, saved, recipe.model)
        data = data_fingerprints(raw, task)
        # the run's own card (Hub metadata, a usage snippet for this folder) in place of peft's template
        run.main_only(write_run_card, run.dir, recipe.to_dict(), task, ctx, metrics, data)
        run.complete(task.name, ctx.labels, metrics, trainer.state.log_history, data, integrity=integrity)
    return RunResult(run_dir=run.dir, metrics=metrics, kept=kept_model(trainer.state, args))


def planned_steps(args: Any, train_rows: int) -> int:
    """The optimizer steps the Trainer will run: ``max_steps``, else epochs × steps per epoch."""
    import math

    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    world = max(int(getattr(args, "world_size", 1) or 1), 1)
    batches = math.ceil(train_rows / (args.per_device_train_batch_size * world))
    per_epoch = max(math.ceil(batches / max(args.gradient_accumulation_steps, 1)), 1)
    return max(math.ceil(per_epoch * args.num_train_epochs), 1)
