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


def test_checkpointing_changes_activations_not_model_state(tmp_path: Path, tiny_bert_dir: Path) -> None:
    plain = plan_recipe(recipe(tmp_path, tiny_bert_dir))  # type: ignore[arg-type]
    checkpointed = plan_recipe(recipe(tmp_path, tiny_bert_dir, train={"gradient_checkpointing": True}))  # type: ignore[arg-type]
    assert checkpointed.gradient_checkpointing and not plain.gradient_checkpointing
    # two layers: the recomputed layer sits on top of one layer's forward, so checkpointing gains nothing;
    # test_activation_estimate_structure checks that six layers (MiniLM) gain
    assert checkpointed.activation_bytes != plain.activation_bytes
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


MINILM = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 12}


def test_saved_activation_count_hand_computed() -> None:
    from peftkit.plan import layer_activation_floats

    h, i, heads, seq, r = 4, 8, 2, 3, 2
    common = {"attention_dropout": True, "hidden_dropout": True, "rank": r}
    frozen = 3 * heads * seq + 3 * h + 2 * (h + 2) + i + 2 * h  # scores x3, q/k/v, norms, GELU, masks
    full, full_tmp = layer_activation_floats(
        h, i, heads, seq, adapted=(), lora_dropout=False, full_finetuning=True, **common
    )
    assert (full, full_tmp) == (frozen + 3 * h + i, 10 * h)  # + inputs of the trainable linears
    roles = ("qkv", "qkv", "qkv", "o", "up", "down")
    lora, lora_tmp = layer_activation_floats(
        h, i, heads, seq, adapted=roles, lora_dropout=True, full_finetuning=False, **common
    )
    assert lora == frozen + 2 * (5 * h + i) + 6 * r  # dropout mask + dropped copy of each input
    assert lora_tmp == 28 * h + 4 * i
    no_dropout, _ = layer_activation_floats(
        h, i, heads, seq, adapted=roles, lora_dropout=False, full_finetuning=False, **common
    )
    assert no_dropout == frozen + 3 * h + i + 6 * r  # each distinct input once
    fused, fused_tmp = layer_activation_floats(
        h, i, heads, seq, adapted=roles, lora_dropout=True, full_finetuning=False, fused_lora=True, **common
    )
    # the fused path keeps each distinct input once, A·x and each mask as bits (no float mask, no copy)
    assert fused == no_dropout + 5 * -(-h // 32) + -(-i // 32)  # whole floats, rounded up
    # inputs saved, no B·A·x/scaled/sum copies of the output, a mask and an int32 draw per input
    assert fused_tmp == lora_tmp - (3 * h + i) - 3 * (5 * h + i) + 2 * (5 * h + i)


@pytest.mark.parametrize("case", ["full", "lora", "lora_no_dropout", "lora_qv", "fused", "fused_qv"])
def test_saved_count_matches_what_autograd_saves(case: str) -> None:
    """The per-layer count equals the bytes autograd really saves in a BERT layer (parameters excluded)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    from peftkit.plan import adapted_roles, layer_activation_floats

    h, i, heads, batch, seq = 32, 64, 2, 2, 8
    config = BertConfig(
        vocab_size=100, hidden_size=h, num_hidden_layers=2, num_attention_heads=heads, intermediate_size=i
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    dropout = 0.0 if case == "lora_no_dropout" else 0.1
    if case != "full":
        targets = ["query", "value"] if case.endswith("_qv") else ["query", "key", "value", "dense"]
        lora = LoraConfig(r=4, lora_dropout=dropout, target_modules=targets, task_type="SEQ_CLS")
        model = get_peft_model(model, lora)
        if case.startswith("fused"):
            from peftkit import fused_lora

            assert fused_lora.install(model).fused
    layer = next(m for name, m in model.named_modules() if name.endswith("encoder.layer.1"))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inside, saved = [False], {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if inside[0] and storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()  # a storage saved twice counts once
        return t

    layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(0, 100, (batch, seq)), labels=torch.zeros(batch, dtype=torch.long))
    roles = () if case == "full" else adapted_roles(model)
    expected, _ = layer_activation_floats(
        h,
        i,
        heads,
        seq,
        attention_dropout=True,
        hidden_dropout=True,
        adapted=roles or (),
        rank=4,
        lora_dropout=dropout > 0,
        full_finetuning=case == "full",
        fused_lora=case.startswith("fused"),
    )
    assert sum(saved.values()) == 4 * batch * seq * expected


def test_activation_estimate_structure() -> None:
    from types import SimpleNamespace

    from peftkit.plan import activation_bytes

    config = SimpleNamespace(**MINILM, vocab_size=1000)
    lora = {"method": "lora", "r": 8, "lora_dropout": 0.1}

    def estimate(batch: int = 16, seq: int = 256, checkpointing: bool = False, **kw: object) -> int:
        return activation_bytes(config, batch, seq, checkpointing, kw.pop("adapter", lora), **kw)  # type: ignore[arg-type]

    assert estimate(checkpointing=True) < estimate()
    for checkpointing in (False, True):
        assert estimate(seq=128, checkpointing=checkpointing) < estimate(checkpointing=checkpointing)
        assert estimate(batch=8, checkpointing=checkpointing) < estimate(checkpointing=checkpointing)
    assert estimate(batch=32) == pytest.approx(2 * estimate(batch=16), rel=0.01)  # linear in batch
    # LoRA's dropout keeps a masked copy of every adapted input; fewer adapted linears, less memory
    assert estimate(adapter={**lora, "lora_dropout": 0.0}) < estimate()
    assert estimate(adapted=("qkv", "qkv")) < estimate()
    # attention scores grow with the square of the sequence: per token, longer sequences cost more
    assert estimate(batch=4, seq=512) > estimate(batch=8, seq=256)
    # full fine-tuning keeps the same linear inputs as LoRA without dropout, but not LoRA's B·A·x temporaries
    full = estimate(full_finetuning=True, adapter={})
    assert full < estimate(adapter={**lora, "lora_dropout": 0.0}) < estimate()


def test_plan_states_the_measured_padding_and_process_baseline(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """Issue 20: plan assumed every batch padded to max_length (QA 1.9x over) and left out the process
    baseline (seq_cls 30% under); it now measures the longest training feature and this process's RSS."""
    from transformers import AutoTokenizer

    from tests.conftest import invoke_cli

    texts = ["hello there", "a much longer message about the meeting at noon tomorrow", "bye now"]
    (tmp_path / "train.csv").write_text(
        "text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(texts))
    )
    (tmp_path / "validation.csv").write_text("text,label\nhi,0\nok,1\n")
    (tmp_path / "plan.toml").write_text(
        f'[model]\nname_or_path = "{tiny_bert_dir}"\n[task]\ntype = "seq_cls"\nmax_length = 64\n'
        '[data]\ntrain_file = "train.csv"\nvalidation_file = "validation.csv"\n'
        "[adapter]\nr = 4\n[train]\nper_device_train_batch_size = 2\n"
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    longest = max(len(tokenizer(t)["input_ids"]) for t in texts)
    assert longest < 64
    result = invoke_cli("plan", str(tmp_path / "plan.toml"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"activations (batch 2 x {longest} tokens; estimate)" in result.output
    assert (
        "padding: batches padded to their longest feature: the longest of all 3 training examples, "
        f"tokenized, is {longest} tokens (max_length 64)"
    ) in result.output
    assert "process baseline (measured: torch, transformers, data; no weights)" in result.output
    assert "peak process RSS (total + baseline)" in result.output
    forced = invoke_cli("plan", str(tmp_path / "plan.toml"), "--device", "cpu", "--seq-len", "32")
    assert (
        "activations (batch 2 x 32 tokens" in forced.output
        and "padding: 32 tokens a sequence" in forced.output
    )

    r = recipe(tmp_path, tiny_bert_dir)
    planned = plan_recipe(r, device="cpu")
    # a process that imported torch and transformers holds well over 100 MiB before any weights
    assert planned.baseline_bytes > 100 * 2**20
    assert planned.process_rss_bytes == planned.baseline_bytes + planned.total_bytes
