"""[model] keys, each shown through ``peftkit.finetune``: what it loads, and with which settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.key_effects_common import finetune_raw, quick_train, train_metrics, write_csv


def test_tokenizer_revision_remote_code_attention_and_dtype_reach_the_loaders(
    tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.tokenizer is where the tokenizer comes from (the model folder here has none); revision and
    trust_remote_code reach every from_pretrained call; attn_implementation and dtype reach the model's, and
    the model is trained in that dtype (the new head saved with the adapter is bfloat16)."""
    import shutil

    import torch
    import transformers
    from safetensors import safe_open

    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert_dir / name, weights_only / name)
    # the tokenizer named by model.tokenizer, told apart by its model_max_length
    tokenizer_dir = tmp_path / "tokenizer"
    transformers.AutoTokenizer.from_pretrained(tiny_bert_dir, model_max_length=77).save_pretrained(
        tokenizer_dir
    )
    calls: list[tuple[str, str, dict[str, Any]]] = []

    def spy(owner: Any, what: str) -> None:
        original = owner.from_pretrained.__func__

        def from_pretrained(cls: Any, name: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append((what, str(name), dict(kwargs)))
            return original(cls, name, *args, **kwargs)

        monkeypatch.setattr(owner, "from_pretrained", classmethod(from_pretrained))

    spy(transformers.AutoConfig, "config")
    spy(transformers.AutoTokenizer, "tokenizer")
    spy(transformers.PreTrainedModel, "model")
    write_csv(tmp_path / "train.csv", 24)
    write_csv(tmp_path / "validation.csv", 8, offset=1)
    model = {
        "name_or_path": str(weights_only),
        "tokenizer": str(tokenizer_dir),
        "revision": "main",
        "trust_remote_code": True,
        "attn_implementation": "eager",
        "dtype": "bfloat16",
    }
    raw = {
        "model": model,
        "task": {"type": "seq_cls", "max_length": 32},
        "data": {"train_file": "train.csv", "validation_file": "validation.csv"},
        "adapter": {"r": 4},
        "train": quick_train(),
    }
    run = finetune_raw(raw, tmp_path)

    # peftkit's own calls (transformers calls from_pretrained again inside, with private keys)
    ours = [(what, name, kwargs) for what, name, kwargs in calls if "_from_auto" not in kwargs]
    # the checks validate runs first read the config alone (no weights); then training loads all three
    assert [(what, name) for what, name, _ in ours] == [
        ("config", str(weights_only)),
        ("tokenizer", str(tokenizer_dir)),
        ("config", str(weights_only)),
        ("model", str(weights_only)),
    ]
    for _, _, kwargs in ours:
        assert kwargs["revision"] == "main" and kwargs["trust_remote_code"] is True
    model_kwargs = ours[-1][2]
    assert model_kwargs["dtype"] == torch.bfloat16
    assert model_kwargs["config"]._attn_implementation == "eager"
    # the run directory carries the tokenizer it used (its vocabulary; model_max_length 77 becomes the
    # length the run trained at, task.max_length = 32, so that pipeline(truncation=True) cuts there)
    saved_tokenizer = transformers.AutoTokenizer.from_pretrained(run)
    assert saved_tokenizer.model_max_length == 32
    with safe_open(str(run / "adapter_model.safetensors"), "pt") as saved:
        heads = [saved.get_tensor(k) for k in saved.keys() if "classifier" in k]  # noqa: SIM118
    assert heads and all(t.dtype == torch.bfloat16 for t in heads)


def write_llama_gguf(path: Path, model: Any, scale: float = 1.0) -> Path:
    """The tiny Llama's float32 weights as a GGUF file (embeddings times ``scale``), with the hyper-parameters
    and tensor layout of ``peftkit export --format gguf``; no tokenizer (the recipes name one)."""
    import gguf

    from peftkit.gguf_export import add_llama_hparams, llama_tensors

    weights = {
        name: tensor * scale if name == "model.embed_tokens.weight" else tensor
        for name, tensor in model.state_dict().items()
    }
    writer = gguf.GGUFWriter(str(path), "llama")
    add_llama_hparams(writer, model.config)
    for name, data, raw_dtype in llama_tensors(weights, model.config, "f32"):
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_file_is_the_weights_finetune_trains(tmp_path: Path) -> None:
    """A folder holding only GGUF files: gguf_file picks the one whose (dequantised) weights are trained;
    two files that differ only in their embeddings give two different training losses."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from tests.integration.test_seq2seq_cli import save_tiny

    source = save_tiny("llama", tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(source)
    folder = tmp_path / "gguf-only"
    folder.mkdir()
    write_llama_gguf(folder / "a.gguf", model)
    write_llama_gguf(folder / "b.gguf", model, scale=3.0)
    write_csv(tmp_path / "train.csv", 16)
    write_csv(tmp_path / "validation.csv", 8, offset=1)

    def run(gguf_file: str) -> Path:
        raw = {
            "model": {"name_or_path": str(folder), "gguf_file": gguf_file, "tokenizer": str(source)},
            "task": {"type": "seq_cls", "max_length": 32},
            "data": {"train_file": "train.csv", "validation_file": "validation.csv"},
            "adapter": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
            "train": quick_train(max_steps=1),
        }
        return finetune_raw(raw, tmp_path, gguf_file)

    losses = [train_metrics(run(name))["train_loss"] for name in ("a.gguf", "b.gguf")]
    assert abs(losses[0] - losses[1]) > 1e-6
