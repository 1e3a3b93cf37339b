"""GPU paths, on one CUDA device (``pytest -m gpu``; skipped with "needs a CUDA device" elsewhere):
bf16 and QLoRA training steps, merge parity on CUDA, and plan's CUDA model within 15% of the peak
allocated memory of a training step for LoRA, LoRA + checkpointing and QLoRA."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

import gpu_acceptance as acceptance  # scripts/ is not a package: found through sys.path

pytestmark = pytest.mark.gpu

MID_LLAMA = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def gpu_context(tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("gpu")
    return acceptance.Context(out, out / "work", dry_run=False, device="cuda", steps=4)


@pytest.fixture(scope="module")
def bf16_run(gpu_context: Any) -> dict[str, Any]:
    """Four bf16 steps of the default recipe on a tiny BERT (the dry run's model), on the GPU."""
    gpu_context.dry_run = True  # tiny models and sample sizes
    try:
        return acceptance.part_bf16_seq_cls(gpu_context)
    finally:
        gpu_context.dry_run = False


def test_bf16_training_step(bf16_run: dict[str, Any]) -> None:
    assert bf16_run["steps"] == 4
    assert math.isfinite(bf16_run["train_loss"])
    assert bf16_run["gpu_peak_allocated_mib"] > 0  # it ran on the GPU
    assert Path(bf16_run["run_dir"], "adapter_model.safetensors").is_file()


def test_qlora_training_step_and_merge_parity(gpu_context: Any) -> None:
    """nf4 + double quantization + bf16 compute, paged 8-bit AdamW, checkpointing; merged on CUDA."""
    gpu_context.dry_run = True
    try:
        row = acceptance.part_qlora_merge(gpu_context)
    finally:
        gpu_context.dry_run = False
    assert math.isfinite(row["train_loss"]) and row["gpu_peak_allocated_mib"] > 0
    assert row["merge_parity"]["status"] == "passed"


def test_merge_parity_of_a_bf16_run(bf16_run: dict[str, Any], tmp_path: Path) -> None:
    import peftkit

    result = peftkit.merge(bf16_run["run_dir"], tmp_path / "merged")
    assert result.report["status"] == "passed"
    check = result.report["verification"]["checks"][0]
    assert check["passed"] and check["agreement"] == 1.0


@pytest.mark.parametrize("arm", acceptance.PLAN_ARMS)
def test_plan_within_15_percent_of_peak_allocated(gpu_context: Any, arm: str) -> None:
    import torch

    import peftkit

    model_dir = acceptance.random_llama(gpu_context, MID_LLAMA, "mid-llama")
    batch, length = 4, 512
    recipe = acceptance.llama_recipe(gpu_context, model_dir, arm, batch, length)
    planned = peftkit.plan(recipe, seq_len=length, device="cuda")
    model = acceptance.build_trainable(recipe, "cuda")
    optimizer = acceptance.optimizer_for(model, str(recipe.train["optim"]))
    ids = torch.randint(0, MID_LLAMA["vocab_size"], (batch, length), device=model.device)
    acceptance.train_step(model, optimizer, ids, "cuda", True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    acceptance.train_step(model, optimizer, ids, "cuda", True)
    measured = torch.cuda.max_memory_allocated()
    error = planned.total_bytes / measured - 1
    assert abs(error) <= acceptance.PLAN_TOLERANCE, (
        f"{arm}: plan {planned.total_bytes} vs {measured} ({error:+.1%})"
    )
