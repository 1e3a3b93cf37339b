"""The Trainer of a run: TrainingArguments from ``[train]``, callbacks, the Trainer class, class weights.

:func:`training_arguments` maps ``[train]`` onto the task's TrainingArguments class; :func:`build_trainer`
adds peftkit's callbacks (early stopping, the ``max_train_minutes`` time budget, save-and-stop on a
signal) to the task's Trainer class, extended with shuffled length-grouped batches, evaluation in dataset
order and the weighted loss of ``[task] class_weights``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit import runs
from peftkit.console import progress_bars_fit
from peftkit.outputs import writing
from peftkit.recipe import TRAIN_OWN_KEYS, Recipe
from peftkit.tasks.base import Task, TaskContext

if TYPE_CHECKING:
    from peftkit.lifecycle import StopRequest

logger = logging.getLogger(__name__)


def training_arguments(recipe: Recipe, task: Task, run_dir: Path) -> Any:
    """[train] (defaults applied) → the task's TrainingArguments class."""
    import torch
    from transformers import TrainingArguments

    args_cls = task.training_args_class() if task.training_args_class else TrainingArguments
    kwargs = {k: v for k, v in recipe.train.items() if k not in TRAIN_OWN_KEYS}
    metric, greater = task.best_metric(recipe.task)
    kwargs.setdefault("metric_for_best_model", metric)
    kwargs.setdefault("greater_is_better", greater)
    # progress bars where they redraw in place; in a log file the Trainer prints one line per logging step
    # instead (its PrinterCallback) rather than thousands of carriage-return updates
    kwargs.setdefault("disable_tqdm", not progress_bars_fit())
    if recipe.train.get("deepspeed"):
        kwargs["deepspeed"] = recipe.train["deepspeed"]
    if not torch.cuda.is_available():
        # without it, each process of a multi-process CPU launch trains on the full data and writes the run
        kwargs.setdefault("use_cpu", True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # with True, 2 processes doubled the loss (and gradient) of BERT classification (measured, 5.x)
        kwargs.setdefault("average_tokens_across_devices", False)
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
    if recipe.train.get("max_train_minutes"):
        callbacks.append(time_budget_callback(recipe.train["max_train_minutes"]))
    if stop is not None:
        callbacks.append(save_and_stop_callback(stop))
    if recipe.adapter.get("method") == "adalora":
        from peftkit.adapters import adalora_callback

        callbacks.append(adalora_callback())  # its rank allocation runs after every optimizer step
    callbacks.append(divergence_callback())
    callbacks.append(checkpoint_record_callback())
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
    from peftkit.adapters import loraplus_options

    trainer.loraplus = loraplus_options(recipe.adapter)
    weights = class_weights_for(ctx, features["train"])
    if weights is not None:
        import torch

        trainer.class_weights = torch.tensor(weights, dtype=torch.float32)
        logger.info("class weights in the loss: %s", dict(zip(ctx.labels or (), weights, strict=True)))
    return trainer


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


def divergence_callback() -> Any:
    """A TrainerCallback that fails the run (:class:`TrainingDiverged`, status ``failed`` naming the step
    and the value) as soon as the loss, the gradients or the evaluation loss stop being finite.

    Checked: every logged ``loss``/``grad_norm``/``eval_loss``; the trainable parameters' gradients before
    each optimizer step (not under fp16, whose loss scaler makes and skips inf gradients on purpose); and
    the trainable weights at the end of training, so a diverged run is never saved as ``completed``.
    """
    import math

    import torch
    from transformers import TrainerCallback

    from peftkit.errors import TrainingDiverged

    def fail(state: Any, what: str, value: Any, step: int | None = None) -> None:
        raise TrainingDiverged(
            f"training diverged at step {step or state.global_step}: {what} is {value}; the run is marked "
            "failed and nothing of it is saved as completed. Lower train.learning_rate (or raise "
            "warmup_steps / set max_grad_norm) and train again with --overwrite"
        )

    def trainable(model: Any) -> list[Any]:
        return [p for p in model.parameters() if p.requires_grad] if model is not None else []

    class StopOnDivergence(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
            for key in ("loss", "grad_norm", "eval_loss", "train_loss"):
                value = (logs or {}).get(key)
                if key == "grad_norm" and args.fp16:
                    continue
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    fail(state, f"the logged {key}", value)
            return control

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> Any:
            value = (metrics or {}).get("eval_loss")
            if isinstance(value, (int, float)) and not math.isfinite(value):
                fail(state, "the validation loss (eval_loss)", value)
            return control

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if args.fp16:
                return control
            grads = [p.grad for p in trainable(kwargs.get("model")) if p.grad is not None]
            if grads and not bool(torch.stack([g.detach().isfinite().all() for g in grads]).all()):
                bad = next(g for g in grads if not bool(g.isfinite().all()))
                # the step being taken: global_step counts it only after the optimizer step
                fail(state, "a gradient", bad[~bad.isfinite()].flatten()[0].item(), state.global_step + 1)
            return control

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            for param in trainable(kwargs.get("model")):
                if not bool(param.detach().isfinite().all()):
                    fail(state, "a trained weight", param[~param.isfinite()].flatten()[0].item())
            return control

    return StopOnDivergence()


def checkpoint_record_callback() -> Any:
    """A TrainerCallback that signs each saved DeepSpeed checkpoint's ``global_step*`` files with this
    machine's key (:func:`peftkit.integrity.sign_checkpoint`), so that ``--resume`` unpickles only those."""
    from transformers import TrainerCallback

    from peftkit.integrity import sign_checkpoint

    class SignCheckpoints(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                sign_checkpoint(folder)
            return control

    return SignCheckpoints()


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
        loraplus: dict[str, float] | None = None  # [adapter] loraplus_* (adapters.loraplus_options)

        def create_optimizer(self, model: Any = None) -> Any:
            # LoRA+: the Trainer's own optimizer class and arguments, in peft's LoRA+ parameter groups.
            # Under DeepSpeed (a config without an optimizer section) deepspeed_init calls this too.
            if self.loraplus is None or getattr(self, "optimizer", None) is not None:
                return super().create_optimizer(model)
            target = self.model if model is None else model
            self.optimizer = loraplus_optimizer(target, self.args, **self.loraplus)
            return self.optimizer

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

        def prediction_step(self, model: Any, *args: Any, **kwargs: Any) -> Any:
            # evaluation losses (and the best checkpoint chosen by them) are the task's loss alone, without
            # AdaLoRA's orthogonality penalty
            from peftkit.adapters import task_loss_only

            with task_loss_only(model):
                return super().prediction_step(model, *args, **kwargs)

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


def loraplus_optimizer(model: Any, args: Any, ratio: float, lr_embedding: float | None = None) -> Any:
    """LoRA+ (``[adapter] loraplus_lr_ratio``): the optimizer ``train.optim`` names (AdamW, fused AdamW,
    bitsandbytes' 8-bit and paged AdamW ...), with its arguments as the Trainer would build them, over the
    parameter groups of peft's ``create_loraplus_optimizer``: lora_A (and other matrices, e.g. a saved head's
    weight) at ``learning_rate``, lora_B and every 1-d trainable parameter at ``learning_rate × ratio``, LoRA
    on embeddings at ``lr_embedding``; ``weight_decay`` on all but biases and norms, as the Trainer does."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer
    from transformers.trainer_optimizer import is_optimizer_factory

    from peftkit.errors import PeftkitError

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(kwargs):
        # validate refuses these optims (recipe.LORAPLUS_REFUSED_OPTIMS); a new one lands here
        raise PeftkitError(
            f"adapter.loraplus_lr_ratio: train.optim = {args.optim!r} builds its own parameter groups, so "
            "LoRA+ cannot set them; use an AdamW-family optim (e.g. adamw_torch_fused) or remove "
            "loraplus_lr_ratio"
        )
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr", args.learning_rate)
    if lr_embedding is not None:
        kwargs["loraplus_lr_embedding"] = lr_embedding
    optimizer = create_loraplus_optimizer(
        model,
        optimizer_cls,
        lr=lr,
        loraplus_lr_ratio=ratio,
        loraplus_weight_decay=args.weight_decay,
        **kwargs,
    )
    if "bitsandbytes" in str(optimizer_cls) and kwargs.get("optim_bits") == 8:
        # as Trainer.create_optimizer does for 8-bit bitsandbytes: embeddings keep 32-bit optimizer state
        # (peft's helper does it only for the AdamW8bit class names, not bnb's AdamW(optim_bits=8))
        import bitsandbytes
        from torch import nn

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    sizes = ", ".join(
        f"{len(group['params'])} at lr {group['lr']:g}" for group in optimizer.param_groups if group["params"]
    )
    logger.info("LoRA+ (ratio %g): %s parameter groups: %s", ratio, optimizer_cls.__name__, sizes)
    return optimizer


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


def save_trained_model(
    trainer: Any,
    run_dir: Path,
    best_metric: str,
    main: bool,
    model_max_length: int | None = None,
    base_weights: bool = True,
    base_record: dict[str, Any] | None = None,
    system_prompt: str | None = None,
) -> list[Path]:
    """Adapter, tokenizer, config with labels and plots, staged then published into the run directory.

    Files written by transformers, peft and matplotlib go to a staging folder first and are then renamed
    into place one by one, so every file appears whole. In a distributed run every rank calls this: the
    others only join save_model's gather (under ZeRO-3 it gathers the adapter's shards) and write nothing.
    Returns the files published (none on the other ranks). ``model_max_length`` (the task's
    ``max_length``) goes into the saved tokenizer config, so that a ``pipeline(..., truncation=True)`` cuts
    inputs where training did. ``base_weights`` (``[train] save_base_weights``): the base model's own weights
    beside the adapter as well (:func:`save_embedded_base`). ``base_record`` (peftkit_run.json's
    ``base_model``) replaces the absolute path peft records in adapter_config.json with the portable
    reference; ``system_prompt`` goes into the saved chat template (:func:`runs.set_default_system_prompt`).
    """
    from peftkit.plots import plot_curves

    if not main:
        trainer.save_model(str(run_dir / runs.STAGING))  # the Trainer writes only from the main process
        return []
    with runs.staging_dir(run_dir) as stage, writing(run_dir):
        trainer.save_model(str(stage))  # adapter_config.json + adapter_model.safetensors + tokenizer
        # the Trainer also pickles its arguments there; the resolved recipe in peftkit_run.json replaces it
        (stage / "training_args.bin").unlink(missing_ok=True)
        if model_max_length is not None:
            runs.set_model_max_length(stage, model_max_length)
        base = trainer.model.get_base_model()
        base.config.save_pretrained(str(stage))  # id2label/label2id travel with the adapter
        module_names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
        runs.clean_adapter_config(stage, module_names, base_record)
        if system_prompt is not None:
            runs.set_default_system_prompt(stage, system_prompt)
        plot_curves(trainer.state.log_history, stage / "plots", best_metric)
        published = runs.publish(stage, run_dir)
    if base_weights:
        published += save_embedded_base(trainer, run_dir)
    return published


def kept_model(state: Any, args: Any) -> str:
    """Which weights a finished training kept, and why, in one sentence (the run summary's last line).

    With ``load_best_model_at_end`` the Trainer reloads the best checkpoint by ``metric_for_best_model``;
    otherwise (or when no evaluation ran) the run keeps the weights of its last step.
    """
    ran = f"step {state.global_step} of {state.max_steps}"
    if args.load_best_model_at_end and state.best_model_checkpoint:
        metric = args.metric_for_best_model or "loss"
        name = metric if metric.startswith("eval_") else f"eval_{metric}"
        which = "highest" if args.greater_is_better else "lowest"
        at = f" at step {state.best_global_step}" if state.best_global_step else ""
        return (
            f"kept {Path(state.best_model_checkpoint).name} ({which} {name} {state.best_metric:.4g}{at}; "
            f"training ran to {ran})"
        )
    why = (
        "no evaluation chose a best checkpoint" if args.load_best_model_at_end else "no best-model selection"
    )
    return f"kept the last step ({ran}; {why})"


def save_embedded_base(trainer: Any, run_dir: Path) -> list[Path]:
    """The base model's own weights beside the adapter (model.safetensors), after the adapter is saved.

    With config.json and base weights at the top, transformers takes the run directory for "a complete model
    with an embedded adapter" (transformers' ``maybe_load_adapters``): ``AutoModelFor<Task>.from_pretrained``
    and ``pipeline()`` load it as it is, with the run's labels, and a copied run needs no base elsewhere.
    Skipped (with a log line) for a quantized base and under DeepSpeed, whose live weights are not the base's
    float tensors, and for residual inits (PiSSA, OLoRA), whose live weights are the residual; those runs
    load through peftkit and ``PeftModel``. A failure here loses nothing: the
    adapter is already in place.
    """
    from peftkit.adapters import base_state_dict, residual_init

    base = trainer.model.get_base_model()
    if getattr(base, "is_quantized", False) or getattr(trainer, "is_deepspeed_enabled", False):
        logger.info("not saving the base weights into %s (quantized base or DeepSpeed)", run_dir)
        return []
    config = getattr(trainer.model, "peft_config", {}).get("default")
    residual = residual_init(vars(config)) if config is not None else None
    if residual is not None:
        # the live base holds the residual weights, and peft subtracts the init again from whatever base it
        # loads the adapter onto: saved here, a from_pretrained(run_dir) model would be off (measured on the
        # tiny BERT: logits 1.4e-4 away from the run's, 0 for plain LoRA)
        logger.info("not saving the base weights into %s (%s's residual base)", run_dir, residual)
        return []
    try:
        with runs.staging_dir(run_dir) as stage:
            base.save_pretrained(str(stage), state_dict=base_state_dict(trainer.model))
            return runs.publish(stage, run_dir)
    except (OSError, RuntimeError, ValueError) as exc:
        logger.warning(
            "could not save the base weights into %s (%s); the run loads through peftkit and PeftModel only",
            run_dir,
            exc,
        )
        return []
