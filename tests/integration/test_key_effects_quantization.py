"""[quantization] keys, shown by the quantization config and weights of the model ``peftkit.finetune``
trained (bitsandbytes on CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.key_effects_common import finetune_raw, quick_train, write_csv


def record_quantized_loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Any]]:
    """(quantization_config, model) of every ``from_pretrained`` that loads a quantized model from now on."""
    import transformers

    loaded: list[tuple[Any, Any]] = []
    original = transformers.PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls: Any, *args: Any, **kwargs: Any) -> Any:
        model = original(cls, *args, **kwargs)
        if "quantization_config" in kwargs:
            loaded.append((kwargs["quantization_config"], model))
        return model

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(from_pretrained))
    return loaded


def test_quantization_keys_shape_the_quantized_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bits, quant_type, double_quant and compute_dtype reach the BitsAndBytesConfig the base model is
    loaded with; skip_modules keeps those layers in full precision (the others are 4-bit)."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes

    from tests.integration.test_merge_tasks import save_tiny_bert

    # bitsandbytes' CPU 4-bit kernels pack 64 inputs per block: the 32-wide tiny BERT is too narrow
    model_dir = save_tiny_bert(tmp_path / "bert-64", hidden=64)
    loaded = record_quantized_loads(monkeypatch)
    write_csv(tmp_path / "train.csv", 16)
    write_csv(tmp_path / "validation.csv", 8, offset=1)
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "task": {"type": "seq_cls", "max_length": 16},
        "data": {"train_file": "train.csv", "validation_file": "validation.csv"},
        "adapter": {"r": 4, "target_modules": ["query", "value"]},
        "quantization": {
            "bits": 4,
            "quant_type": "fp4",
            "double_quant": False,
            "compute_dtype": "bfloat16",
            "skip_modules": ["intermediate.dense"],
        },
        "train": quick_train(max_steps=1),
    }
    finetune_raw(raw, tmp_path)
    [(config, model)] = loaded
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "fp4" and config.bnb_4bit_use_double_quant is False
    assert str(config.bnb_4bit_compute_dtype) == "torch.bfloat16"
    assert "intermediate.dense" in config.llm_int8_skip_modules
    layer = model.bert.encoder.layer[0]
    assert isinstance(layer.output.dense, bitsandbytes.nn.Linear4bit)
    assert not isinstance(layer.intermediate.dense, bitsandbytes.nn.Linear4bit)
    assert layer.output.dense.weight.quant_state.quant_type == "fp4"


def test_a_4bit_base_keeps_its_trained_layout_on_a_bf16_cpu(
    tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU with AVX512-BF16 bitsandbytes repacks a 4-bit layer in place at its first no-grad eval
    forward, which fails on the 32-wide tiny BERT (narrower than a 64-value block) and would make evaluation
    CPU-dependent. The CPU's answer is forced to "yes" here, so the test means the same on every machine:
    finetune (training, then validation and test evaluation) completes and no layer was repacked."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    loaded = record_quantized_loads(monkeypatch)
    write_csv(tmp_path / "train.csv", 16)
    write_csv(tmp_path / "validation.csv", 8, offset=1)
    write_csv(tmp_path / "test.csv", 8, offset=2)
    raw = {
        "model": {"name_or_path": str(tiny_bert_dir)},
        "task": {"type": "seq_cls", "max_length": 16},
        "data": {"train_file": "train.csv", "validation_file": "validation.csv", "test_file": "test.csv"},
        "adapter": {"r": 4, "target_modules": ["query", "value"]},
        "quantization": {"bits": 4},
        "train": quick_train(max_steps=2),
    }
    run = finetune_raw(raw, tmp_path)
    [(_, model)] = loaded
    layers = [m for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert (run / "predictions_test.jsonl").is_file()
