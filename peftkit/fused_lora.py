"""A LoRA training path that saves no dropout copies: one autograd function per adapted ``nn.Linear``.

peft's ``lora.Linear.forward`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as separate ops, so
autograd keeps, for every adapted layer, the dropout mask (fp32 on CPU) and the dropped copy of the input
``x``; q, k and v read the same hidden states, so the input is copied three times. :class:`FusedLoraLinear`
computes the same forward with the same ops, drawing the mask from the same generator at the same point
(after the base layer, as peft does), and saves only the input ``x`` (the tensor the caller already holds,
shared by every layer that reads it), the mask as bits (one bit an element, 1/32 of peft's fp32 mask), and
``h = A·dropout(x)`` (``r`` values per token). The backward unpacks the mask and computes the gradients of A,
B and x from it. Drawing the mask again from a saved generator state would save those bits, but on CPU
``bernoulli_`` draws serially (8-20 ns an element, measured in docs/memory.md), about 5 times what packing
and unpacking cost, so the bits are kept. A training run is the same run as with peft's layers
(tests/integration/test_fused_lora.py; docs/memory.md).

:func:`install` swaps the ``forward`` of each eligible ``lora.Linear`` of a peft model (plain LoRA, rsLoRA;
LoRA+ only changes the optimizer); anything else keeps peft's layer and is named in the log: DoRA and the
other variants, LoRA on a 4/8-bit or non-``nn.Linear`` base, a trainable base weight or bias, ``lora_bias``,
and every layer under DeepSpeed ZeRO-3 (its weights are gathered by hooks on the child modules, which this
path does not call). The adapter's parameters and modules are peft's own, so what is saved, merged and
exported is unchanged. ``[train] fused_lora = false`` keeps peft's layers everywhere.
"""

from __future__ import annotations

import logging
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

_ATTRIBUTE = "_peftkit_fused_lora"


def _scaled_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout mask ``F.dropout(like, p, True)`` multiplies by: 0 or 1/(1-p), drawn from the default
    generator exactly as ``F.dropout`` draws it. On CPU ``at::dropout`` draws ``bernoulli_(1 - p)`` into a
    tensor like the input and divides it by ``1 - p`` (aten/src/ATen/native/Dropout.cpp); elsewhere the fused
    kernel draws it, and dropping a tensor of ones gives the same mask."""
    if like.device.type == "cpu":
        return torch.empty_like(like, memory_format=torch.contiguous_format).bernoulli_(1 - p).div_(1 - p)
    return F.dropout(torch.ones_like(like), p, True)


# 8 bools (one byte each, 0/1) → one byte: the little-endian int64 of the 8 bytes times this constant has them
# in its top byte, the first bool in the highest bit (the wrap-around of the product is intended)
_PACK = 0x8040201008040201 - (1 << 64)


def _pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask's kept positions as bits, 8 to a byte (uint8, numel/8 rounded up)."""
    bits = mask.reshape(-1).ne(0)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    words = bits.view(torch.uint8).view(torch.int64)
    return (words * _PACK).bitwise_right_shift_(56).bitwise_and_(0xFF).to(torch.uint8)


def _unpack_mask(packed: torch.Tensor, like: torch.Tensor, p: float) -> torch.Tensor:
    """The scaled mask ``_scaled_mask`` drew (0 or 1/(1-p), bit for bit), shaped and typed like ``like``:
    each byte looks up its 8 values in a 256-row table (one pass; 3 times faster than shifting on CPU)."""
    keep = torch.ones((), dtype=like.dtype, device=like.device).div_(1 - p)  # the value at::dropout scales by
    byte = torch.arange(256, device=packed.device).unsqueeze(1)
    table = byte.bitwise_right_shift(torch.arange(7, -1, -1, device=packed.device)).bitwise_and_(1)
    values = F.embedding(packed.long(), table.to(like.dtype).mul_(keep))
    return values.view(-1)[: like.numel()].view(like.shape)


class FusedLoraLinear(torch.autograd.Function):
    """``base(x) + scaling · B(A(dropout(x)))``, peft's LoRA linear, saving ``x``, the mask's bits and
    ``h = A·dropout(x)`` instead of the fp32 mask and the dropped input."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        p: float,
        cast: bool,
    ) -> torch.Tensor:
        device = x.device.type
        enabled = torch.is_autocast_enabled(device)
        ctx.autocast = (enabled, torch.get_autocast_dtype(device), device)
        # the order of peft's lora.Linear.forward: the base layer, then the cast and the dropout draw
        base = F.linear(x, weight, bias)
        xl = x.to(lora_a.dtype) if cast and x.dtype != lora_a.dtype else x
        bits = None
        if p > 0:
            mask = _scaled_mask(xl, p)
            bits = _pack_mask(mask)  # 1 bit an element: cheaper to keep than to draw again on CPU
            xd = mask.mul_(xl)  # mask · x in the mask's buffer: x · mask, bit for bit
            del mask
        else:
            xd = xl
        h = F.linear(xd, lora_a)
        del xd
        # one GEMM for base + scaling · h·Bᵀ where the dtypes allow (peft: three more ops over the output)
        fused = base.dtype == h.dtype and (enabled or lora_b.dtype == h.dtype) and base.is_contiguous()
        if fused:
            b_t = lora_b.t().to(h.dtype)  # under autocast: the cast F.linear would make
            out = base.view(-1, base.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b_t, alpha=scaling)
            out = out.view(base.shape)
            lora_dtype = total_dtype = base.dtype
        else:
            lora = F.linear(h, lora_b) * scaling
            total = base + lora
            out = total.to(base.dtype)
            lora_dtype, total_dtype = lora.dtype, total.dtype
        ctx.save_for_backward(x, weight, lora_a, lora_b, h, bits)
        ctx.p, ctx.scaling = p, scaling
        ctx.dtypes = (base.dtype, xl.dtype, lora_dtype, total_dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, lora_b, h, bits = ctx.saved_tensors
        base_dtype, xl_dtype, lora_dtype, total_dtype = ctx.dtypes
        enabled, dtype, device = ctx.autocast
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        one_dtype = not enabled and len({base_dtype, xl_dtype, lora_dtype, x.dtype, h.dtype}) == 1
        with torch.autocast(device_type=device, dtype=dtype, enabled=enabled):
            g = grad.reshape(-1, grad.shape[-1]).to(total_dtype)
            h2 = h.reshape(-1, h.shape[-1])
            # the rank-r products are computed transposed, (hᵀ·g)ᵀ and (Bᵀ·gᵀ)ᵀ: MKL's skinny GEMMs are
            # 2-9 times faster in that layout on CPU (the benchmark: docs/memory.md)
            if one_dtype:  # scaling applied to the small rank-r products, not to the whole gradient
                grad_b = h2.t().mm(g).mul_(ctx.scaling).t() if need_b else None
                gh = lora_b.t().mm(g.t()).mul_(ctx.scaling).t() if need_x or need_a else None
            else:
                t = g.to(lora_dtype) * ctx.scaling  # the gradient of B(A(dropout(x)))
                grad_b = h2.t().mm(t).t() if need_b else None
                gh = lora_b.t().mm(t.t()).t() if need_x or need_a else None  # autocast casts as forward's
            grad_x = grad_a = None
            if gh is not None:
                xl = x.reshape(-1, x.shape[-1]).to(xl_dtype)
                mask = _unpack_mask(bits, xl, ctx.p) if bits is not None else None
                if need_x:
                    gxl = gh.mm(lora_a)  # the gradient of dropout(x), then of x through the mask
                    if mask is not None:
                        gxl.mul_(mask)
                    if one_dtype:
                        grad_x = gxl.addmm_(g, weight)  # + g·W, the frozen base layer's part
                    else:
                        grad_x = g.to(base_dtype).mm(weight) + gxl.to(base_dtype)
                    grad_x = grad_x.view(x.shape).to(x.dtype)
                if need_a:
                    xd = mask.mul_(xl) if mask is not None else xl
                    grad_a = gh.t().mm(xd)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """A ``lora.Linear.forward`` that takes :class:`FusedLoraLinear` when it trains one plain adapter and
    peft's own forward otherwise (evaluation, disabled or merged adapters, mixed batches, extra arguments)."""
    original = types.MethodType(type(self).forward, self)
    if args or kwargs or not torch.is_grad_enabled() or self.disable_adapters or self.merged:
        return original(x, *args, **kwargs)
    active = self.active_adapters
    if len(active) != 1 or active[0] not in self.lora_A or active[0] in self.lora_variant:
        return original(x, *args, **kwargs)
    name = active[0]
    base = self.base_layer
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return original(x, *args, **kwargs)
    if self.lora_B[name].bias is not None or not (lora_a.requires_grad or lora_b.requires_grad):
        return original(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    cast = bool(getattr(self, "cast_input_dtype_enabled", True))
    return FusedLoraLinear.apply(x, base.weight, base.bias, lora_a, lora_b, self.scaling[name], p, cast)


@dataclass
class FusedReport:
    """What :func:`install` did: the layers on the fused path and why the others kept peft's."""

    fused: int = 0
    kept: Counter[str] = field(default_factory=Counter)

    def message(self) -> str:
        total = self.fused + sum(self.kept.values())
        text = f"fused LoRA path (train.fused_lora) on {self.fused} of {total} LoRA layers"
        if self.kept:
            reasons = "; ".join(f"{n} {why}" for why, n in sorted(self.kept.items()))
            text += f"; peft's own layers for {reasons}"
        return text


def _why_not(module: Any, zero3: bool) -> str | None:
    """Why this LoRA layer keeps peft's forward (None: it can take the fused path)."""
    from peft.tuners.lora.layer import Linear

    if type(module) is not Linear:
        kind = type(module).__module__.rsplit(".", 1)[-1]
        return f"{type(module).__name__} ({'4/8-bit base' if kind == 'bnb' else 'not an nn.Linear base'})"
    if zero3:
        return "under DeepSpeed ZeRO-3 (its hooks gather the weights of the child modules)"
    base = module.get_base_layer()
    if type(base) is not nn.Linear:
        return f"with a {type(base).__name__} base layer"
    if module.fan_in_fan_out:
        return "with fan_in_fan_out"
    if any(module.lora_variant.values()):
        names = sorted({type(v).__name__.replace("LinearVariant", "") for v in module.lora_variant.values()})
        return f"with the {'/'.join(names)} variant"
    if any(module.lora_bias.values()):
        return "with lora_bias"
    return None


def install(model: nn.Module) -> FusedReport:
    """Put every eligible LoRA linear of ``model`` on the fused path; log and return what it did."""
    from peft.tuners.lora.layer import LoraLayer

    try:
        from transformers.integrations import is_deepspeed_zero3_enabled

        zero3 = bool(is_deepspeed_zero3_enabled())
    except ImportError:  # pragma: no cover - transformers without its DeepSpeed integration module
        zero3 = False
    report = FusedReport()
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not isinstance(module, nn.Module):
            continue
        why = _why_not(module, zero3)
        if why is not None:
            report.kept[why] += 1
            continue
        if not hasattr(module, _ATTRIBUTE):
            setattr(module, _ATTRIBUTE, True)
            module.forward = types.MethodType(_fused_forward, module)
        report.fused += 1
    if report.fused or report.kept:
        logger.info(report.message())
    return report


def uninstall(model: nn.Module) -> int:
    """Give every fused LoRA linear of ``model`` back peft's forward; returns how many."""
    count = 0
    for module in model.modules():
        if hasattr(module, _ATTRIBUTE):
            delattr(module, _ATTRIBUTE)
            del module.forward  # the class's (peft's) forward again
            count += 1
    return count
