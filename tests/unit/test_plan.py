"""peftkit plan: parameter counts equal the real adapted model's; model-state bytes follow the formulas."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.plan import BNB_MIN_8BIT_SIZE, plan_recipe
from peftkit.recipe import RecipeError, recipe_from_dict
from peftkit.tasks import TASKS


def recipe(tmp_path: Path, model: Path, **tables: dict) -> object:
    (tmp_path / "train.csv").write_text("text,label\nhello there,a\nbye now,b\nsee you,a\n")
    raw = {
        "model": {"name_or_path": str(model)},
        "task": {"type": "seq_cls", "max_length": 16},
        "data": {"train_file": "train.csv"},
        "adapter": {"r": 4, "target_modules": ["query", "value", "dense"]},
        "train": {"per_device_train_batch_size": 4},
    }
    for name, values in tables.items():
        replace = name == "adapter" and "method" in values  # another method takes other keys
        raw[name] = dict(values) if replace else {**raw.get(name, {}), **values}
    return recipe_from_dict(raw, base_dir=tmp_path, name="plan")


def real_counts(r: object) -> tuple[int, int, list[int]]:
    from peftkit.adapters import apply_adapter
    from peftkit.modeling import load_model, load_model_config, load_tokenizer
    from peftkit.tasks.base import TaskContext

    task = TASKS["seq_cls"]
    config = load_model_config(r.model)  # type: ignore[attr-defined]
    ctx = TaskContext(r.task, load_tokenizer(r.model), ("a", "b"), config)  # type: ignore[attr-defined]
    model = apply_adapter(load_model(r.model, task, ctx), r.adapter, task, config)  # type: ignore[attr-defined]
    params = list(model.parameters())
    trainable = [p.numel() for p in params if p.requires_grad]
    return sum(p.numel() for p in params), sum(trainable), trainable


def test_counts_match_the_loaded_model(tmp_path: Path, tiny_bert_dir: Path) -> None:
    r = recipe(tmp_path, tiny_bert_dir)
    plan = plan_recipe(r)  # type: ignore[arg-type]
    total, trainable, _ = real_counts(r)
    assert (plan.total_params, plan.trainable_params) == (total, trainable)
    assert plan.weight_bytes == (total - trainable) * 4 + trainable * 4
    assert plan.grad_bytes == trainable * 4
    assert plan.optimizer_bytes == trainable * 8  # AdamW: two fp32 moments
    names = [row.name for row in plan.rows]
    assert "bert.encoder.layer.0" in names and "bert.embeddings" in names
    assert sum(row.trainable for row in plan.rows) == trainable


def test_8bit_optimizer_state_only_for_large_tensors(tmp_path: Path, tiny_bert_dir: Path) -> None:
    r = recipe(tmp_path, tiny_bert_dir, train={"optim": "adamw_bnb_8bit"})
    plan = plan_recipe(r)  # type: ignore[arg-type]
    _, _, sizes = real_counts(r)
    expected = sum(2 * n * (1 if n >= BNB_MIN_8BIT_SIZE else 4) for n in sizes)
    assert plan.optimizer_bytes == expected
    assert plan.optimizer_8bit_fraction == pytest.approx(
        sum(n for n in sizes if n >= BNB_MIN_8BIT_SIZE) / sum(sizes)
    )


def test_checkpointing_lowers_the_activation_estimate(tmp_path: Path, tiny_bert_dir: Path) -> None:
    plain = plan_recipe(recipe(tmp_path, tiny_bert_dir))  # type: ignore[arg-type]
    checkpointed = plan_recipe(recipe(tmp_path, tiny_bert_dir, train={"gradient_checkpointing": True}))  # type: ignore[arg-type]
    assert checkpointed.gradient_checkpointing and not plain.gradient_checkpointing
    assert checkpointed.activation_bytes < plain.activation_bytes
    assert checkpointed.model_state_bytes == plain.model_state_bytes


def test_4bit_weights_are_counted_packed(tmp_path: Path, tiny_bert_dir: Path) -> None:
    full = plan_recipe(recipe(tmp_path, tiny_bert_dir))  # type: ignore[arg-type]
    quant = plan_recipe(recipe(tmp_path, tiny_bert_dir, quantization={"bits": 4}))  # type: ignore[arg-type]
    assert quant.weight_bytes < full.weight_bytes
    assert any("4-bit" in note for note in quant.notes)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_prompt_methods_refused_where_peft_cannot_use_them(
    tmp_path: Path, tiny_bert_dir: Path, method: str
) -> None:
    task = next((t for t in ("token_cls", "qa") if t in TASKS), None)
    if task is None:
        pytest.skip("no token-level task registered")
    with pytest.raises(RecipeError) as info:
        recipe(
            tmp_path, tiny_bert_dir, task={"type": task}, adapter={"method": method, "num_virtual_tokens": 4}
        )
    keys = {p.key: p for p in info.value.problems}
    assert "adapter.method" in keys
    assert f"{method!r} does not support the {task!r} task" in keys["adapter.method"].problem


def test_measured_8bit_state_matches_bitsandbytes_threshold() -> None:
    """bitsandbytes keeps tensors under 4096 elements in 32-bit: LoRA matrices of r=8 on hidden 384 are."""
    import bitsandbytes as bnb
    import torch

    from peftkit.plan import measure_optimizer_state

    big = torch.nn.Parameter(torch.randn(64, 64))  # 4096 elements: 8-bit state
    small = torch.nn.Parameter(torch.randn(8, 384))  # 3072 elements: 32-bit state
    optimizer = bnb.optim.AdamW8bit([big, small], lr=1e-3)
    (big.sum() + small.sum()).backward()
    optimizer.step()
    measured = measure_optimizer_state(optimizer)
    assert measured["optimizer_state_8bit_bytes"] == 2 * 4096  # two uint8 moments
    fp32_small = 2 * 3072 * 4
    assert measured["optimizer_state_bytes"] >= measured["optimizer_state_8bit_bytes"] + fp32_small


def test_activation_formula_hand_computed() -> None:
    from types import SimpleNamespace

    from peftkit.plan import activation_bytes

    config = SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2)
    # per token and layer: 4 * (9*4 + 2*8 + (5*4 + 8) + 3 * 2*3) + 3*4 + 2*3 = 4 * 98 + 18 = 410 bytes
    tokens = 2 * 3
    one_layer = tokens * 410
    outside = 4 * 2 * 4 * tokens
    saved, backward = 2 * one_layer, 3 * one_layer  # two layers saved; the backward working set
    assert activation_bytes(config, 2, 3, False, {"lora_dropout": 0.1}) == saved + backward + outside
    checkpointed = tokens * 4 * 4 * 2 + one_layer + 3 * one_layer + outside
    assert activation_bytes(config, 2, 3, True, {"lora_dropout": 0.1}) == checkpointed
    no_lora_dropout = tokens * (4 * (9 * 4 + 2 * 8 + 3 * 6) + 18)
    assert activation_bytes(config, 2, 3, False, {}) == 5 * no_lora_dropout + outside
