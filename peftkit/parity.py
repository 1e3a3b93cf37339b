"""Parity: does a derived model (merged weights, a half-precision file, an ONNX graph) compute what its
adapter computed?

A verification sample is the first examples of a split of the run's data, through the task's preprocess and
collator (seeded random token ids when the data cannot be read any more). Each model's outputs on it are
summarised as logits at real (unpadded) positions and the argmax predictions made from them; two summaries
are compared by the largest and mean absolute difference and the share of equal predictions, against a
tolerance and a minimum agreement.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# fp32 merges must reproduce the adapter model with every prediction equal and every logit within
# max(FP32_TOLERANCE, FP32_RELATIVE_TOLERANCE × the largest |logit| of that output in that batch): float32
# rounding grows with the size of the numbers summed, so a deep model whose logits reach ~40 (SmolLM2) differs
# by ~1e-4 after an exact merge, while a tiny model's O(1) logits differ by ~1e-7. A wrong weight (1e-3 off)
# moves O(1) logits by ~1e-3 and still fails.
FP32_TOLERANCE = 1e-4
FP32_RELATIVE_TOLERANCE = 1e-5
# A half-precision file rounds every weight to 8 (bfloat16) or 11 (float16) significant bits, which may flip
# predictions that were near ties; below this agreement the file is refused as not faithful to the adapter.
HALF_MIN_AGREEMENT = 0.99
DEFAULT_SAMPLES = 32
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "decoder_input_ids",
    "decoder_attention_mask",
)
OUTPUT_KEYS = ("logits", "start_logits", "end_logits")
SPAN_KEYS = ("start_logits", "end_logits")


@dataclass
class Sample:
    """Collated model inputs for verification, and where they came from."""

    batches: list[dict[str, Any]]
    description: dict[str, Any]


def verification_sample(
    recipe: Any, task: Any, ctx: Any, model: Any, samples: int, split: str = "validation", batch_size: int = 8
) -> Sample:
    """The first ``samples`` examples of a split of the run's data, through the task's preprocess, collated.

    When the data cannot be read any more (moved, deleted, a Hub dataset offline), seeded random token ids
    stand in, with a warning: they still show whether the merged weights compute what the adapter computed.
    """
    from peftkit.data import load_raw_datasets
    from peftkit.errors import DataError

    collate = task.collator(ctx, model)  # also writes a seq2seq task's generation settings into the model
    try:
        raw = load_raw_datasets(recipe.data, task)
    except (DataError, OSError, ValueError) as exc:
        logger.warning("verification uses random token ids: the run's data cannot be read (%s)", exc)
        return _random_sample(ctx, model, samples, batch_size, reason=str(exc))
    chosen = split if split in raw else "validation"
    examples = raw[chosen].select(range(min(samples, len(raw[chosen]))))
    features = task.preprocess(examples.to_dict(), ctx, False)
    count = len(features["input_ids"])
    rows = [{key: values[i] for key, values in features.items()} for i in range(count)]
    batches = [collate(rows[start : start + batch_size]) for start in range(0, count, batch_size)]
    return Sample(
        batches=batches,
        description={"split": chosen, "examples": len(examples), "features": count, "source": "run data"},
    )


def _random_sample(ctx: Any, model: Any, samples: int, batch_size: int, reason: str) -> Sample:
    import torch

    generator = torch.Generator().manual_seed(0)
    vocab = int(getattr(model.config, "vocab_size", None) or len(ctx.tokenizer))
    special = set(ctx.tokenizer.all_special_ids)
    low = max(special) + 1 if special and max(special) < vocab // 2 else 0
    encoder_decoder = is_encoder_decoder(model)
    batches = []
    for start in range(0, samples, batch_size):
        size = min(batch_size, samples - start)
        ids = torch.randint(low, vocab, (size, 24), generator=generator)
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if encoder_decoder:
            batch["labels"] = torch.randint(low, vocab, (size, 12), generator=generator)
        batches.append(batch)
    return Sample(
        batches=batches,
        description={"split": None, "examples": samples, "features": samples, "source": f"random ({reason})"},
    )


def is_encoder_decoder(model: Any) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def model_inputs(batch: Mapping[str, Any], encoder_decoder: bool) -> dict[str, Any]:
    """The batch's model inputs; labels only for encoder-decoder models (they make the decoder inputs)."""
    keys = (*MODEL_INPUTS, "labels") if encoder_decoder else MODEL_INPUTS
    return {key: batch[key] for key in keys if key in batch}


# Per batch: output name -> (compared values, predictions), both flat CPU tensors.
Summary = dict[str, tuple[Any, Any]]


def summarise_outputs(outputs: Mapping[str, Any], batch: Mapping[str, Any], encoder_decoder: bool) -> Summary:
    """Logits at real (unpadded) positions and the argmax predictions made from them.

    Sequence-level logits (batch, classes) give one prediction per example; token-level logits (batch, tokens,
    classes) one per real token (target tokens for encoder-decoder models); span logits (QA start/end, batch ×
    tokens) one position per feature, chosen among its real tokens.
    """
    import torch

    summary: Summary = {}
    for key in OUTPUT_KEYS:
        value = outputs.get(key) if hasattr(outputs, "get") else None
        if value is None:
            continue
        value = torch.as_tensor(value).detach().float().cpu()
        mask = _position_mask(value, batch, encoder_decoder)
        if value.ndim == 3:
            selected = value[mask] if mask is not None else value.reshape(-1, value.shape[-1])
            summary[key] = (selected.reshape(-1), selected.argmax(-1).reshape(-1))
        elif key in SPAN_KEYS and mask is not None:
            masked = value.masked_fill(~mask, float("-inf"))
            summary[key] = (value[mask].reshape(-1), masked.argmax(-1).reshape(-1))
        else:
            summary[key] = (value.reshape(-1), value.argmax(-1).reshape(-1))
    return summary


def _position_mask(value: Any, batch: Mapping[str, Any], encoder_decoder: bool) -> Any:
    """Which (example, position) entries of a token- or span-level output are real tokens; None if unknown."""
    if value.ndim < 2:
        return None
    import torch

    if encoder_decoder and value.ndim == 3:
        labels = batch.get("labels")
        if labels is not None and tuple(labels.shape) == tuple(value.shape[:2]):
            return torch.as_tensor(labels).cpu() != -100
        return None
    attention = batch.get("attention_mask")
    if attention is not None and tuple(attention.shape) == tuple(value.shape[:2]):
        return torch.as_tensor(attention).cpu().bool()
    return None


def torch_outputs(model: Any, sample: Sample) -> list[Summary]:
    """The model's summarised outputs on every batch of the sample (no gradients, eval mode)."""
    import torch

    encoder_decoder = is_encoder_decoder(model)
    device = next(model.parameters()).device
    model.eval()
    summaries = []
    with torch.no_grad():
        for batch in sample.batches:
            inputs = {k: v.to(device) for k, v in model_inputs(batch, encoder_decoder).items()}
            summaries.append(summarise_outputs(model(**inputs), batch, encoder_decoder))
    return summaries


def compare_outputs(
    reference: Sequence[Summary],
    candidate: Sequence[Summary],
    *,
    name: str,
    description: str,
    tolerance: float | None,
    min_agreement: float,
    relative_tolerance: float = FP32_RELATIVE_TOLERANCE,
) -> dict[str, Any]:
    """max/mean |Δ| of the compared values and the share of equal predictions; ``passed`` against the limits.

    The limit of one output in one batch is ``max(tolerance, relative_tolerance × its largest |reference|)``
    (scale-aware: see FP32_RELATIVE_TOLERANCE); ``limit_ratio`` is the worst |Δ| / limit (≤ 1 passes).
    ``tolerance`` None means the difference is reported but not judged (half precision).
    """
    import torch

    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference batches but {len(candidate)} candidate batches")
    max_diff = 0.0
    total_diff = 0.0
    values = 0
    agree = 0
    predictions = 0
    largest = 0.0
    ratio = 0.0
    limit_at_worst = tolerance
    for ref_batch, cand_batch in zip(reference, candidate, strict=True):
        if set(ref_batch) != set(cand_batch):
            raise ValueError(f"outputs differ: {sorted(ref_batch)} vs {sorted(cand_batch)}")
        for key, (ref_values, ref_preds) in ref_batch.items():
            cand_values, cand_preds = cand_batch[key]
            if ref_values.shape != cand_values.shape or ref_preds.shape != cand_preds.shape:
                raise ValueError(f"{key}: shapes differ, {ref_values.shape} vs {cand_values.shape}")
            diff = (ref_values - cand_values).abs()
            if diff.numel():
                # a NaN anywhere must fail the check, not vanish in max()
                batch_max = float("nan") if torch.isnan(diff).any() else float(diff.max())
                max_diff = batch_max if math.isnan(batch_max) else max(max_diff, batch_max)
                total_diff += float(diff.nan_to_num(nan=0.0).sum())
                scale = float(ref_values.abs().max()) if not torch.isnan(ref_values).any() else 0.0
                largest = max(largest, scale)
                if tolerance is not None and not math.isnan(batch_max):
                    limit = max(tolerance, relative_tolerance * scale)
                    if limit > 0 and batch_max / limit > ratio:
                        ratio, limit_at_worst = batch_max / limit, limit
                    elif limit <= 0 and batch_max > 0:
                        ratio = math.inf
            values += diff.numel()
            agree += int((ref_preds == cand_preds).sum())
            predictions += ref_preds.numel()
    agreement = agree / predictions if predictions else 1.0
    finite = not math.isnan(max_diff)
    passed = finite and (tolerance is None or ratio <= 1.0) and agreement >= min_agreement and predictions > 0
    return {
        "name": name,
        "description": description,
        "max_abs_diff": max_diff,
        "mean_abs_diff": total_diff / values if values else 0.0,
        "max_abs_reference": largest,
        "agreement": agreement,
        "predictions_compared": predictions,
        "values_compared": values,
        "tolerance": tolerance,
        "relative_tolerance": relative_tolerance if tolerance is not None else None,
        "limit": limit_at_worst,
        "limit_ratio": ratio if tolerance is not None else None,
        "min_agreement": min_agreement,
        "passed": bool(passed),
    }
