"""[model] keys, each shown through ``peftkit.finetune``: what it loads, and with which settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.key_effects_common import finetune_raw, quick_train, write_csv


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
    assert [(what, name) for what, name, _ in ours] == [
        ("tokenizer", str(tokenizer_dir)),
        ("config", str(weights_only)),
        ("model", str(weights_only)),
    ]
    for _, _, kwargs in ours:
        assert kwargs["revision"] == "main" and kwargs["trust_remote_code"] is True
    model_kwargs = ours[-1][2]
    assert model_kwargs["dtype"] == torch.bfloat16
    assert model_kwargs["config"]._attn_implementation == "eager"
    # the run directory carries the tokenizer it used
    assert transformers.AutoTokenizer.from_pretrained(run).model_max_length == 77
    with safe_open(str(run / "adapter_model.safetensors"), "pt") as saved:
        heads = [saved.get_tensor(k) for k in saved.keys() if "classifier" in k]  # noqa: SIM118
    assert heads and all(t.dtype == torch.bfloat16 for t in heads)
