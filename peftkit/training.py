"""The fine-tuning run: recipe → data → model → adapter → Trainer → run directory.

``finetune`` reads top to bottom; each step is one call into the module that owns it.

Reliability: the run directory's status (peftkit_run.json) says ``running``, ``completed``, ``failed``
or ``interrupted``; SIGINT/SIGTERM during training save a checkpoint and stop cleanly; ``resume``
continues from the newest complete checkpoint with the same data order, so the result equals an
uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit import runs
from peftkit.errors import PeftkitError, RunDirError
from peftkit.recipe import TRAIN_OWN_KEYS, Recipe
from peftkit.tasks import TASKS
from peftkit.tasks.base import Task, TaskContext

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]


class TrainingInterrupted(PeftkitError):
    """SIGINT or SIGTERM stopped the run after saving a checkpoint; exits with 128 + the signal number."""

    def __init__(self, message: str, signum: int, summary: str):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.summary = summary


def finetune(
    recipe: Recipe, *, overwrite: bool = False, resume: bool = False, callbacks: Sequence[Any] = ()
) -> RunResult:
    """Fine-tune the recipe's base model with its adapter and write the run directory.

    ``resume`` (or ``[train] resume = "auto"``) continues the run in the output directory from its newest
    complete checkpoint; with none there, training starts from the beginning. ``callbacks`` are extra
    TrainerCallbacks (``peftkit sweep`` reports intermediate metrics to Optuna through one).
    """
    from transformers import set_seed

    from peftkit.adapters import apply_adapter, count_parameters
    from peftkit.data import data_fingerprints, load_raw_datasets, tokenize_splits
    from peftkit.modeling import load_model, load_model_config, load_tokenizer
    from peftkit.plan import measure_optimizer_state

    started = time.time()
    run_dir = recipe.output_dir.resolve()
    main = runs.is_main_process()
    resume = resume or recipe.train.get("resume") == "auto"
    task = TASKS[recipe.task_name]
    # In a distributed launch these arguments start the process group first, so that an error on one rank
    # (say rank 0 refusing an existing run directory) makes the others fail at their next collective instead
    # of waiting half an hour to connect to a rank that is gone.
    launch_args = training_arguments(recipe, task, run_dir)
    world_size = launch_args.world_size  # reading it starts the process group
    if getattr(launch_args, "deepspeed_plugin", None) is not None and world_size > 1:  # recipe or accelerate
        import deepspeed

        deepspeed.init_distributed()  # zero.Init (ZeRO-3 loads weights partitioned) needs DeepSpeed's group
    if main:
        runs.prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
    checkpoint = resume_checkpoint(recipe, run_dir, main) if resume else None
    if main and not resume:
        runs.write_json_atomic(run_dir / runs.RUN_META, _run_meta(recipe, status="running"))
    set_seed(recipe.train["seed"])

    with stop_requests() as stop:
        try:
            # setup
            tokenizer = load_tokenizer(recipe.model)
            model_config = load_model_config(recipe.model)
            # data: in a distributed launch the main process loads and tokenizes first, filling the datasets
            # cache, and the others then read it
            with launch_args.main_process_first(local=True, desc="loading and tokenizing data"):
                raw = load_raw_datasets(recipe.data, task.columns)
                labels = task.prepare_labels(raw, recipe.task)
                if main:  # early, so that a checkpoint of an interrupted run can be used on its own
                    runs.write_json_atomic(run_dir / runs.LABELS, _labels_record(task, labels))
                ctx = TaskContext(
                    cfg=recipe.task, tokenizer=tokenizer, labels=labels, model_config=model_config
                )
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
            # train (a first SIGINT/SIGTERM now saves a checkpoint and stops after the current step)
            trainer = build_trainer(
                recipe, task, ctx, model, raw, features, launch_args, stop=stop, extra_callbacks=callbacks
            )
            stop.training = True
            train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            stop.training = False
            if stop.signum is not None:
                raise interrupted(recipe, run_dir, stop.signum, trainer.state)
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
            # how much optimizer state is really 8-bit: bitsandbytes keeps tensors < 4096 elements in fp32
            metrics.update(measure_optimizer_state(trainer.optimizer))
            metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            metrics["wall_time_s"] = round(time.time() - started, 1)
            metrics["best_checkpoint"] = trainer.state.best_model_checkpoint
            if checkpoint is not None:
                metrics["resumed_from"] = str(checkpoint)
            # save: every rank joins (under ZeRO-3 save_model gathers the adapter's shards); rank 0 writes
            save_run(trainer, recipe, task, ctx, run_dir, metrics, data_fingerprints(raw), main=main)
            if world_size > 1:
                import torch.distributed as dist

                dist.barrier()  # no rank leaves (and ends its process) before rank 0 has written the run
        except TrainingInterrupted as exc:
            _record_stop(main, run_dir, "interrupted", exc.summary)
            raise
        except KeyboardInterrupt:
            # a signal outside training, or a second one during it: stop at once
            stopped = interrupted(recipe, run_dir, stop.signum or signal.SIGINT, None)
            _record_stop(main, run_dir, "interrupted", stopped.summary)
            raise stopped from None
        except BaseException as exc:
            _record_stop(main, run_dir, "failed", f"{type(exc).__name__}: {exc}")
            raise
    return RunResult(run_dir=run_dir, metrics=metrics)


def leave_process_group() -> None:
    """End a distributed launch cleanly: every rank leaves the process group before its process exits.

    Left to interpreter shutdown, a ZeRO-3 rank on CPU once aborted ("terminate called without an active
    exception") while rank 0 was still saving, and the launcher then killed the whole job.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resume_checkpoint(recipe: Recipe, run_dir: Path, main: bool) -> Path | None:
    """The checkpoint to resume from, after checking the run there may be resumed with this recipe.

    Incomplete checkpoints (the process died while writing them) are skipped with a log line, and set
    aside by the main process. The run's metadata records each resume.
    """
    if recipe.train.get("save_only_model"):
        raise RunDirError(
            f"{run_dir}: cannot resume: train.save_only_model = true keeps no optimizer, scheduler or RNG "
            "state in the checkpoints; remove it (or use --overwrite to start over)"
        )
    previous = runs.check_resumable(run_dir, recipe.to_dict()) if main else None
    checkpoint = runs.newest_valid_checkpoint(run_dir, log=main, set_aside=main)
    if checkpoint is None and previous is not None and previous.get("status") == "completed":
        raise RunDirError(
            f"{run_dir}: the run is completed and has no checkpoint left to resume from; "
            "use --overwrite to train it again"
        )
    if main:
        if checkpoint is None and previous is None:
            logger.info("resume: no run in %s yet, starting from the beginning", run_dir)
        elif checkpoint is None:
            logger.warning("resume: no complete checkpoint in %s, starting from the beginning", run_dir)
        else:
            logger.info("resuming from %s", checkpoint)
        meta = _run_meta(recipe, status="running")
        if previous is not None:
            meta["started"] = previous.get("started", meta["started"])
            history = previous.get("resumes")
            meta["resumes"] = [*(history if isinstance(history, list) else [])]
            meta["resumes"].append(
                {
                    "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "from_checkpoint": str(checkpoint) if checkpoint else None,
                    "previous_status": previous.get("status"),
                }
            )
        runs.write_json_atomic(run_dir / runs.RUN_META, meta)
    return checkpoint


def interrupted(recipe: Recipe, run_dir: Path, signum: int, state: Any) -> TrainingInterrupted:
    """The error that ends an interrupted run: where it stopped, its checkpoint, and how to resume."""
    name = signal.Signals(signum).name
    at = f" at step {state.global_step} of {state.max_steps}" if state is not None else ""
    checkpoint = runs.newest_valid_checkpoint(run_dir, log=False)
    saved = f"its last checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved"
    return TrainingInterrupted(
        f"training stopped by {name}{at}; {saved}. Resume with: peftkit finetune {recipe.source} --resume",
        signum,
        summary=f"stopped by {name}{at}",
    )


def _record_stop(main: bool, run_dir: Path, status: str, error: str) -> None:
    if main and (run_dir / runs.RUN_META).exists():
        runs.update_meta(run_dir, status=status, error=error, traceback=traceback.format_exc())


@dataclass
class StopRequest:
    """Set by the SIGINT/SIGTERM handler; read by :class:`SaveAndStopOnSignal` at the end of each step."""

    signum: int | None = None
    training: bool = False  # while True a first signal asks for a checkpoint instead of stopping at once


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Handle SIGINT and SIGTERM while fine-tuning; the previous handlers come back afterwards.

    During training the first signal only raises a flag (the Trainer then saves a checkpoint and stops
    after the current step); outside training, or on a second signal, it stops at once with a
    KeyboardInterrupt. Signal handlers can only be set from the main thread: elsewhere nothing changes.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: Any) -> None:
        first = request.signum is None
        if first:
            request.signum = signum
        if first and request.training:
            logger.warning(
                "%s received: saving a checkpoint after this step, then stopping (send it again to stop now)",
                signal.Signals(signum).name,
            )
            return
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def time_budget_callback(minutes: float) -> Any:
    """A TrainerCallback that ends training after the first step finishing past ``minutes`` of training.

    That last step is evaluated (when the run evaluates at all) and saved, so the run ends like a finished
    one: its final model is scored and the best checkpoint is chosen among all evaluations.
    """
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        started: float | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            self.started = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if self.started is None or time.monotonic() - self.started < minutes * 60:
                return control
            if state.global_step < state.max_steps:
                logger.warning(
                    "time budget of %s minutes (train.max_train_minutes) reached at step %d of %d: "
                    "evaluating, saving and stopping",
                    f"{minutes:g}",
                    state.global_step,
                    state.max_steps,
                )
            control.should_training_stop = True
            control.should_evaluate = args.eval_strategy != "no"
            control.should_save = args.save_strategy != "no"
            return control

    return TimeBudget()


def save_and_stop_callback(request: StopRequest) -> Any:
    """A TrainerCallback that ends training with a checkpoint once ``request`` holds a signal."""
    from transformers import TrainerCallback

    class SaveAndStopOnSignal(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if request.signum is not None:
                control.should_training_stop = True
            return control

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            # The Trainer runs its end-of-epoch logging, evaluation and saving even when training stops
            # mid-epoch; save there (whatever save_strategy says), but evaluate and log only at a real epoch
            # end, so that the checkpoint, its RNG states and the log history match an uninterrupted run's.
            if request.signum is None:
                return control
            control.should_save = True
            if not float(state.epoch or 0).is_integer():
                control.should_evaluate = False
                control.should_log = False
            return control

    return SaveAndStopOnSignal()


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
    if kwargs.get("gradient_checkpointing") and not kwargs.get("gradient_checkpointing_kwargs"):
        # non-reentrant: works with frozen embeddings (LoRA), DDP and DeepSpeed; said explicitly rather than
        # relying on the default of the installed transformers
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    return args_cls(output_dir=str(run_dir), **kwargs)


def build_trainer(
    recipe: Recipe,
    task: Task,
    ctx: TaskContext,
    model: Any,
    raw: Any,
    features: dict[str, Any],
    args: Any,
    stop: StopRequest | None = None,
    extra_callbacks: Sequence[Any] = (),
) -> Any:
    """The task's Trainer over ``args`` (from :func:`training_arguments`, built once at the start of
    ``finetune``: building them starts the process group of a distributed launch)."""
    from transformers import EarlyStoppingCallback, Trainer

    trainer_cls = with_shuffled_length_groups(task.trainer_class() if task.trainer_class else Trainer)
    callbacks = []
    if recipe.train.get("early_stopping_patience"):
        callbacks.append(
            EarlyStoppingCallback(
                early_stopping_patience=recipe.train["early_stopping_patience"],
                early_stopping_threshold=recipe.train.get("early_stopping_threshold", 0.0),
            )
        )
    if stop is not None:
        callbacks.append(save_and_stop_callback(stop))
    callbacks.extend(extra_callbacks)
    validation = "validation" in features and args.eval_strategy != "no"
    trainer = trainer_cls(
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
    weights = class_weights_for(ctx, features["train"])
    if weights is not None:
        import torch

        trainer.class_weights = torch.tensor(weights, dtype=torch.float32)
        logger.info("class weights in the loss: %s", dict(zip(ctx.labels or (), weights, strict=True)))
    return trainer


def class_weights_for(ctx: TaskContext, train_features: Any) -> list[float] | None:
    """The loss weight of each label id from ``[task] class_weights`` (seq_cls, token_cls), or None.

    ``"balanced"`` gives class c the weight n / (k * n_c), counted over the training split's labelled
    targets (examples for seq_cls, labelled tokens for token_cls; positions ignored by the loss do not
    count). A class absent from the training split gets weight 1: it is never a training target.
    """
    from peftkit.errors import DataError

    setting = getattr(ctx.cfg, "class_weights", None)
    if setting is None or ctx.labels is None:
        return None
    classes = len(ctx.labels)
    if setting != "balanced":
        weights = [float(w) for w in setting]
        if len(weights) != classes:
            raise DataError(
                f"task.class_weights has {len(weights)} weights but the data has {classes} labels "
                f"{list(ctx.labels)}; give one weight per label, in this order"
            )
        return weights
    return balanced_class_weights(train_features["labels"], classes)


def balanced_class_weights(labels: Sequence[Any], classes: int) -> list[float]:
    """n / (classes * n_c) for label ids (nested lists for token labels; negative ids are ignored)."""
    counts = [0] * classes
    for item in labels:
        for label in item if isinstance(item, (list, tuple)) else (item,):
            if 0 <= int(label) < classes:
                counts[int(label)] += 1
    total = sum(counts)
    return [total / (classes * count) if count else 1.0 for count in counts]


def weighted_cross_entropy(logits: Any, labels: Any, weights: Any) -> Any:
    """Cross-entropy with a weight per class: sum_i w[y_i] * loss_i / sum_i w[y_i] (label -100 skipped)."""
    import torch

    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    return torch.nn.functional.cross_entropy(
        flat_logits, labels.reshape(-1), weight=weights.to(flat_logits.device), ignore_index=-100
    )


def with_shuffled_length_groups(trainer_cls: Any) -> Any:
    """The Trainer class with shuffled length-grouped training batches and evaluation in dataset order.

    Evaluation also leaves the random state alone, so that resumed runs replay uninterrupted ones.
    """
    import torch

    from peftkit.batching import ShuffledLengthGroupedSampler

    class PeftkitTrainer(trainer_cls):
        class_weights: Any = None  # a float tensor, one weight per label id ([task] class_weights)

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            if self.class_weights is None or "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            # a per-batch weighted mean (not normalised across gradient-accumulation steps)
            loss = weighted_cross_entropy(outputs.logits, labels, self.class_weights)
            return (loss, outputs) if return_outputs else loss

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            # The Trainer drops unused columns (our "length" too) before asking for a sampler: read the
            # lengths from the full training set, whose rows are the same in the same order.
            column = self.args.length_column_name
            lengths = getattr(self.train_dataset, "column_names", ())
            if self.args.train_sampling_strategy != "group_by_length" or column not in lengths:
                return super()._get_train_sampler(train_dataset)
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            # seeded per epoch (set_epoch), so that a resumed run sees the same batches (batching.py)
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return ShuffledLengthGroupedSampler(self.train_dataset[column], batch, seed=seed)

        def evaluate(self, *args: Any, **kwargs: Any) -> Any:
            # Evaluation draws from the global RNG (each DataLoader iterator takes a seed from it). A
            # checkpoint saved just before an evaluation holds the RNG state from before it, so a run
            # resumed there would continue with other dropout masks than the uninterrupted run: keep
            # evaluation out of the random stream training continues from.
            with preserved_rng_state():
                return super().evaluate(*args, **kwargs)

        def _get_eval_sampler(self, eval_dataset: Any) -> Any:
            # transformers 5 also length-groups *evaluation* under group_by_length, which returns
            # predictions in a permuted order: per-example outputs (saved predictions, QA feature → example
            # maps) would silently pair with the wrong example. Evaluation keeps the dataset's order.
            if eval_dataset is None or self.args.world_size > 1:
                return super()._get_eval_sampler(eval_dataset)
            return torch.utils.data.SequentialSampler(eval_dataset)

    PeftkitTrainer.__name__ = PeftkitTrainer.__qualname__ = f"Peftkit{trainer_cls.__name__}"
    return PeftkitTrainer


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Python's, numpy's and torch's (CPU and CUDA) random states are the same after the block as before."""
    import random

    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


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
    main: bool = True,
) -> None:
    """Adapter, tokenizer, config with labels, labels.json, metrics, plots; status last.

    Files written by transformers, peft and matplotlib go to a staging folder first and are then renamed
    into place one by one, so every file appears whole; "completed" is written only after all of them.
    In a distributed run every rank calls this: the others only join save_model's gather and write nothing.
    """
    from peftkit.plots import plot_curves

    if not main:
        trainer.save_model(str(run_dir / runs.STAGING))  # the Trainer writes only from the main process
        return
    metric, _ = task.best_metric(recipe.task)
    with runs.staging_dir(run_dir) as stage:
        trainer.save_model(str(stage))  # adapter_config.json + adapter_model.safetensors + tokenizer
        # the Trainer also pickles its arguments there; the resolved recipe in peftkit_run.json replaces it
        (stage / "training_args.bin").unlink(missing_ok=True)
        base_config = trainer.model.get_base_model().config
        base_config.save_pretrained(str(stage))  # id2label/label2id travel with the adapter
        plot_curves(trainer.state.log_history, stage / "plots", metric)
        runs.publish(stage, run_dir)
    runs.write_json_atomic(run_dir / runs.LABELS, _labels_record(task, ctx.labels))
    runs.write_json_atomic(run_dir / runs.METRICS, metrics)
    runs.write_json_atomic(run_dir / "log_history.json", trainer.state.log_history)
    runs.update_meta(
        run_dir, status="completed", data=fingerprints, labels=list(ctx.labels or []), error=None
    )


def _labels_record(task: Task, labels: Any) -> dict[str, Any]:
    return {"labels": list(labels) if labels is not None else None, "task": task.name}


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
        **runs.process_fields(),
    }


def check_split_labels(loaded: runs.LoadedRun, raw: Any, split: str) -> None:
    """The split's labels are ones the run was trained on (else tokenizing it fails deep inside a map).

    The task's own label discovery runs on the train split and this one, as in training, and must find
    the run's labels (labels.json) again.
    """
    from datasets import DatasetDict

    from peftkit.errors import DataError

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


def evaluate_run(run_dir: str | os.PathLike[str], split: str = "test") -> dict[str, float]:
    """Re-evaluate a saved run on one of its recipe's splits (from the run directory alone)."""
    from transformers import Trainer, TrainingArguments

    from peftkit.data import load_raw_datasets, tokenize_splits
    from peftkit.errors import DataError

    loaded = runs.load_run(run_dir)
    raw = load_raw_datasets(loaded.recipe.data, loaded.task.columns)
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
