"""LoRA+ (``[adapter] loraplus_lr_ratio``, issue 23) through ``peftkit.finetune``: the optimizer's groups give
lora_B ``learning_rate × ratio`` and lora_A ``learning_rate``, with the class ``train.optim`` names, and the
trained lora_B moves ``ratio`` times as far as in a plain LoRA run, on the fused LoRA path and on peft's
layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.key_effects_common import finetune_raw, quick_train, write_csv

LR = 1e-3


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loraplus-data")
    write_csv(folder / "train.csv", 8)
    write_csv(folder / "validation.csv", 4, offset=1)
    return folder


def raw_recipe(model: Path, data: Path, adapter: dict[str, Any], **train: Any) -> dict[str, Any]:
    """One optimizer step at a constant learning rate without weight decay or dropout: Adam's first update
    of a parameter with gradient g is ``lr · g / (|g| + eps)``, so each entry moves by its group's lr."""
    return {
        "model": {"name_or_path": str(model)},
        "task": {"type": "seq_cls", "max_length": 16},
        "data": {"train_file": str(data / "train.csv"), "validation_file": str(data / "validation.csv")},
        "adapter": {"r": 4, "lora_dropout": 0.0, "target_modules": ["query", "value"], **adapter},
        "train": quick_train(
            **{
                "max_steps": 1,
                "learning_rate": LR,
                "lr_scheduler_type": "constant",
                "warmup_steps": 0,
                "weight_decay": 0.0,
                **train,
            }
        ),
    }


def optimizer_seen() -> Any:
    """A TrainerCallback (given to finetune's ``callbacks``) keeping the optimizer's class and each trainable
    parameter's learning rate as training begins."""
    from transformers import TrainerCallback

    class OptimizerSeen(TrainerCallback):
        def __init__(self) -> None:
            self.optimizer_class = ""
            self.lr_of: dict[str, float] = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            optimizer, model = kwargs["optimizer"], kwargs["model"]
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
            self.optimizer_class = f"{type(inner).__module__}.{type(inner).__name__}"
            group_lr = {id(p): g["lr"] for g in inner.param_groups for p in g["params"]}
            self.lr_of = {n: group_lr[id(p)] for n, p in model.named_parameters() if p.requires_grad}
            return control

    return OptimizerSeen()


def train(raw: dict[str, Any], work: Path, name: str) -> tuple[Path, Any]:
    import peftkit
    from peftkit.recipe import recipe_from_dict

    seen = optimizer_seen()
    raw = {**raw, "train": {**raw["train"], "output_dir": str(work / name)}}
    result = peftkit.finetune(recipe_from_dict(raw, base_dir=work, name=name), callbacks=[seen])
    return Path(result.run_dir), seen


def rates(lr_of: dict[str, float], part: str) -> list[float]:
    """The distinct learning rates of the parameters whose name holds ``part``."""
    return sorted({lr for name, lr in lr_of.items() if part in name})


def lora_tensors(run: Path, kind: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(run / "adapter_model.safetensors")).items() if kind in k}


@pytest.mark.parametrize("fused", [True, False], ids=["fused-lora", "peft-layers"])
def test_loraplus_trains_lora_b_at_ratio_times_the_learning_rate(
    fused: bool, tiny_bert_dir: Path, cls_data: Path, tmp_path: Path
) -> None:
    import torch

    plus, seen = train(
        raw_recipe(tiny_bert_dir, cls_data, {"loraplus_lr_ratio": 16}, fused_lora=fused), tmp_path, "plus"
    )
    plain, seen_plain = train(raw_recipe(tiny_bert_dir, cls_data, {}, fused_lora=fused), tmp_path, "plain")
    # the optimizer: train.optim's class (transformers' default, fused AdamW), LoRA+'s learning rates
    assert seen.optimizer_class == "torch.optim.adamw.AdamW"
    assert rates(seen.lr_of, "lora_B") == pytest.approx([16 * LR])
    assert rates(seen.lr_of, "lora_A") == pytest.approx([LR])
    assert rates(seen_plain.lr_of, "lora_") == pytest.approx([LR])
    # the trained B (zero before the step): every entry that got a gradient moved by its lr, 16 × as far
    b_plus, b_plain = lora_tensors(plus, "lora_B"), lora_tensors(plain, "lora_B")
    assert b_plus and b_plus.keys() == b_plain.keys()
    for key in b_plus:
        moved = b_plain[key].abs() > 0
        assert moved.float().mean() > 0.9, key
        ratio = b_plus[key][moved].abs() / b_plain[key][moved].abs()
        assert torch.allclose(ratio, torch.full_like(ratio, 16.0), rtol=1e-3), (key, ratio)
        # Adam's first step: lr · |g| / (|g| + eps), just below lr for these small gradients
        assert 0.9 * LR < float(b_plain[key].abs().max()) <= LR * (1 + 1e-6), key
    # A gets no gradient while B is zero: both runs keep the same (seeded) init
    a_plus, a_plain = lora_tensors(plus, "lora_A"), lora_tensors(plain, "lora_A")
    assert all(torch.equal(a_plus[k], a_plain[k]) for k in a_plus)
    # the resolved recipe records LoRA+; adapter_config.json (peft's) does not carry the key
    assert '"loraplus_lr_ratio": 16' in (plus / "peftkit_run.json").read_text()
    assert "loraplus" not in (plus / "adapter_config.json").read_text()


def test_loraplus_keeps_the_8bit_optimizer_of_train_optim(
    tiny_bert_dir: Path, cls_data: Path, tmp_path: Path
) -> None:
    raw = raw_recipe(tiny_bert_dir, cls_data, {"loraplus_lr_ratio": 4}, optim="adamw_bnb_8bit")
    run, seen = train(raw, tmp_path, "plus8")
    assert seen.optimizer_class.startswith("bitsandbytes.optim") and seen.optimizer_class.endswith("AdamW")
    assert rates(seen.lr_of, "lora_B") == pytest.approx([4 * LR])
    assert rates(seen.lr_of, "lora_A") == pytest.approx([LR])
    assert lora_tensors(run, "lora_B")


def test_loraplus_lr_embedding_sets_the_embedding_lora_rate(
    tiny_bert_dir: Path, cls_data: Path, tmp_path: Path
) -> None:
    """LoRA on the word embeddings trains at loraplus_lr_embedding (peft's default 1e-6 without it)."""
    adapter = {"target_modules": ["query", "word_embeddings"], "loraplus_lr_ratio": 16}
    _, default = train(raw_recipe(tiny_bert_dir, cls_data, adapter), tmp_path, "default")
    _, seen = train(
        raw_recipe(tiny_bert_dir, cls_data, {**adapter, "loraplus_lr_embedding": 1e-5}), tmp_path, "set"
    )
    for lr_of, wanted in ((default.lr_of, 1e-6), (seen.lr_of, 1e-5)):
        assert rates(lr_of, "lora_embedding") == pytest.approx([wanted]), lr_of
        assert rates(lr_of, "query.lora_B") == pytest.approx([16 * LR])


def test_loraplus_checkpoint_keeps_its_groups(tiny_bert_dir: Path, cls_data: Path, tmp_path: Path) -> None:
    """The checkpoint's optimizer state (read with weights_only), which --resume loads, holds LoRA+'s
    learning rates."""
    import torch

    raw = raw_recipe(
        tiny_bert_dir, cls_data, {"loraplus_lr_ratio": 16}, max_steps=2, save_strategy="steps", save_steps=1
    )
    run = finetune_raw(raw, tmp_path)
    state = torch.load(run / "checkpoint-1" / "optimizer.pt", weights_only=True)
    group_rates = sorted({group["lr"] for group in state["param_groups"] if group["params"]})
    assert group_rates == pytest.approx([LR, 16 * LR])
