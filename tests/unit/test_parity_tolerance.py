"""The float32 merge limit scales with the logits: rounding of large logits passes, wrong weights fail."""

from __future__ import annotations

from typing import Any

import pytest

from peftkit.parity import FP32_RELATIVE_TOLERANCE, FP32_TOLERANCE, compare_outputs


def summary(values: list[float], predictions: list[int]) -> dict[str, Any]:
    import torch

    return {"logits": (torch.tensor(values, dtype=torch.float32), torch.tensor(predictions))}


def judge(reference: list[Any], candidate: list[Any]) -> dict[str, Any]:
    return compare_outputs(
        reference, candidate, name="saved", description="d", tolerance=FP32_TOLERANCE, min_agreement=1.0
    )


def test_rounding_of_large_logits_passes_by_default() -> None:
    # SmolLM2's merge (recipes/causal_seq2seq_lora.toml): 1.07e-4 on logits up to ~40, every prediction equal
    reference = [summary([40.0, -12.0, 3.0], [0])]
    result = judge(reference, [summary([40.0 + 1.07e-4, -12.0, 3.0], [0])])
    assert result["passed"], result
    assert result["limit"] == pytest.approx(40.0 * FP32_RELATIVE_TOLERANCE)
    assert result["limit_ratio"] == pytest.approx(1.07e-4 / 4e-4, rel=1e-2)


def test_the_same_difference_on_small_logits_fails() -> None:
    reference = [summary([1.0, -0.5, 0.2], [0])]
    result = judge(reference, [summary([1.0 + 1.07e-4, -0.5, 0.2], [0])])
    assert not result["passed"] and result["limit"] == FP32_TOLERANCE and result["limit_ratio"] > 1


def test_the_limit_is_per_batch() -> None:
    """A large-logit batch does not widen the limit of another batch whose logits are small."""
    reference = [summary([40.0, 1.0], [0]), summary([1.0, 0.5], [0])]
    candidate = [summary([40.0, 1.0], [0]), summary([1.0 + 3e-4, 0.5], [0])]
    result = judge(reference, candidate)
    assert not result["passed"] and result["limit"] == FP32_TOLERANCE


def test_a_1e3_error_still_fails_on_large_logits() -> None:
    reference = [summary([40.0, -12.0], [0])]
    assert not judge(reference, [summary([40.0 + 1e-3, -12.0], [0])])["passed"]


def test_half_precision_is_not_judged_by_the_limit() -> None:
    reference = [summary([40.0, -12.0], [0])]
    result = compare_outputs(
        reference, [summary([40.5, -12.0], [0])], name="h", description="d", tolerance=None, min_agreement=1.0
    )
    assert result["passed"] and result["limit"] is None and result["limit_ratio"] is None
