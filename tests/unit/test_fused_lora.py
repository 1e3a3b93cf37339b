"""peftkit.fused_lora: the autograd function's gradients (gradcheck, float64), its equality with peft's
``lora.Linear`` (same mask, same output, same gradients) and what it saves for the backward pass."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from peftkit import fused_lora
from peftkit.fused_lora import FusedLoraLinear


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(p: float) -> None:
    """Analytic gradients of x, A and B equal finite differences; the mask is drawn from a reseeded
    generator on every call, so each forward of gradcheck drops the same elements."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 6, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)
    lora_a = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Any:
        torch.manual_seed(1)
        return FusedLoraLinear.apply(x, weight, bias, a, b, 1.5, p, True)

    assert torch.autograd.gradcheck(f, (x, lora_a, lora_b), eps=1e-6, atol=1e-7)


def _peft_layer(r: int = 4, dropout: float = 0.1, **config: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24))
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=8, lora_dropout=dropout, target_modules=["0"], **config)
    )
    layer = peft_model.base_model.model[0]
    nn.init.normal_(layer.lora_B["default"].weight)  # peft starts B at zero; the test needs a real B
    return peft_model, layer


def _step(layer: Any, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Output, gradients and the bytes autograd saved for one forward and backward of ``layer``."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.pow(2).sum().backward()
    grads = {"x": x.grad, "A": layer.lora_A["default"].weight.grad, "B": layer.lora_B["default"].weight.grad}
    params = {id(p) for p in layer.parameters()}
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved if id(t) not in params
    }
    storages.pop(x.untyped_storage().data_ptr(), None)  # the input: held by the caller either way
    return out.detach(), grads, sum(storages.values())


@pytest.mark.parametrize("rslora", [False, True])
def test_same_output_and_gradients_as_peft_and_fewer_saved_bytes(rslora: bool) -> None:
    """One layer, dropout 0.1, the same seed: peft's forward and the fused one give the same output (the
    same mask drawn at the same point), the same gradients, and the fused one saves only ``h = A·x`` and the
    mask's bits besides the input, where peft saves the fp32 mask and the dropped input."""
    _, layer = _peft_layer(use_rslora=rslora)
    layer.train()
    x = torch.randn(3, 7, 16)
    ref_out, ref_grads, ref_saved = _step(layer, x, seed=5)
    layer.zero_grad()
    report = fused_lora.install(layer)
    assert report.fused == 1 and not report.kept
    out, grads, fused_saved = _step(layer, x, seed=5)
    assert torch.equal(out, ref_out)
    for name, ref in ref_grads.items():
        # the backward's rank-r products run in another GEMM layout than peft's: rounding apart, equal
        assert (grads[name] - ref).abs().max() <= 1e-6 * ref.abs().max(), name
    assert ref_saved >= 2 * x.numel() * 4  # mask + dropped input
    assert fused_saved == 3 * 7 * 4 * 4 + 3 * 7 * 16 // 8  # h: tokens × r floats; the mask: a bit an element
    # evaluation (no grad) and uninstall go back to peft's forward
    with torch.no_grad():
        layer.eval()
        assert torch.equal(
            layer(x),
            layer.base_layer(x)
            + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"],
        )
    assert fused_lora.uninstall(layer) == 1 and "forward" not in vars(layer)


def test_dora_keeps_peft_layers_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    peft_model, _ = _peft_layer(use_dora=True)
    with caplog.at_level("INFO", logger="peftkit.fused_lora"):
        report = fused_lora.install(peft_model)
    assert report.fused == 0 and sum(report.kept.values()) == 1
    assert "peft's own layers for 1 with the Dora variant" in caplog.text
