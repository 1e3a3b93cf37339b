"""peftkit plan's CUDA activation model: its per-layer count equals what autograd saves in a Llama layer in
bf16 with the flash attention kernel, and the CLI says which model it used and that it is uncalibrated."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import invoke_cli

H, INTER, HEADS, KV, BATCH, SEQ, RANK = 64, 128, 4, 2, 2, 12, 4


def saved_bytes_per_token(
    dropout: float, targets: str | list[str], fused: bool = False
) -> tuple[float, object]:
    """Bytes autograd saves per token in layer 1 of a tiny Llama + LoRA, in bf16 autocast, flash SDPA.

    How the CUDA path is matched on CPU: the base weights are bf16 and the LoRA weights fp32 (as peft keeps
    them), the forward runs in ``torch.autocast(dtype=bfloat16)`` (what the Trainer's ``bf16=True`` does on
    a GPU), and ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)`` forces SDPA's flash kernel (it raises if the
    kernel cannot run, so the count cannot silently come from the math path). Tensors saved inside a
    dropout module are its mask: counted at one byte, as CUDA's bool mask (CPU keeps a float one).
    Left out: parameters, autocast's bf16 copies of the LoRA weights (per layer, not per token) and the
    rotary cos/sin tables (one per position, shared by every layer and example).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=H,
        intermediate_size=INTER,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    lora = LoraConfig(r=RANK, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if fused:  # peftkit's fused LoRA path, as finetune installs it
        from peftkit import fused_lora

        assert fused_lora.install(model).fused
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    layer = next(m for name, m in model.named_modules() if name.endswith("layers.1"))
    params = {p.untyped_storage().data_ptr(): tuple(p.shape) for p in model.parameters()}
    where: list[torch.nn.Module] = []
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if not where or storage.data_ptr() in params:
            return t
        module = where[-1]
        weight = getattr(module, "weight", None)
        if weight is not None and tuple(t.shape) in (tuple(weight.shape), tuple(weight.shape)[::-1]):
            return t  # autocast's bf16 copy of an fp32 LoRA weight (saved transposed for the matmul)
        if t.dim() == 4 and t.shape[0] == 1 and BATCH > 1:
            return t  # rotary cos/sin: per position, not per example
        dropout_mask = isinstance(module, torch.nn.Dropout)
        saved[storage.data_ptr()] = t.numel() if dropout_mask else storage.nbytes()
        return t

    for module in layer.modules():
        module.register_forward_pre_hook(lambda m, *_: where.append(m))
        module.register_forward_hook(lambda *_: (where.pop(), None)[1])
    model.train()
    ids = torch.randint(0, 100, (BATCH, SEQ))
    with (
        sdpa_kernel(SDPBackend.FLASH_ATTENTION),
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        model(input_ids=ids, labels=ids).loss.backward()
    from peftkit.plan import adapted_roles

    return sum(saved.values()) / (BATCH * SEQ), adapted_roles(model)


@pytest.mark.parametrize(
    ("dropout", "targets", "fused"),
    [
        (0.1, "all-linear", False),
        (0.0, "all-linear", False),
        (0.1, ["q_proj", "v_proj"], False),
        (0.0, ["down_proj"], False),
        (0.1, "all-linear", True),
        (0.1, ["q_proj", "v_proj"], True),
    ],
)
def test_cuda_layer_count_matches_what_autograd_saves(
    dropout: float, targets: str | list[str], fused: bool
) -> None:
    from peftkit.plan import cuda_layer_saved_bytes

    measured, roles = saved_bytes_per_token(dropout, targets, fused)
    expected = cuda_layer_saved_bytes(
        H,
        INTER,
        HEADS,
        KV,
        SEQ,
        decoder=True,
        kernel="flash/memory-efficient",
        act_bytes=2,
        lora_act_bytes=2,
        adapted=roles or (),  # type: ignore[arg-type]
        rank=RANK,
        lora_dropout=dropout > 0,
        fused_lora=fused,
    )
    assert measured == expected


def test_cuda_model_structure() -> None:
    """No glibc share, no score matrix with flash; logits count per token for an LM head."""
    from types import SimpleNamespace

    from peftkit.plan import activation_bytes, cuda_activation_bytes

    config = SimpleNamespace(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        hidden_act="silu",
        attention_dropout=0.0,
    )
    lora = {"method": "lora", "r": 16, "lora_dropout": 0.05}

    def cuda(batch: int = 4, seq: int = 1024, ckpt: bool = False, **kw: object) -> int:
        return cuda_activation_bytes(config, batch, seq, ckpt, lora, **kw)  # type: ignore[arg-type]

    assert cuda(ckpt=True) < cuda() / 3
    assert cuda(batch=8) == pytest.approx(2 * cuda(batch=4), rel=1e-6)  # flash: linear in tokens
    assert cuda(seq=2048) == pytest.approx(2 * cuda(seq=1024), rel=1e-6)  # no s² term
    assert cuda(kernel="math", seq=2048) > 2 * cuda(kernel="math", seq=1024)  # the score matrix
    assert cuda(vocab_logits=True) - cuda() == 4 * 1024 * (2 + 8) * 32000
    assert cuda(act_bytes=4, lora_act_bytes=4) > cuda()
    # the CPU model (fp32, glibc retention, math attention) is far above the CUDA one
    assert activation_bytes(config, 4, 1024, False, lora) > 2 * cuda()


LLAMA3_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
}


def llama3_8b_recipe(tmp_path: Path) -> Path:
    """A recipe for a local Llama-3-8B-shaped config (no weights: plan builds it on the meta device)."""
    import json

    from transformers import LlamaConfig

    from tests.conftest import minilm_path

    model_dir = tmp_path / "llama3-8b-shape"
    LlamaConfig(**LLAMA3_8B, max_position_embeddings=8192).save_pretrained(model_dir)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(model_dir)  # plan only tokenizes nothing
    rows = [{"source": f"sentence {n}", "target": f"frase {n}"} for n in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "llama3_8b_qlora.toml"
    recipe.write_text(
        f"""
[model]
name_or_path = "{model_dir}"
dtype = "bfloat16"

[task]
type = "seq2seq"

[data]
train_file = "train.jsonl"

[adapter]
method = "lora"
r = 16
alpha = 32
dropout = 0.05
target_modules = "all-linear"

[quantization]
bits = 4
compute_dtype = "bfloat16"

[train]
bf16 = true
per_device_train_batch_size = 4
gradient_checkpointing = true
optim = "paged_adamw_8bit"
"""
    )
    return recipe


def test_plan_llama3_8b_qlora_on_cuda_model(tmp_path: Path) -> None:
    """`peftkit plan --device cuda` on an 8B Llama: the CUDA model's per-device memory, uncalibrated."""
    result = invoke_cli("plan", str(llama3_8b_recipe(tmp_path)), "--seq-len", "2048", "--device", "cuda")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "activation model: CUDA" in out
    assert (
        "CUDA model: derived from autograd's saved tensors, not yet checked against a GPU measurement" in out
    )
    assert "batch 4 x 2048 tokens, checkpointed" in out
    assert "linear weights counted at 4-bit" in out
    assert "unquantized weights counted at fp32" in out  # peft's k-bit preparation upcasts them
    assert "per device over" in out and "ddp" in out
    total_line = [line for line in out.splitlines() if line.startswith("total ")][-1]
    gib = float(total_line.split()[-2])
    # 4-bit 8B (5.5 GiB with the bf16 embeddings and LM head) + checkpointed bf16 layers + fp32 logits
    assert total_line.split()[-1] == "GiB" and 10 < gib < 30, total_line
    # the CPU model on the same recipe says so, and differs
    cpu = invoke_cli("plan", str(llama3_8b_recipe(tmp_path / "cpu")), "--seq-len", "2048", "--device", "cpu")
    assert cpu.exit_code == 0, cpu.output
    assert "activation model: CPU" in cpu.output and "CUDA model:" not in cpu.output
