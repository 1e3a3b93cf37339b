"""Memory and compute estimate of a recipe before it runs: no weights are loaded (meta device).

Model state is counted exactly from the adapted model's parameters: weights (at their dtype, or
bitsandbytes' 4/8-bit sizes for quantized linear layers), gradients of trainable parameters, and the
optimizer's state (two fp32 moments for AdamW; 8-bit state only for tensors of at least 4096 elements,
which is bitsandbytes' ``min_8bit_size``). Activations are an estimate from the layer shapes: what
autograd saves per token and layer, the share of the forward's freed temporaries the C allocator keeps
resident, and the backward pass's gradients (see ``activation_bytes``).

Two activation models, chosen by the device that will train (``device``): the CPU model
(``activation_bytes``, measured as process RSS on CPU) and the CUDA model (``cuda_activation_bytes``:
bf16/fp16 activations, 1-byte dropout masks, flash/memory-efficient attention that saves no score matrix,
PyTorch's caching allocator instead of glibc). Each says whether it has been checked against a measurement
(``ActivationModel.calibration``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from peftkit.adapters import METHODS
from peftkit.recipe import Recipe
from peftkit.tasks import TASKS

logger = logging.getLogger(__name__)

BNB_MIN_8BIT_SIZE = 4096
# share of the forward's freed temporaries glibc keeps resident (measured on MiniLM, see activation_bytes)
RETAINED_TEMPORARY_SHARE = 0.6
# glibc serves blocks of at least this size with mmap and unmaps them on free (DEFAULT_MMAP_THRESHOLD_MAX)
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
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


@dataclass(frozen=True)
class ActivationModel:
    """Which activation model a plan used, what it assumes, and whether a measurement has checked it."""

    device: str  # "cpu" | "cuda"
    assumptions: str
    calibrated: bool
    calibration: str


CPU_CALIBRATION = (
    "CPU model: checked against scripts/bench_memory.py on MiniLM (process RSS; five arms within 10-13%, "
    "docs/memory.md)"
)
# Set calibrated=True and name the run here once scripts/gpu_acceptance.py has measured a GPU (docs/gpu.md).
CUDA_CALIBRATION = (
    "CUDA model: derived from autograd's saved tensors, not yet checked against a GPU measurement "
    "(docs/gpu.md)"
)
CUDA_CALIBRATED = False


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
    activation_model: ActivationModel | None = None
    # RSS of the planning process after importing the stack and loading tokenizer and data, no weights:
    # host memory every training process holds besides model state and activations
    baseline_bytes: int = 0
    padding: str = ""  # which sequence length the activations assume, and where it came from

    @property
    def process_rss_bytes(self) -> int:
        """The CPU peak process RSS estimate: the process baseline plus model state and activations."""
        return self.baseline_bytes + self.total_bytes

    @property
    def model_state_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        return self.model_state_bytes + self.activation_bytes


def plan_recipe(recipe: Recipe, seq_len: int | None = None, device: str | None = None) -> MemoryPlan:
    """Build the recipe's adapted model on the meta device and count what training it holds in memory.

    ``device`` ("cpu" or "cuda") picks the activation model; default: "cuda" when a CUDA device is
    available, else "cpu".
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"

    from peftkit.adapters import apply_adapter, meta_adapter_options
    from peftkit.data import load_raw_datasets
    from peftkit.modeling import load_stack

    task = TASKS[recipe.task_name]
    raw = load_raw_datasets(recipe.data, task)
    ctx = load_stack(recipe, task.prepare_labels(raw, recipe.task), with_model=False).ctx
    model_config = ctx.model_config
    for key, value in task.model_kwargs(ctx).items():
        setattr(model_config, key, value)
    dtype = DTYPE_BYTES.get(recipe.model.dtype, 4)
    # what a training process holds before its weights: torch, transformers, peft, the tokenizer and the data
    baseline = process_rss_bytes()
    with torch.device("meta"):
        model = task.model_class(model_config).from_config(model_config)
    model = apply_adapter(model, meta_adapter_options(recipe.adapter), task, model_config)

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
    length, padding = _planned_length(recipe, task, ctx, raw, seq_len, model_config)
    if device == "cuda":
        act, lora_act = activation_dtype_bytes(recipe)
        kernel = attention_kernel(model_config)
        activations = cuda_activation_bytes(
            model_config,
            batch,
            length,
            checkpointing,
            recipe.adapter,
            adapted=adapted_roles(model),
            act_bytes=act,
            lora_act_bytes=lora_act,
            kernel=kernel,
            vocab_logits=_output_embeddings(model) is not None,
            residual_bytes=4 if recipe.quantization is not None else act,
            fused_lora=fused_lora_planned(recipe),
        )
        used = ActivationModel(
            "cuda",
            f"{'bf16/fp16' if act == 2 else 'fp32'} activations, {kernel} attention"
            f"{' (no score matrix saved)' if kernel != 'math' else ' (score matrix saved)'}, "
            "1-byte dropout masks, caching allocator (peak allocated; reserved is higher)",
            CUDA_CALIBRATED,
            CUDA_CALIBRATION,
        )
    else:
        activations = activation_bytes(
            model_config,
            batch,
            length,
            checkpointing,
            recipe.adapter,
            adapted=adapted_roles(model),
            fused_lora=fused_lora_planned(recipe),
        )
        used = ActivationModel(
            "cpu", "fp32 activations, math attention, glibc heap (process RSS)", True, CPU_CALIBRATION
        )
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
        activation_model=used,
        baseline_bytes=baseline,
        padding=padding,
    )


def training_length(cfg: Any, model_config: Any) -> int:
    """The tokens per training example the activation models count.

    seq2seq has no ``max_length``: a decoder-only model trains on prompt and target joined; an
    encoder-decoder runs its encoder layers over the source and its decoder layers over the target, which
    the per-layer models (one length for every layer) see as the layer-weighted mean of the two.
    """
    source = getattr(cfg, "max_source_length", None)
    if source is None:
        return int(getattr(cfg, "max_length", 512))
    target = int(cfg.max_target_length)
    if not getattr(model_config, "is_encoder_decoder", False):
        return int(source) + target
    encoder = int(getattr(model_config, "num_layers", 0) or getattr(model_config, "encoder_layers", 1))
    decoder = int(
        getattr(model_config, "num_decoder_layers", 0) or getattr(model_config, "decoder_layers", encoder)
    )
    return math.ceil((int(source) * encoder + target * decoder) / (encoder + decoder))


def fused_lora_planned(recipe: Recipe) -> bool:
    """Whether finetune trains the recipe's LoRA linears on the fused path (peftkit.fused_lora): method
    "lora" with ``[train] fused_lora`` on (the default), on an unquantized base."""
    return (
        bool(recipe.train.get("fused_lora", True))
        and recipe.adapter.get("method", "lora") == "lora"
        and recipe.quantization is None
    )


QKV_NAMES = {"query", "key", "value", "q_proj", "k_proj", "v_proj", "q", "k", "v", "q_lin", "k_lin", "v_lin"}


def adapted_roles(model: Any) -> tuple[str, ...] | None:
    """Roles ("qkv", "o", "up", "down") of the LoRA-wrapped linears of the first transformer layer.

    ``None`` when the model has no numbered layer with LoRA linears (activation_bytes then assumes all).
    """
    roles: list[str] = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if "0" not in parts or not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
            continue
        base = module.base_layer
        if parts[-1] in QKV_NAMES:
            roles.append("qkv")
        elif getattr(base, "in_features", 0) > getattr(base, "out_features", 0):
            roles.append("down")
        elif getattr(base, "in_features", 0) < getattr(base, "out_features", 0):
            roles.append("up")
        else:
            roles.append("o")
    return tuple(roles) or None


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


def _output_embeddings(model: Any) -> Any:
    """The LM head (a per-token vocabulary projection), or None for models without one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    getter = getattr(base, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def _weight_bytes(model: Any, dtype_bytes: int, recipe: Recipe) -> tuple[int, list[str]]:
    """Weights at the load dtype; quantized linear weights at bitsandbytes' packed size."""
    import torch

    quant = recipe.quantization
    notes: list[str] = []
    total = 0
    quantized_ids: set[int] = set()
    if quant is not None:
        # bitsandbytes replaces the frozen nn.Linear layers, except the task heads and skip_modules
        # and the output embeddings (transformers keeps the LM head out of quantization)
        keep_out = set(TASKS[recipe.task_name].head_modules) | set(quant.skip_modules)
        lm_head = _output_embeddings(model)
        for name, module in model.named_modules():
            parts = set(name.split("."))
            frozen_linear = isinstance(module, torch.nn.Linear) and not module.weight.requires_grad
            if frozen_linear and not parts & keep_out and "lora_" not in name and module is not lm_head:
                quantized_ids.add(id(module.weight))
        notes.append(f"{len(quantized_ids)} linear weights counted at {quant.bits}-bit")
    for param in model.parameters():
        n = param.numel()
        if quant is not None and id(param) in quantized_ids:
            # 4-bit: half a byte plus one fp32 absmax per 64-block (8-bit absmax with double quant)
            per_param = (0.5 + (1 if quant.double_quant else 4) / 64) if quant.bits == 4 else 1.0
            total += int(n * per_param)
        elif param.requires_grad or quant is not None:
            # peft's prepare_model_for_kbit_training casts every 16-bit parameter left unquantized
            # (embeddings, norms, the LM head) to float32
            total += n * 4
        else:
            total += n * dtype_bytes
    if quant is not None and dtype_bytes < 4:
        notes.append("unquantized weights counted at fp32 (k-bit preparation upcasts them)")
    return total, notes


def transformer_shape(model_config: Any) -> tuple[int, int, int, int]:
    """(hidden size, intermediate size, layers, attention heads) under BERT/Llama or T5 config names."""
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
    return hidden, inter, layers, heads


def activation_bytes(
    model_config: Any,
    batch: int,
    seq_len: int,
    checkpointing: bool,
    adapter: dict[str, Any],
    *,
    adapted: tuple[str, ...] | None = None,
    full_finetuning: bool = False,
    fused_lora: bool = False,
) -> int:
    """Peak activation memory (fp32) of one training step of a BERT-style encoder, as process RSS on CPU.

    Three parts, each per token and transformer layer, from counting what autograd saves and what the
    forward pass allocates and frees (``saved_tensors_hooks`` and a dispatch log on MiniLM, see
    ``layer_activation_floats``):

    - **saved**: what autograd keeps for the backward pass (scores, q/k/v, layer-norm inputs, ...);
    - **temporaries**: tensors the forward allocates and frees within the layer (linear outputs, LoRA's
      ``B·A·x`` and its scaled copy, dropout outputs). glibc keeps the freed blocks resident (after the
      first step its mmap threshold rises to 32 MiB, so they come from the heap) and a tensor of the same
      size cannot reuse a hole (``posix_memalign`` asks for size + alignment), so about
      ``RETAINED_TEMPORARY_SHARE`` of them stay in RSS (measured: 0.59 for LoRA at 8 x 128 and 16 x 256,
      0.62-0.73 for full fine-tuning). Attention-score temporaries are not counted: at these sizes they
      are reused or, above 32 MiB, returned with ``munmap``;
    - **backward**: the backward pass reuses that freed memory; above it, the gradients flowing through
      one layer (2h + i per token) and, in full fine-tuning, the dense word-embedding gradient.

    With checkpointing only each layer's input is saved; the peak is the heap left by one layer's forward
    (its would-be saved tensors and temporaries, plus the retained share; attention-score tensors of
    32 MiB or more are unmapped when freed, so they leave nothing) with that layer recomputed on top
    of it in the backward pass.
    Checked against scripts/bench_memory.py on MiniLM (all five arms within 10% at 16 x 256, 8 x 128,
    32 x 128 and 4 x 512, the checkpointed arm within 13% of its noisier runs). The retained share and
    the mmap threshold describe glibc on CPU; a GPU's caching allocator is not modelled.
    ``adapted`` names the role of each LoRA-adapted linear of a layer ("qkv", "o", "up", "down");
    ``None`` means all six. ``full_finetuning``: every weight trains, no adapter. ``fused_lora``: the LoRA
    linears run on peftkit's fused path (``layer_activation_floats``).
    """
    hidden, inter, layers, heads = transformer_shape(model_config)
    vocab = int(getattr(model_config, "vocab_size", 0) or 0)
    method = str(adapter.get("method", "lora"))
    if full_finetuning or not (method in METHODS and METHODS[method].low_rank):
        adapted = ()
    elif adapted is None:
        adapted = ("qkv", "qkv", "qkv", "o", "up", "down")
    attention_dropout = _dropout(model_config, "attention_probs_dropout_prob", "attention_dropout") > 0
    saved, temporaries = layer_activation_floats(
        hidden,
        inter,
        heads,
        seq_len,
        attention_dropout=attention_dropout,
        hidden_dropout=_dropout(model_config, "hidden_dropout_prob", "dropout") > 0,
        adapted=adapted,
        rank=int(adapter.get("r", 8) or 8),
        lora_dropout=float(adapter.get("lora_dropout", 0) or 0) > 0,
        full_finetuning=full_finetuning,
        fused_lora=fused_lora,
    )
    tokens = batch * seq_len
    retained = RETAINED_TEMPORARY_SHARE * temporaries
    outside = 2 * hidden  # embeddings output and the head's input
    backward = 4 * tokens * (2 * hidden + inter) + (4 * vocab * hidden if full_finetuning else 0)
    if checkpointing:
        # the forward's freed attention scores stay in the heap only below glibc's mmap threshold
        scores = (3 if attention_dropout else 1) * heads * seq_len
        scores_unmapped = 4 * batch * heads * seq_len**2 >= GLIBC_MMAP_THRESHOLD_MAX
        one_layer_forward = saved - (scores if scores_unmapped else 0) + temporaries + retained
        per_token = hidden * layers + one_layer_forward + saved + outside
    else:
        per_token = layers * (saved + retained) + outside
    return int(4 * tokens * per_token) + backward


def layer_activation_floats(
    hidden: int,
    inter: int,
    heads: int,
    seq_len: int,
    *,
    attention_dropout: bool,
    hidden_dropout: bool,
    adapted: tuple[str, ...],
    rank: int,
    lora_dropout: bool,
    full_finetuning: bool,
    fused_lora: bool = False,
) -> tuple[int, int]:
    """Floats per token and layer that autograd saves, and that the forward frees (attention scores aside).

    Saved (counted with ``torch.autograd.graph.saved_tensors_hooks`` on MiniLM, unique storages,
    parameters excluded): CPU attention in training with dropout takes the math path and keeps the
    softmax output, the dropout mask (fp32: CPU dropout multiplies by a float noise tensor) and the
    dropped probabilities per head and key, plus copies of q (scaled), k and v; both layer norms keep their
    input and mean/rstd; GELU keeps its input; each hidden dropout keeps its fp32 mask. A linear keeps its
    input only when its weight trains: full fine-tuning keeps the inputs of q/k/v (one shared), the
    attention output, the FFN up and down projections; frozen weights keep none. A LoRA linear keeps its
    dropout's mask and dropped-out input copy (or just its input without dropout) and the rank-r ``A·x``.
    Without attention dropout one score-sized tensor is assumed (not measured). On the fused path
    (peftkit.fused_lora) a LoRA linear keeps its input (one shared by q/k/v, as in full fine-tuning),
    ``A·dropout(x)`` and its dropout mask as bits (1/32 of a float an element, rounded up to whole floats);
    the float mask (holding the dropped copy) and bernoulli_'s draw are temporaries, and its output is the
    base layer's.
    """
    role_inputs = {"qkv": hidden, "o": hidden, "up": hidden, "down": inter}
    attention_copies = 3 if attention_dropout else 1
    saved = attention_copies * heads * seq_len + 3 * hidden + 2 * (hidden + 2) + inter
    saved += 2 * hidden if hidden_dropout else 0
    saved_inputs = set(role_inputs) if full_finetuning else set()
    lora_temporaries = 0
    for role in adapted:
        saved += rank
        if fused_lora:
            # the output is the base layer's (one GEMM adds scaling · h·Bᵀ into it); the mask, into which
            # the dropped input is written, and the int32 draw bernoulli_ fills first are freed
            saved_inputs.add(role)
            if lora_dropout:
                saved += -(-role_inputs[role] // 32)  # the mask's bits
                lora_temporaries += 2 * role_inputs[role]
            continue
        lora_temporaries += 3 * (inter if role == "up" else hidden)  # B·A·x, its scaled copy, the sum
        if lora_dropout:
            saved += 2 * role_inputs[role]
        else:
            saved_inputs.add(role)
    saved += sum(role_inputs[r] for r in saved_inputs)
    # q·scale and k·scale inputs, the attention context, linear outputs not saved elsewhere (q, k, v,
    # attention output, FFN down), the unsaved linear inputs, the hidden dropouts' outputs
    temporaries = 3 * hidden + 5 * hidden + sum(v for r, v in role_inputs.items() if r not in saved_inputs)
    temporaries += 2 * hidden if hidden_dropout else 0
    return saved, temporaries + lora_temporaries


def activation_dtype_bytes(recipe: Recipe) -> tuple[int, int]:
    """Bytes per activation element on a GPU, for the frozen model's path and for the LoRA branches.

    Under ``train.bf16``/``fp16`` the Trainer runs the forward in autocast: everything is 2 bytes. Without
    it, 16-bit weights (``model.dtype`` or a 16-bit quantization compute dtype) give 2-byte activations,
    but peft casts a LoRA branch's input to the adapter's fp32 weights, so that branch saves 4 bytes.
    """
    autocast = bool(recipe.train.get("bf16") or recipe.train.get("fp16"))
    quant = recipe.quantization
    half = recipe.model.dtype in ("bfloat16", "float16") or (
        quant is not None and quant.compute_dtype in ("bfloat16", "float16")
    )
    return (2 if autocast or half else 4), (2 if autocast else 4)


def attention_kernel(model_config: Any) -> str:
    """The SDPA kernel a CUDA training step takes: "math" for eager attention, else flash/memory-efficient.

    With bf16/fp16 and no mask SDPA picks flash; with a padding mask, memory-efficient. Neither saves the
    score matrix (both keep q, k, v, the output and a per-row logsumexp), so they are counted alike.
    """
    implementation = getattr(model_config, "_attn_implementation", None) or "sdpa"
    return "math" if implementation == "eager" else "flash/memory-efficient"


def _is_decoder_layer(model_config: Any) -> bool:
    """Llama-style layers (RMSNorm, gated SiLU MLP, rotary, grouped KV heads) vs BERT-style ones."""
    return hasattr(model_config, "num_key_value_heads") or "silu" in str(
        getattr(model_config, "hidden_act", "")
    )


def cuda_layer_saved_bytes(
    hidden: int,
    inter: int,
    heads: int,
    kv_heads: int,
    seq_len: int,
    *,
    decoder: bool,
    kernel: str,
    act_bytes: int,
    lora_act_bytes: int,
    adapted: tuple[str, ...],
    rank: int,
    lora_dropout: bool,
    attention_dropout: bool = False,
    hidden_dropout: bool = False,
    fused_lora: bool = False,
) -> int:
    """Bytes per token that autograd saves in one transformer layer on CUDA (parameters excluded).

    Counted with ``torch.autograd.graph.saved_tensors_hooks`` on a Llama layer in bf16 autocast on CPU
    with SDPA forced to its flash kernel (``torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)``,
    the kernel CUDA takes; see tests/unit/test_plan_cuda.py), dropout masks counted at one byte (CUDA's
    dropout keeps a bool mask; CPU's a float one):

    - each RMSNorm keeps its fp32 input copy and the per-row rstd (4h + 4);
    - flash/memory-efficient attention keeps q, k, v (k and v at the KV heads' width), the output and an
      fp32 logsumexp per head; the math kernel keeps the softmax output per head and key instead of the
      logsumexp (plus the dropout mask and dropped copy when attention dropout is on);
    - the gated MLP keeps the gate output (SiLU's input), SiLU's output and the up projection's output;
    - a frozen linear keeps nothing (its weight is a parameter); a LoRA linear keeps its own cast copy of
      the input (each of q/k/v casts separately), the rank-r ``A·x`` and, with dropout, the bool mask.

    BERT-style layers (``decoder=False``) use the same terms with LayerNorm (fp32 input, mean and rstd),
    GELU's input and the 1-byte masks of the two hidden dropouts; that variant is assembled from the same
    rules, not counted separately. On the fused path (``fused_lora``, peftkit.fused_lora) a LoRA linear
    keeps the layer's input itself (one tensor for q/k/v; o's input is the attention output the
    flash/memory-efficient kernels save anyway), ``A·x`` and, with dropout, the mask as bits (one byte per
    8 elements); no cast copy.
    """
    a = act_bytes
    head_dim = hidden // max(heads, 1)
    kv_width = (kv_heads or heads) * head_dim
    role_inputs = {"qkv": hidden, "o": hidden, "up": hidden, "down": inter}
    saved = 2 * (4 * hidden + (4 if decoder else 8))  # two norms
    if kernel == "math":
        scores = heads * seq_len
        saved += a * (hidden + 2 * kv_width) + a * scores
        saved += (1 + a) * scores if attention_dropout else 0
    else:
        saved += a * (2 * hidden + 2 * kv_width) + 4 * heads
    saved += 3 * a * inter if decoder else a * inter  # SiLU in/out and up's output; GELU's input
    saved += 2 * hidden if hidden_dropout and not decoder else 0  # bool masks
    for role in adapted:
        if fused_lora:
            saved += lora_act_bytes * rank + (role_inputs[role] // 8 if lora_dropout else 0)  # mask bits
        else:
            saved += lora_act_bytes * (role_inputs[role] + rank) + (role_inputs[role] if lora_dropout else 0)
    if fused_lora:
        # the flash/memory-efficient kernels save their output, which is o's input: counted above
        inputs = set(adapted) - ({"o"} if kernel != "math" else set())
        saved += a * sum(role_inputs[role] for role in inputs)
    return saved


def cuda_activation_bytes(
    model_config: Any,
    batch: int,
    seq_len: int,
    checkpointing: bool,
    adapter: dict[str, Any],
    *,
    adapted: tuple[str, ...] | None = None,
    act_bytes: int = 2,
    lora_act_bytes: int = 2,
    kernel: str = "flash/memory-efficient",
    vocab_logits: bool = False,
    residual_bytes: int | None = None,
    fused_lora: bool = False,
) -> int:
    """Peak activation bytes of one training step on CUDA, as ``torch.cuda.max_memory_allocated`` sees it.

    The caching allocator hands freed blocks straight back to the next tensor, so nothing of the forward's
    freed temporaries is kept (no glibc retention share, unlike ``activation_bytes``). Peak = what the layers
    save (each layer's input only under checkpointing, plus one layer recomputed) + the LM head's logits
    when the model predicts every token (the 16-bit logits, the loss's fp32 copy and its fp32 log-softmax:
    ``(a + 8) · vocab`` per token) + the gradients flowing through one layer in the backward (a · (2h + 2i)).
    ``residual_bytes``: bytes per element of the hidden states between layers (what checkpointing keeps);
    4 for a k-bit base, whose embeddings peft upcasts to fp32; default ``act_bytes``.
    Not yet checked against a GPU: ``CUDA_CALIBRATION``.
    """
    hidden, inter, layers, heads = transformer_shape(model_config)
    kv_heads = int(getattr(model_config, "num_key_value_heads", 0) or heads)
    vocab = int(getattr(model_config, "vocab_size", 0) or 0)
    method = str(adapter.get("method", "lora"))
    if not (method in METHODS and METHODS[method].low_rank):
        adapted = ()
    elif adapted is None:
        adapted = ("qkv", "qkv", "qkv", "o", "up", "down")
    decoder = _is_decoder_layer(model_config)
    saved = cuda_layer_saved_bytes(
        hidden,
        inter,
        heads,
        kv_heads,
        seq_len,
        decoder=decoder,
        kernel=kernel,
        act_bytes=act_bytes,
        lora_act_bytes=lora_act_bytes,
        adapted=adapted,
        rank=int(adapter.get("r", 8) or 8),
        lora_dropout=float(adapter.get("lora_dropout", 0) or 0) > 0,
        attention_dropout=_dropout(model_config, "attention_probs_dropout_prob", "attention_dropout") > 0,
        hidden_dropout=_dropout(model_config, "hidden_dropout_prob", "dropout") > 0,
        fused_lora=fused_lora,
    )
    tokens = batch * seq_len
    residual = residual_bytes or act_bytes
    stored = (residual * hidden * layers + saved) if checkpointing else layers * saved
    head = (act_bytes + 8) * vocab if vocab_logits else 0
    backward = act_bytes * (2 * hidden + 2 * inter)
    return int(tokens * (stored + residual * hidden + head + backward))


def _dropout(model_config: Any, *names: str) -> float:
    for name in names:
        value = getattr(model_config, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.1


def zero_stage_bytes(plan: MemoryPlan, devices: int) -> dict[str, int]:
    """Training memory per device under DDP and each ZeRO stage, spread over ``devices`` devices.

    ZeRO-1 shards the optimizer state, ZeRO-2 also the gradients, ZeRO-3 also the weights; activations are
    never sharded. Communication buffers and CPU offload are left out.
    """
    n = max(devices, 1)
    weights, grads, optim = plan.weight_bytes, plan.grad_bytes, plan.optimizer_bytes
    return {
        "ddp": weights + grads + optim + plan.activation_bytes,
        "zero1": weights + grads + optim // n + plan.activation_bytes,
        "zero2": weights + (grads + optim) // n + plan.activation_bytes,
        "zero3": (weights + grads + optim) // n + plan.activation_bytes,
    }


def recommend_zero_stage(plan: MemoryPlan, devices: int, device_bytes: int | None) -> str:
    """The least-sharded setup that fits one device (it communicates least), or what to do when none does."""
    per_stage = zero_stage_bytes(plan, devices)
    if device_bytes is None:
        return (
            "device memory unknown (no CUDA device): pick the first of ddp, zero2, zero3 whose per-device "
            "bytes fit your GPU with ~10% to spare; zero3_offload when none does"
        )
    for stage in ("ddp", "zero2", "zero3"):  # with adapters the optimizer state is small: zero1 saves little
        if per_stage[stage] <= 0.9 * device_bytes:
            return f"{stage} fits {devices} device(s) of {format_bytes(device_bytes)}"
    return (
        f"even zero3 needs {format_bytes(per_stage['zero3'])} per device of {format_bytes(device_bytes)}: "
        "use zero3_offload, more devices, gradient checkpointing or a smaller batch"
    )


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


# training examples tokenized to measure the longest feature (the first ones of the split)
LENGTH_SAMPLE = 5000


def _planned_length(
    recipe: Recipe, task: Any, ctx: Any, raw: Any, seq_len: int | None, model_config: Any
) -> tuple[int, str]:
    """The padded length of the largest training batch, and a line saying where it came from.

    Every task's collator pads a batch to its longest feature (dynamic padding), so the peak batch is as
    long as the longest training feature, not ``max_length``: QA planned at ``max_length`` was 1.9x over.
    An encoder-decoder's feature holds only the source (the target is its labels), so it is planned at
    :func:`training_length`'s layer-weighted mean of the two limits instead.
    """
    max_length = training_length(recipe.task, model_config)
    seq2seq = getattr(recipe.task, "max_source_length", None) is not None
    limit_name = "max_source_length + max_target_length" if seq2seq else "max_length"
    if seq_len:
        return seq_len, f"{seq_len} tokens a sequence (--seq-len)"
    if getattr(model_config, "is_encoder_decoder", False):
        return max_length, (
            f"{max_length} tokens: the layer-weighted mean of max_source_length and max_target_length "
            "(encoder and decoder lengths)"
        )
    if "train" not in raw:
        return max_length, f"every batch padded to max_length {max_length} (no training split to measure)"
    split = raw["train"]
    count = min(len(split), LENGTH_SAMPLE)
    longest = 0
    for first in range(0, count, 500):
        rows = split.select(range(first, min(first + 500, count)))
        features = task.preprocess(rows.to_dict(), ctx, True)
        longest = max([longest, *(len(ids) for ids in features.get("input_ids", []))])
    if not longest:
        return max_length, f"every batch padded to max_length {max_length} (no input_ids to measure)"
    of = f"the first {count:,} of {len(split):,}" if count < len(split) else f"all {count:,}"
    return longest, (
        f"batches padded to their longest feature: the longest of {of} training examples, tokenized, is "
        f"{longest} tokens ({limit_name} {max_length})"
    )


def process_rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; elsewhere its peak so far)."""
    import os
    import resource

    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) * (1 if os.uname().sysname == "Darwin" else 1024)
