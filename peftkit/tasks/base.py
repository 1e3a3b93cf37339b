"""The task contract: a frozen dataclass of plain functions, and the context they receive.

A task never sees the whole recipe: it gets its own ``[task]`` section (a subclass of
:class:`TaskConfig`) inside a :class:`TaskContext`. Nothing here imports torch or transformers,
so the registry can be imported by the recipe layer and by ``peftkit --help`` at no cost.

Data flow through a task during ``finetune``::

    raw DatasetDict (canonical column names, see ``Task.columns``)
      ─ prepare_labels(raw, cfg) ─▶ labels (tuple of names, or None)
      ─ preprocess(batch, ctx, train) ─▶ features (Dataset.map(batched=True))
      ─ Trainer(collator(ctx, model)) ─▶ EvalPrediction
      ─ postprocess(examples, features, eval_prediction, ctx) ─▶ (predictions, references)
      ─ compute_metrics(predictions, references, ctx) ─▶ {"name": float}

``predictions`` are one JSON-serialisable value per *example* (a label name, a list of tags, an
answer string, a generated text): they are written to ``predictions_<split>.jsonl`` and
``predict(...)`` must return records whose ``"prediction"`` field has the same form, so that a
reloaded run directory reproduces the training run's test predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TaskConfig(BaseModel):
    """Fields shared by every ``[task]`` section; each task subclasses it with ``type: Literal[...]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_length: int = Field(
        256, ge=8, le=131072, description="Longest tokenized input; longer inputs are truncated."
    )


@dataclass(frozen=True)
class TaskContext:
    """Everything a task function may use: no recipe, no globals."""

    cfg: Any  # the task's own TaskConfig subclass instance
    tokenizer: Any  # a transformers PreTrainedTokenizerBase (fast)
    labels: tuple[str, ...] | None  # label names in id order, None for tasks without labels
    model_config: Any = None  # transformers PretrainedConfig of the base model (read without weights)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels or ())}


def _no_inference_settings(ctx: Any) -> dict[str, Any]:
    return {}


def _no_pipeline(model_config: Any) -> str | None:
    return None


def _no_detail_metrics(key: str) -> bool:
    return False


def _unlisted_metrics(cfg: Any) -> tuple[str, ...] | None:
    return None


@dataclass(frozen=True)
class Task:
    """One task family. Every field is data or a plain function; there is no behaviour here."""

    name: str
    description: str
    config_class: type[TaskConfig]
    # canonical column name -> True if required. [data] columns maps these onto the dataset's names.
    columns: dict[str, bool]
    # model_config -> the transformers AutoModelFor* class to instantiate
    model_class: Callable[[Any], Any]
    # model_config -> peft TaskType name ("SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM"), or None for
    # a plain PeftModel that forwards every input unchanged
    peft_task_type: Callable[[Any], str | None]
    # new head layers that must be trained and saved with the adapter (names that exist are used)
    head_modules: tuple[str, ...]
    # ctx -> extra kwargs for from_pretrained (num_labels, id2label, problem_type, ...)
    model_kwargs: Callable[[TaskContext], dict[str, Any]]
    prepare_labels: Callable[[Any, Any], tuple[str, ...] | None]
    preprocess: Callable[[dict[str, list[Any]], TaskContext, bool], dict[str, list[Any]]]
    collator: Callable[[TaskContext, Any], Any]
    postprocess: Callable[[Any, Any, Any, TaskContext], tuple[list[Any], list[Any]]]
    compute_metrics: Callable[[Sequence[Any], Sequence[Any], TaskContext], dict[str, float]]
    predict: Callable[[Any, TaskContext, list[dict[str, Any]]], list[dict[str, Any]]]
    # the metric (key of compute_metrics' result) used to pick the best checkpoint
    primary_metric: str
    greater_is_better: bool = True
    # () -> Trainer class, and () -> TrainingArguments class ([train] keys are checked against it)
    trainer_class: Callable[[], Any] | None = None
    training_args_class: Callable[[], Any] | None = None
    # cfg -> (metric, greater_is_better) when the primary metric depends on the config (regression)
    primary_metric_for: Callable[[Any], tuple[str, bool]] | None = None
    # What other modules need to know about the task (model cards, merge, export, error analysis, cv):
    # the task in words, as in "fine-tuned for <title>"
    title: str = ""
    # model_config -> the transformers ``pipeline()`` task that runs a merged model, None where there is none
    pipeline_task: Callable[[Any], str | None] = _no_pipeline
    # a line for the model card's usage example (a ``#`` comment), when the task needs one
    usage_note: str = ""
    # ctx -> how a deployable must be called to predict as peftkit does, for model cards and saved configs:
    # ``aggregation_strategy`` (token-classification pipeline), ``chat_template`` (decoder-only prompts go
    # through it), ``system_prompt``, ``prompt_template``, ``source_prefix``, decoding settings
    inference_settings: Callable[[TaskContext], dict[str, Any]] = _no_inference_settings
    # the output names of the merged model's ONNX graph; () when the task is not exported to ONNX
    onnx_outputs: tuple[str, ...] = ()
    # the canonical columns ``predict`` reads from an input record
    input_columns: tuple[str, ...] = ()
    # what a ``predict`` record must hold, checked before the model loads: one field of each group
    # (alternatives), e.g. (("tokens", "text"),): words or a raw text. The first group's last name is the
    # field a line of a .txt input fills.
    predict_requires: tuple[tuple[str, ...], ...] = ()
    # (record, predicted, ctx) -> one example's reference, prediction and score for error analysis, with a
    # "_rank" key that sorts the worst example first; None when the task has no error analysis
    score_example: Callable[[dict[str, Any], dict[str, Any], TaskContext], dict[str, Any]] | None = None
    # metric key -> True for a per-class or per-type detail (kept out of comparison tables)
    is_detail_metric: Callable[[str], bool] = _no_detail_metrics
    # cfg -> the headline metric keys compute_metrics returns (besides the details above); the recipe layer
    # refuses a metric_for_best_model outside them. None: not listed (not checked)
    produced_metrics: Callable[[Any], tuple[str, ...] | None] = _unlisted_metrics
    # the column that cross-validation folds are stratified on (None: plain K-fold)
    stratify_column: str | None = None
    # canonical column -> what every record must hold there, checked by peftkit.data with file and line:
    # "text" (a non-empty string), "label" (one class name or number), "words" (a non-empty list of
    # strings), "tags" (a list), "id" (a string or an integer), "answers" (present; the task checks the rest)
    column_kinds: dict[str, str] = field(default_factory=dict)
    # the columns holding the references: a test split without them (or with null, or label -1, in every
    # record) is predicted, not scored
    reference_columns: tuple[str, ...] = ()
    # the range of the task's scores (exact match and F1 of SQuAD, sacreBLEU: "0-100"); comparisons label it
    score_scale: str = "0-1"

    def best_metric(self, cfg: Any) -> tuple[str, bool]:
        """The metric that picks the best checkpoint, and whether greater is better."""
        if self.primary_metric_for is not None:
            return self.primary_metric_for(cfg)
        return self.primary_metric, self.greater_is_better
