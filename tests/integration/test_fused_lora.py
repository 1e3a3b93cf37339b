"""``[train] fused_lora``: the fused LoRA path is the same run as peft's layers, through ``peftkit.finetune``.

The default recipe's adapter settings (dropout 0.1, every linear of each layer) on a tiny BERT and a tiny
Llama, 30 steps from the same seed with ``fused_lora`` on (the default) and off: the same loss at every
step, the same saved adapter tensors and the same test predictions; the same again with gradient
checkpointing on. The switch's effect is which layers train: the log names the fused layers, or none.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from tests.integration.key_effects_common import finetune_raw, read_json, write_csv

BERT_TARGETS = ["query", "key", "value", "dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 30


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str], int]]:
    from tests.conftest import save_tiny_bert
    from tests.integration.test_seq2seq_cli import save_tiny

    work = tmp_path_factory.mktemp("fused-models")
    return {
        # (checkpoint, target modules, LoRA layers: six linears per BERT layer and the pooler, seven per Llama
        # layer)
        "bert": (save_tiny_bert(work / "bert"), BERT_TARGETS, 2 * 6 + 1),
        "llama": (save_tiny("llama", work / "llama"), LLAMA_TARGETS, 2 * 7),
    }


def _run(work: Path, model: Path, targets: list[str], name: str, **train: Any) -> Path:
    raw = {
        "model": {"name_or_path": str(model)},
        "task": {"type": "seq_cls", "max_length": 16},
        "data": {"train_file": "train.csv", "validation_file": "valid.csv", "test_file": "test.csv"},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": targets},
        "train": {
            "max_steps": STEPS,
            "per_device_train_batch_size": 8,
            "learning_rate": 5e-3,
            "eval_strategy": "no",
            "save_strategy": "no",
            "load_best_model_at_end": False,
            "report_to": ["none"],
            "logging_steps": 1,
            **train,
        },
    }
    return finetune_raw(raw, work, name)


def _losses(run: Path) -> list[float]:
    return [e["loss"] for e in read_json(run / "log_history.json") if "loss" in e]


def _adapter(run: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(run / "adapter_model.safetensors")


def _relative(a: Any, b: Any) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_fused_path_is_the_same_run_as_peft_layers(
    kind: str,
    checkpointing: bool,
    models: dict[str, tuple[Path, list[str], int]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, targets, layers = models[kind]
    write_csv(tmp_path / "train.csv", 40)
    write_csv(tmp_path / "valid.csv", 8, offset=1)
    write_csv(tmp_path / "test.csv", 12, offset=2)
    extra = {"gradient_checkpointing": True} if checkpointing else {}
    with caplog.at_level(logging.INFO, logger="peftkit.fused_lora"):
        fused = _run(tmp_path, model, targets, "fused", **extra)
    assert f"fused LoRA path (train.fused_lora) on {layers} of {layers} LoRA layers" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="peftkit.fused_lora"):
        peft = _run(tmp_path, model, targets, "peft", fused_lora=False, **extra)
    assert "fused LoRA path" not in caplog.text

    fused_losses, peft_losses = _losses(fused), _losses(peft)
    assert len(fused_losses) == len(peft_losses) == STEPS
    assert len(set(peft_losses)) > 1  # it trains: the losses move
    # The same maths in another order (the fused backward computes the gradients of A, B and x itself):
    # float32 rounding, carried through the steps. Up to 1.4e-6 relative on an AVX512-BF16 CPU, under 1e-6
    # before; a real difference (scaling, dropout, a missed layer) is orders of magnitude larger.
    tolerance = 1e-5
    for a, b in zip(fused_losses, peft_losses, strict=True):
        assert abs(a - b) <= tolerance * abs(b), (fused_losses, peft_losses)
    fused_adapter, peft_adapter = _adapter(fused), _adapter(peft)
    assert fused_adapter.keys() == peft_adapter.keys()
    moved = 0
    for key, ref in peft_adapter.items():
        assert _relative(fused_adapter[key], ref) <= tolerance, key
        moved += "lora_B" in key and bool(ref.abs().max() > 0)  # B starts at zero: it trained
    assert moved == layers
    # the adapter format is peft's: the same config file, and the same predictions on the test split
    assert json.loads((fused / "adapter_config.json").read_text()) == json.loads(
        (peft / "adapter_config.json").read_text()
    )
    assert (fused / "predictions_test.jsonl").read_text() == (peft / "predictions_test.jsonl").read_text()
