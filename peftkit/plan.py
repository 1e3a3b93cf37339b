"""Memory and compute estimate of a recipe before it runs: no weights are loaded (meta device).

Model state is counted exactly from the adapted model's parameters: weights (at their dtype, or
bitsandbytes' 4/8-bit sizes for quantized linear layers), gradients of trainable parameters, and the
optimizer's state (two fp32 moments for AdamW; 8-bit state only for tensors of at least 4096 elements,
which is bitsandbytes' ``min_8bit_size``). Activations are an estimate from the layer shapes: what
autograd keeps per token per transformer layer, or only each layer's input with gradient checkpointing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from peftkit.recipe import Recipe
from peftkit.tasks import TASKS
from peftkit.tasks.base import TaskContext

logger = logging.getLogger(__name__)

BNB_MIN_8BIT_SIZE = 4096
BACKWARD_WORKING_SET = 3  # × one layer's saved activations; see activation_bytes
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# optimizer → (state tensors per parameter, bytes per state element when kept in 8 bits, or None)
OPTIMIZER_STATE: dict[str, tuple[int, int | None]] = {
    "adamw_torch": (2, None),
    "adamw_torch_fused": (2, None),
    "adamw_torch_xla": (2, None),
    "adamw_8bit": (2, 1),
    "adamw_bnb_8bit": (2, 1),
    "paged_adamw_8bit": (2, 1),
    "paged_adamw_32bit": (2, None),
    "adamw_hf": (2, None),
    "lion_8bit": (1, 1),
    "paged_lion_8bit": (1, 1),
    "lion_32bit": (1, None),
    "sgd": (0, None),
    "adagrad": (1, None),
    "rmsprop": (1, None),
    "rmsprop_bnb_8bit": (1, 1),
}


@dataclass
class ModuleRow:
    name: str
    total: int
    trainable: int


@dataclass
class MemoryPlan:
    """Byte counts for one training process (per device)."""

    rows: list[ModuleRow]
    total_params: int
    trainable_params: int
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    optimizer_8bit_fraction: float  # share of trainable elements whose optimizer state is 8-bit
    activation_bytes: int
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    notes: list[str] = field(default_factory=list)

    @property
    def model_state_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        return self.model_state_bytes + self.activation_bytes


def plan_recipe(recipe: Recipe, seq_len: int | None = None) -> MemoryPlan:
    """Build the recipe's adapted model on the meta device and count what training it holds in memory."""
    import torch

    from peftkit.adapters import apply_adapter
    from peftkit.data import load_raw_datasets
    from peftkit.modeling import load_model_config, load_tokenizer

    task = TASKS[recipe.task_name]
    model_config = load_model_config(recipe.model)
    tokenizer = load_tokenizer(recipe.model)
    raw = load_raw_datasets(recipe.data, task.columns)
    labels = task.prepare_labels(raw, recipe.task)
    ctx = TaskContext(cfg=recipe.task, tokenizer=tokenizer, labels=labels, model_config=model_config)
    for key, value in task.model_kwargs(ctx).items():
        setattr(model_config, key, value)
    dtype = DTYPE_BYTES.get(recipe.model.dtype, 4)
    with torch.device("meta"):
        model = task.model_class(model_config).from_config(model_config)
    model = apply_adapter(model, recipe.adapter, task, model_config)

    rows = module_rows(model)
    total = sum(r.total for r in rows)
    trainable = sum(r.trainable for r in rows)
    weight_bytes, notes = _weight_bytes(model, dtype, recipe)
    grad_bytes = trainable * 4  # trainable adapter/head parameters are fp32
    optimizer = str(recipe.train.get("optim", "adamw_torch_fused"))
    optimizer_bytes, fraction = optimizer_state_bytes(model, optimizer)
    checkpointing = bool(
        recipe.train.get("gradient_checkpointing") or recipe.train.get("activation_checkpointing")
    )
    batch = int(recipe.train.get("per_device_train_batch_size", 8))
    length = seq_len or int(getattr(recipe.task, "max_length", 512))
    activations = activation_bytes(model_config, batch, length, checkpointing, recipe.adapter)
    return MemoryPlan(
        rows=rows,
        total_params=total,
        trainable_params=trainable,
        weight_bytes=weight_bytes,
        grad_bytes=grad_bytes,
        optimizer_bytes=optimizer_bytes,
        optimizer_8bit_fraction=fraction,
        activation_bytes=activations,
        batch_size=batch,
        seq_len=length,
        gradient_checkpointing=checkpointing,
        notes=notes,
    )


def module_rows(model: Any) -> list[ModuleRow]:
    """Parameter counts per block: each numbered layer, else the first two name parts (embeddings, head)."""
    groups: dict[str, ModuleRow] = {}
    for name, param in model.named_parameters():
        parts = [p for p in name.split(".") if p not in ("base_model", "model")]
        numbered = next((i for i, p in enumerate(parts[:-1]) if p.isdigit()), None)
        key = ".".join(
            parts[: numbered + 1] if numbered is not None else parts[: min(2, len(parts) - 1) or 1]
        )
        row = groups.setdefault(key, ModuleRow(key, 0, 0))
        row.total += param.numel()
        if param.requires_grad:
            row.trainable += param.numel()
    return list(groups.values())


def optimizer_state_bytes(model: Any, optimizer: str) -> tuple[int, float]:
    """Optimizer state for the trainable parameters, and the share of elements held in 8 bits."""
    states, small = OPTIMIZER_STATE.get(optimizer, (2, None))
    total = eight = elements = 0
    for param in model.parameters():
        if not param.requires_grad:
            continue
        n = param.numel()
        elements += n
        if small is not None and n >= BNB_MIN_8BIT_SIZE:
            total += states * n * small
            eight += n
        else:
            total += states * n * 4
    return total, (eight / elements if elements else 0.0)


def _weight_bytes(model: Any, dtype_bytes: int, recipe: Recipe) -> tuple[int, list[str]]:
    """Weights at the load dtype; quantized linear weights at bitsandbytes' packed size."""
    import torch

    quant = recipe.quantization
    notes: list[str] = []
    total = 0
    quantized_ids: set[int] = set()
    if quant is not None:
        # bitsandbytes replaces the frozen nn.Linear layers, except the task heads and skip_modules
        keep_out = set(TASKS[recipe.task_name].head_modules) | set(quant.skip_modules)
        for name, module in model.named_modules():
            parts = set(name.split("."))
            frozen_linear = isinstance(module, torch.nn.Linear) and not module.weight.requires_grad
            if frozen_linear and not parts & keep_out and "lora_" not in name:
                quantized_ids.add(id(module.weight))
        notes.append(f"{len(quantized_ids)} linear weights counted at {quant.bits}-bit")
    for param in model.parameters():
        n = param.numel()
        if quant is not None and id(param) in quantized_ids:
            # 4-bit: half a byte plus one fp32 absmax per 64-block (8-bit absmax with double quant)
            per_param = (0.5 + (1 if quant.double_quant else 4) / 64) if quant.bits == 4 else 1.0
            total += int(n * per_param)
        elif param.requires_grad:
            total += n * 4
        else:
            total += n * dtype_bytes
    return total, notes


def activation_bytes(
    model_config: Any, batch: int, seq_len: int, checkpointing: bool, adapter: dict[str, Any]
) -> int:
    """Peak activation memory of one training step of a transformer stack (fp32).

    Saved per token and layer: layer-norm/residual inputs (2h), the QKV input and outputs (4h), the
    attention output and its projection input (2h), the FFN input (h), the GELU input and output (2i),
    for LoRA with dropout the dropped-out copy of each adapted layer's input (~5h + i), and 1-byte
    dropout masks (3h). Attention in training with dropout takes the math path on CPU, which keeps
    scores, softmax output and dropped-out probabilities (3 floats per head and key) plus a 1-byte mask.
    On top of what is saved, the backward pass of a layer works with about three times that layer's
    saved activations (gradients of activations and of the attention probabilities): an empirical
    factor, measured on MiniLM at batch 16 x 256 tokens on CPU with and without checkpointing, and
    checked at 8 x 128 (scripts/bench_memory.py). With checkpointing only each layer's input (h) stays
    saved, and one layer at a time is recomputed.
    """
    hidden = int(getattr(model_config, "hidden_size", 0) or getattr(model_config, "d_model", 0) or 768)
    inter = int(
        getattr(model_config, "intermediate_size", 0) or getattr(model_config, "d_ff", 0) or 4 * hidden
    )
    layers = int(
        getattr(model_config, "num_hidden_layers", 0) or getattr(model_config, "num_layers", 0) or 12
    )
    heads = int(
        getattr(model_config, "num_attention_heads", 0) or getattr(model_config, "num_heads", 0) or 12
    )
    lora_copies = 5 * hidden + inter if float(adapter.get("lora_dropout", 0) or 0) > 0 else 0
    attention = heads * seq_len
    per_token_layer = 4 * (9 * hidden + 2 * inter + lora_copies + 3 * attention) + 3 * hidden + attention
    tokens = batch * seq_len
    one_layer = tokens * per_token_layer
    outside = 4 * 2 * hidden * tokens  # embeddings output and the head's input
    backward = BACKWARD_WORKING_SET * one_layer
    if checkpointing:
        return tokens * 4 * hidden * layers + one_layer + backward + outside
    return layers * one_layer + backward + outside


def measure_optimizer_state(optimizer: Any) -> dict[str, int]:
    """Bytes of a live optimizer's state, and how many of them are 8-bit (uint8) tensors."""
    import torch

    total = eight = 0
    for state in getattr(optimizer, "state", {}).values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                size = value.numel() * value.element_size()
                total += size
                eight += size if value.dtype == torch.uint8 else 0
    return {"optimizer_state_bytes": total, "optimizer_state_8bit_bytes": eight}


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
