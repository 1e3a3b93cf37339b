"""Sequence classification: single texts or text pairs, multi-class, or regression (``num_labels = 1``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from peftkit.errors import DataError
from peftkit.metrics.classification import classification_metrics, regression_metrics
from peftkit.tasks.base import Task, TaskConfig, TaskContext


class SeqClsConfig(TaskConfig):
    """``[task] type = "seq_cls"``."""

    type: Literal["seq_cls"] = "seq_cls"
    num_labels: int | None = Field(
        None, ge=1, description="1 for regression; otherwise discovered from the training data."
    )
    label_list: list[str] | None = Field(
        None,
        description="Label names in id order; integer labels are ids into it (unless the names are "
        "integers themselves). Default: the dataset's ClassLabel names, else the sorted labels found in "
        "the training split.",
    )
    predict_batch_size: int = Field(64, ge=1, description="Batch size of `peftkit predict`.")
    class_weights: Literal["balanced"] | list[float] | None = Field(
        None,
        description="Weighted cross-entropy for imbalanced labels: 'balanced' (n / (k * n_c) from the "
        "training split) or one weight per label in id order.",
    )

    @model_validator(mode="after")
    def _labels_consistent(self) -> SeqClsConfig:
        if self.label_list is not None:
            if len(set(self.label_list)) != len(self.label_list):
                raise ValueError("label_list has duplicates; list each label once")
            if self.num_labels not in (None, len(self.label_list)):
                raise ValueError(
                    f"num_labels = {self.num_labels} but label_list has {len(self.label_list)} names; "
                    "remove num_labels"
                )
        if self.class_weights is not None and self.is_regression:
            raise ValueError("class_weights needs classification; remove it for regression (num_labels = 1)")
        check_class_weights(self.class_weights, len(self.label_list) if self.label_list else self.num_labels)
        return self

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


def check_class_weights(weights: str | list[float] | None, classes: int | None) -> None:
    """A weight list has one non-negative weight per label (when the label count is known) and one above 0."""
    if weights is None or isinstance(weights, str):
        return
    negative = [w for w in weights if w < 0]
    if negative:
        raise ValueError(f"class_weights must not be negative, got {negative}; use weights >= 0")
    if not any(w > 0 for w in weights):
        raise ValueError("class_weights are all 0; give at least one label a positive weight")
    if classes is not None and len(weights) != classes:
        raise ValueError(
            f"class_weights has {len(weights)} weights for {classes} labels; give one weight per label, "
            "in label id order"
        )


COLUMNS = {"text": True, "text_pair": False, "label": True}


def _label_key(value: Any) -> str:
    """Label values are compared by name: 1 and "1" are the same class; 1.0 is 1."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _is_integer(name: str) -> bool:
    try:
        int(name)
    except ValueError:
        return False
    return True


def prepare_labels(raw: Any, cfg: SeqClsConfig) -> tuple[str, ...] | None:
    """Label names in id order: the recipe's label_list, the dataset's ClassLabel names, or sorted values.

    Every label of every split must be a known class, else the run would silently learn the wrong
    thing; regression targets must be numbers.
    """
    train = raw["train"]
    if "label" not in train.column_names:
        raise DataError(
            f"train split has no 'label' column (columns: {train.column_names}); "
            "map yours with [data] columns = {label = '<your column>'}"
        )
    if cfg.is_regression:
        for split, ds in raw.items():
            if "label" not in ds.column_names:
                continue
            for i, value in enumerate(ds["label"]):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                    raise DataError(
                        f"{split} split, record {i}: regression target {value!r} is not a number; "
                        "fix the data or remove task.num_labels = 1 for classification"
                    )
        return None

    feature = train.features.get("label")
    names = getattr(feature, "names", None)
    if cfg.label_list is not None:
        labels = tuple(cfg.label_list)
    elif names:
        labels = tuple(names)
    else:
        values = [v for v in train["label"] if v is not None]
        if any(isinstance(v, float) and not v.is_integer() for v in values):
            raise DataError(
                "train split: labels are fractional numbers; for regression set [task] num_labels = 1"
            )
        unique = {_label_key(v): v for v in values}
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in unique.values())
        labels = tuple(sorted(unique, key=lambda k: float(k) if numeric else k))
    if len(labels) < 2:
        raise DataError(
            f"train split has {len(labels)} distinct label(s) {list(labels)}; classification needs at least 2"
        )
    known = set(labels)
    # integer labels are ids into the names: the dataset's ClassLabel names, or a label_list of names that
    # are not themselves integers (label_list = ["0", "1"] names the values 0 and 1)
    ids = bool(names) if cfg.label_list is None else not any(_is_integer(name) for name in cfg.label_list)
    for split, ds in raw.items():
        if "label" not in ds.column_names:
            continue
        for i, value in enumerate(ds["label"]):
            if ids and isinstance(value, int) and not isinstance(value, bool):
                if not 0 <= value < len(labels):
                    raise DataError(
                        f"{split} split, record {i}: label id {value} is out of range for the "
                        f"{len(labels)} label names {list(labels)}; fix the data or list every label in "
                        "[task] label_list, in id order"
                    )
                continue
            key = _label_key(value)
            if key not in known:
                where = "is not in task.label_list" if cfg.label_list else "does not occur in the train split"
                raise DataError(
                    f"{split} split, record {i}: label {value!r} {where}; known labels: {list(labels)}. "
                    "Fix the data or list every label in [task] label_list"
                )
    if cfg.num_labels is not None and cfg.num_labels != len(labels):
        raise DataError(
            f"task.num_labels = {cfg.num_labels} but the data has {len(labels)} labels {list(labels)}; "
            "remove num_labels to use the labels found"
        )
    return labels


def model_kwargs(ctx: TaskContext) -> dict[str, Any]:
    if ctx.labels is None:
        return {"num_labels": 1, "problem_type": "regression"}
    return {
        "num_labels": len(ctx.labels),
        "id2label": dict(enumerate(ctx.labels)),
        "label2id": ctx.label2id,
        "problem_type": "single_label_classification",
    }


def preprocess(batch: dict[str, list[Any]], ctx: TaskContext, train: bool) -> dict[str, list[Any]]:
    """Tokenize (no padding: the collator pads each batch to its longest) and map labels to ids."""
    texts = [t if t is not None else "" for t in batch["text"]]
    pairs = batch.get("text_pair")
    encoded = ctx.tokenizer(
        texts,
        [t if t is not None else "" for t in pairs] if pairs is not None else None,
        truncation=True,
        max_length=ctx.cfg.max_length,
    )
    out: dict[str, list[Any]] = dict(encoded)
    if "label" in batch:
        out["labels"] = [_label_id(v, ctx) for v in batch["label"]]
    return out


def _label_id(value: Any, ctx: TaskContext) -> int | float:
    if ctx.labels is None:
        return float(value)
    if isinstance(value, int) and not isinstance(value, bool) and _label_key(value) not in ctx.label2id:
        return value  # ClassLabel ids are ids already
    return ctx.label2id[_label_key(value)]


def collator(ctx: TaskContext, model: Any) -> Any:
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(ctx.tokenizer)


def _logits(predictions: Any) -> Any:
    import numpy as np

    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    return np.asarray(predictions)


def postprocess(
    examples: Any, features: Any, eval_prediction: Any, ctx: TaskContext
) -> tuple[list[Any], list[Any]]:
    """Logits → one prediction per example (label name, or float for regression), and the references."""
    logits = _logits(eval_prediction.predictions)
    label_ids = eval_prediction.label_ids
    if ctx.labels is None:
        preds: list[Any] = [float(x) for x in logits.reshape(len(logits), -1)[:, 0]]
        refs: list[Any] = [] if label_ids is None else [float(x) for x in label_ids.reshape(-1)]
        return preds, refs
    preds = [ctx.labels[int(i)] for i in logits.argmax(axis=-1)]
    refs = [] if label_ids is None else [ctx.labels[int(i)] for i in label_ids]
    return preds, refs


def compute_metrics(
    predictions: Sequence[Any], references: Sequence[Any], ctx: TaskContext
) -> dict[str, float]:
    if not references:
        return {}
    if ctx.labels is None:
        return regression_metrics(predictions, references)
    return classification_metrics(predictions, references, ctx.labels)


def predict(model: Any, ctx: TaskContext, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Classify records ``{text[, text_pair]}``: the label, its probability, and every class's."""
    import torch

    for i, record in enumerate(records, start=1):
        for key in ("text", "text_pair"):
            if key == "text_pair" and key not in record:
                continue
            if not isinstance(record.get(key), str):
                got = (
                    f"keys {sorted(record)}"
                    if key not in record
                    else f"{type(record[key]).__name__} {record[key]!r}"
                )
                raise DataError(
                    f"record {i}: '{key}' must be a string, got {got}; name the field '{key}' "
                    "or map it with the recipe's [data] columns"
                )
    collate = collator(ctx, model)
    results: list[dict[str, Any]] = []
    size = ctx.cfg.predict_batch_size
    model.eval()
    for start in range(0, len(records), size):
        chunk = records[start : start + size]
        batch = {"text": [r.get("text") for r in chunk]}
        if any("text_pair" in r for r in chunk):
            batch["text_pair"] = [r.get("text_pair") for r in chunk]
        features = preprocess(batch, ctx, train=False)
        rows = [{k: v[i] for k, v in features.items()} for i in range(len(chunk))]
        inputs = {k: v.to(model.device) for k, v in collate(rows).items()}
        with torch.no_grad():
            logits = model(**inputs).logits.float()
        if ctx.labels is None:
            results += [{"prediction": float(v)} for v in logits[:, 0].tolist()]
            continue
        probs = logits.softmax(dim=-1)
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            results.append(
                {
                    "prediction": ctx.labels[best],
                    "score": row[best],
                    "scores": {label: p for label, p in zip(ctx.labels, row, strict=True)},
                }
            )
    return results


def _model_class(model_config: Any) -> Any:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification


def _best_metric(cfg: SeqClsConfig) -> tuple[str, bool]:
    return ("pearson", True) if cfg.is_regression else ("f1_macro", True)


def score_example(record: dict[str, Any], predicted: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """Error analysis: misclassified first, then by the true class's probability; regression: abs error."""
    inputs: dict[str, Any] = {k: record[k] for k in ("text", "text_pair") if k in record}
    if ctx.labels is None:
        value = float(record["label"])
        error = abs(predicted["prediction"] - value)
        return {
            **inputs,
            "reference": value,
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


def is_detail_metric(key: str) -> bool:
    """Per-class scores (``precision_<label>``, ``f1_<label>``, ...), not the headline ones."""
    return key.startswith(("precision_", "recall_", "support_")) or (
        key.startswith("f1_") and key != "f1_macro"
    )


TASK = Task(
    name="seq_cls",
    description="sequence classification (single text or pairs; regression with num_labels = 1)",
    config_class=SeqClsConfig,
    columns=COLUMNS,
    model_class=_model_class,
    peft_task_type=lambda model_config: "SEQ_CLS",
    head_modules=("classifier", "score"),
    model_kwargs=model_kwargs,
    prepare_labels=prepare_labels,
    preprocess=preprocess,
    collator=collator,
    postprocess=postprocess,
    compute_metrics=compute_metrics,
    predict=predict,
    primary_metric="f1_macro",
    primary_metric_for=_best_metric,
    title="sequence classification",
    pipeline_task=lambda model_config: "text-classification",
    onnx_outputs=("logits",),
    input_columns=("text", "text_pair"),
    predict_requires=(("text",),),
    score_example=score_example,
    is_detail_metric=is_detail_metric,
    produced_metrics=lambda cfg: (
        ("mse", "rmse", "mae", "pearson", "spearman")
        if cfg.is_regression
        else ("accuracy", "f1_macro", "mcc")
    ),
    stratify_column="label",
    column_kinds={"text": "text", "text_pair": "text", "label": "label"},
    reference_columns=("label",),
)
