"""peftkit against the plain transformers + peft script, and against the machine's matmul limit.

One process sequence, same seed, data and hyper-parameters (the recipe's); every arm runs in a fresh
subprocess with the same thread count:

- peftkit:            `peftkit.finetune(recipe)` as a user runs it (length-grouped batches, dynamic padding);
- baseline_max_length: scripts/baseline_finetune.py, the course's way (padding="max_length", random batches);
- baseline_dynamic:   the same with DataCollatorWithPadding (each random batch padded to its longest);
- lora_steps / fused_lora_steps / full_steps: a fixed number of steps of LoRA with peft's layers, of LoRA
  on peftkit's fused path (peftkit.fused_lora: the same run, fewer saved activations) and of full
  fine-tuning on the same batches (the baseline script, dynamic padding), for step time, memory and FLOPs
  side by side.

Per arm: samples/s, real (non-pad) and padded tokens/s, padding fraction (per training batch, as the model
saw it), step time p50/p90 (the first 2 steps and steps whose interval holds an evaluation or a checkpoint
left out), peak RSS, test metric, HF's total_flos and the useful FLOP/s as a fraction of a measured
matmul ceiling (MFU). FLOP accounting, exactly as autograd runs it (found by hooking every nn.Linear once):
each GEMM weight applied per token costs 2 FLOPs per weight forward, +2 when its input needs a gradient,
+2 when the weight itself trains (so 4 for frozen and 6 for trained weights, the textbook 4·frozen +
6·trainable, except layer 0's frozen Q/K/V under LoRA, whose input needs no gradient: 2). Embedding lookups,
LayerNorm, biases, activations and the optimizer count nothing; pooler and classifier count per sequence;
attention adds 3 × 4·layers·hidden·s² per sequence of real length s. "Useful" uses real tokens only.

    .venv/bin/python scripts/bench_train.py                 # the comparison in docs/BENCHMARKS.md
    .venv/bin/python scripts/bench_train.py --max-train-samples 256 --threads 1   # a quick look
    .venv/bin/python scripts/bench_train.py --recipe token_cls   # peftkit alone (baseline: seq_cls only)

Default: the whole training split for ONE epoch (the recipe says 2; --epochs 2 runs them): the max_length
baseline took 5.9 s a step with 1 thread on the shared 2-core machine (121 steps an epoch), and the
recipe's best checkpoint is epoch 1's. Whole-run time: see docs/BENCHMARKS.md.

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "seq_cls": REPO / "recipes" / "seq_cls_lora.toml",
    "token_cls": REPO / "recipes" / "token_cls_lora.toml",
    "qa": REPO / "recipes" / "qa_lora.toml",
}
BASELINE_ARMS = ("baseline_max_length", "baseline_dynamic", "lora_steps", "fused_lora_steps", "full_steps")
PROBE_ARMS = ("lora_steps", "fused_lora_steps", "full_steps")
WARMUP_STEPS = 2


# ------------------------------------------------------------------------------------------------
# Measuring inside an arm


def step_recorder(device: str = "cpu") -> Any:
    """A TrainerCallback that times steps and records every training batch the model sees.

    Batches are read by a forward pre-hook on the model (training mode only), so padding is counted as
    the model computed it, whatever sampler and collator built the batch. The first training forward
    also hooks every nn.Linear once to learn each GEMM's shape and which gradients autograd computes.
    """
    import torch
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.step_ends: list[float] = []
            self.forwards_at_step: list[int] = []
            self.skip: set[int] = set()  # steps whose interval holds an evaluation or a checkpoint
            self.batches: list[tuple[int, int, int, int]] = []  # (rows, width, real tokens, Σ s²)
            self.gemms: list[dict[str, Any]] | None = None
            self.layers = self.hidden = 0
            self._busy = False

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            config = model.config
            self.layers, self.hidden = config.num_hidden_layers, config.hidden_size
            model.register_forward_pre_hook(self._record_batch, with_kwargs=True)

        def _record_batch(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            if not module.training or not torch.is_grad_enabled():
                return
            ids = kwargs.get("input_ids")
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(ids)
            lengths = mask.sum(dim=-1).tolist()
            rows, width = mask.shape
            self.batches.append((rows, width, sum(lengths), sum(s * s for s in lengths)))
            if self.gemms is None:
                self._probe_gemms(module, rows, width)

        def _probe_gemms(self, model: Any, rows: int, width: int) -> None:
            found: list[dict[str, Any]] = []

            def gemm(x: Any, mod: Any, input_grad: bool) -> None:
                vectors = x.numel() // mod.in_features
                found.append(
                    {
                        "in": mod.in_features,
                        "out": mod.out_features,
                        # per token (rows × width vectors) or per sequence (pooler, classifier)
                        "per": "sequence" if vectors == rows else "token",
                        "scale": 1.0 if vectors == rows else vectors / (rows * width),
                        "input_grad": input_grad,
                        "trained": bool(mod.weight.requires_grad),
                    }
                )

            def on_linear(mod: Any, inputs: Any, output: Any) -> None:
                gemm(inputs[0], mod, bool(inputs[0].requires_grad))

            def on_fused_lora(mod: Any, inputs: Any, output: Any) -> None:
                # peftkit.fused_lora runs the base, A and B GEMMs inside one autograd function, so their
                # nn.Linear hooks do not fire: count the same three GEMMs here
                x = inputs[0]
                name = mod.active_adapters[0]
                gemm(x, mod.base_layer, bool(x.requires_grad))
                gemm(x, mod.lora_A[name], bool(x.requires_grad))
                gemm(x[..., : mod.lora_A[name].out_features], mod.lora_B[name], True)

            handles = [
                m.register_forward_hook(on_linear) for m in model.modules() if type(m) is torch.nn.Linear
            ]
            handles += [
                m.register_forward_hook(on_fused_lora)
                for m in model.modules()
                if getattr(m, "_peftkit_fused_lora", False)
            ]

            def done(*_: Any) -> None:
                for h in handles:
                    h.remove()
                final.remove()

            final = model.register_forward_hook(done)
            self.gemms = found

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            self.step_ends.append(time.perf_counter())
            self.forwards_at_step.append(len(self.batches))
            if self._busy:
                self.skip.add(len(self.step_ends) - 1)
                self._busy = False

        def on_evaluate(self, *a: Any, **kw: Any) -> None:
            self._busy = True

        def on_save(self, *a: Any, **kw: Any) -> None:
            self._busy = True

        def summary(self) -> dict[str, Any]:
            return summarize_steps(self)

    return StepRecorder()


def gemm_flops(gemms: Sequence[dict[str, Any]]) -> dict[str, float]:
    """FLOPs per real token and per sequence of one training step (forward + backward), and the
    weights counted, split into frozen and trained."""
    per_token = per_sequence = frozen = trained = 0.0
    for g in gemms:
        macs = g["in"] * g["out"]
        flops = 2 * macs * (1 + g["input_grad"] + g["trained"])
        if g["per"] == "token":
            per_token += flops * g["scale"]
            frozen += 0 if g["trained"] else macs
            trained += macs if g["trained"] else 0
        else:
            per_sequence += flops
    return {
        "flops_per_token": per_token,
        "flops_per_sequence": per_sequence,
        "per_token_frozen_weights": frozen,
        "per_token_trained_weights": trained,
    }


def summarize_steps(rec: Any) -> dict[str, Any]:
    """Throughput over the counted steps; padding over every training batch."""
    flops = gemm_flops(rec.gemms or [])
    attention = 3 * 4 * rec.layers * rec.hidden  # × Σ s² (useful) or × rows·width² (executed)
    intervals, samples, real, padded, useful, executed = [], 0, 0, 0, 0.0, 0.0
    for i in range(WARMUP_STEPS, len(rec.step_ends)):
        if i in rec.skip:
            continue
        intervals.append(rec.step_ends[i] - rec.step_ends[i - 1])
        for rows, width, tokens, squares in rec.batches[
            rec.forwards_at_step[i - 1] : rec.forwards_at_step[i]
        ]:
            samples += rows
            real += tokens
            padded += rows * width
            useful += (
                tokens * flops["flops_per_token"] + rows * flops["flops_per_sequence"] + attention * squares
            )
            executed += (
                rows * width * flops["flops_per_token"]
                + rows * flops["flops_per_sequence"]
                + attention * rows * width**2
            )
    pad_per_batch = sorted(1 - tokens / (rows * width) for rows, width, tokens, _ in rec.batches)
    all_real = sum(b[2] for b in rec.batches)
    all_padded = sum(b[0] * b[1] for b in rec.batches)
    seconds = sum(intervals)
    out: dict[str, Any] = {
        "steps": len(rec.step_ends),
        "counted_steps": len(intervals),
        "counted_seconds": seconds,
        "step_p50": percentile(intervals, 50),
        "step_p90": percentile(intervals, 90),
        "step_mean": statistics.fmean(intervals) if intervals else None,
        "samples_per_s": samples / seconds if seconds else None,
        "real_tokens_per_s": real / seconds if seconds else None,
        "padded_tokens_per_s": padded / seconds if seconds else None,
        "useful_flops_per_s": useful / seconds if seconds else None,
        "executed_flops_per_step": executed / len(intervals) if intervals else None,
        "executed_flops_per_s": executed / seconds if seconds else None,
        "padding_fraction": 1 - all_real / all_padded if all_padded else None,
        "batch_padding_p50": percentile(pad_per_batch, 50),
        "batch_padding_p90": percentile(pad_per_batch, 90),
        "batch_padding_max": pad_per_batch[-1] if pad_per_batch else None,
        "train_real_tokens": all_real,
        "train_padded_tokens": all_padded,
        **flops,
        "attention_flops_per_s2": attention,
    }
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def peak_memory(device: str) -> dict[str, float]:
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        import torch

        out["gpu_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return out


def run_peftkit_arm(args: argparse.Namespace) -> dict[str, Any]:
    """`finetune(recipe)` as a user runs it, with the recorder as an extra TrainerCallback."""
    from peftkit.recipe import load_recipe
    from peftkit.training import finetune

    recipe = load_recipe(RECIPES.get(args.recipe, args.recipe), peftkit_overrides(args))
    recorder = step_recorder(args.device)
    if args.mega_batch_mult:  # trying a batching change before proposing it (see docs/BENCHMARKS.md)
        import peftkit.batching as batching

        batching.length_grouped_batches.__defaults__ = (args.mega_batch_mult, None)
    result = finetune(recipe, overwrite=True, callbacks=[recorder])
    metrics = result.metrics
    return {
        "train": metrics["train"],
        "test": metrics.get("test", {}),
        "trainable_params": metrics["trainable_params"],
        "total_params": metrics["total_params"],
        **recorder.summary(),
    }


def peftkit_overrides(args: argparse.Namespace) -> list[str]:
    out = [f"train.output_dir='{Path(args.work) / args.arm}'"]
    if args.max_train_samples:
        out.append(f"data.max_train_samples={args.max_train_samples}")
    if args.max_eval_samples:
        out += [
            f"data.max_eval_samples={args.max_eval_samples}",
            f"data.max_test_samples={args.max_eval_samples}",
        ]
    if args.epochs is not None:
        out.append(f"train.num_train_epochs={args.epochs}")
    if args.bf16:
        out.append("train.bf16=true")
    return out + list(args.peftkit_set)


def baseline_argv(args: argparse.Namespace) -> list[str]:
    """The recipe's data, model and hyper-parameters as scripts/baseline_finetune.py options."""
    from peftkit.recipe import load_recipe

    recipe = load_recipe(RECIPES["seq_cls"] if args.recipe == "seq_cls" else args.recipe)
    train, adapter = recipe.train, recipe.adapter
    argv = [
        f"--model={recipe.model.name_or_path}",
        f"--data={recipe.data.dataset}",
        f"--output-dir={Path(args.work) / args.arm}",
        f"--max-length={recipe.task.max_length}",
        f"--r={adapter['r']}",
        f"--alpha={adapter['lora_alpha']}",
        f"--dropout={adapter['lora_dropout']}",
        f"--target-modules={','.join(adapter['target_modules'])}",
        f"--learning-rate={train['learning_rate']}",
        f"--epochs={args.epochs if args.epochs is not None else train['num_train_epochs']}",
        f"--batch-size={train['per_device_train_batch_size']}",
        f"--eval-batch-size={train['per_device_eval_batch_size']}",
        f"--warmup={train['warmup_steps']}",
        f"--weight-decay={train['weight_decay']}",
        f"--logging-steps={train['logging_steps']}",
        f"--seed={train['seed']}",
    ]
    if args.max_train_samples:
        argv.append(f"--max-train-samples={args.max_train_samples}")
    if args.max_eval_samples:
        argv += [f"--max-eval-samples={args.max_eval_samples}", f"--max-test-samples={args.max_eval_samples}"]
    if args.bf16:
        argv.append("--bf16")
    if args.arm != "baseline_max_length":
        argv.append("--dynamic-padding")
    if args.arm in PROBE_ARMS:
        argv.append(f"--max-steps={args.probe_steps}")
    if args.arm == "fused_lora_steps":
        argv.append("--fused-lora")
    if args.arm == "full_steps":
        argv += ["--full-finetune", "--learning-rate=5e-5"]
    return argv


def run_baseline_arm(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).parent))
    import baseline_finetune

    recorder = step_recorder(args.device)
    options = baseline_finetune.build_parser().parse_args(baseline_argv(args))
    result = baseline_finetune.run(options, callbacks=[recorder])
    return {**result, **recorder.summary()}


def child(args: argparse.Namespace) -> None:
    """One arm in this (fresh) process; writes its figures as JSON to --result."""
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = run_peftkit_arm(args) if args.arm == "peftkit" else run_baseline_arm(args)
    result.update(peak_memory(args.device), arm=args.arm, wall_s=time.perf_counter() - started)
    Path(args.result).write_text(json.dumps(result, default=str))


def sampler_padding(recipe_ref: str, epochs: int, mega_batch_mult: int | None = None) -> dict[str, Any]:
    """Padding of peftkit's training batches on the recipe's own training data (its full size, whatever
    --max-train-samples says), from the tokenized length column and the sampler the Trainer uses: exact
    for DataCollatorWithPadding, which pads each batch to its longest member. No model is run."""
    from peftkit.batching import ShuffledLengthGroupedSampler, length_grouped_batches, padding_fraction
    from peftkit.data import load_raw_datasets, tokenize_splits
    from peftkit.modeling import load_stack
    from peftkit.recipe import load_recipe
    from peftkit.tasks import TASKS

    recipe = load_recipe(RECIPES.get(recipe_ref, recipe_ref))
    task = TASKS[recipe.task_name]
    raw = load_raw_datasets(recipe.data, task)
    ctx = load_stack(recipe, task.prepare_labels(raw, recipe.task), with_model=False).ctx
    lengths = list(tokenize_splits({"train": raw["train"]}, task, ctx)["train"]["length"])
    batch = recipe.train["per_device_train_batch_size"]
    defaults = length_grouped_batches.__defaults__
    if mega_batch_mult:
        length_grouped_batches.__defaults__ = (mega_batch_mult, None)
    sampler = ShuffledLengthGroupedSampler(lengths, batch, seed=recipe.train["seed"])
    batches = []
    for epoch in range(max(1, epochs)):
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches += [order[i : i + batch] for i in range(0, len(order), batch)]
    length_grouped_batches.__defaults__ = defaults
    return {
        "rows": len(lengths),
        "batch_size": batch,
        "epochs": max(1, epochs),
        "padding_fraction": padding_fraction(lengths, batches),
        "random_batches_padding_fraction": random_padding(lengths, batch, recipe.train["seed"]),
    }


def random_padding(lengths: Sequence[int], batch: int, seed: int) -> float:
    """The same, for randomly drawn batches (the course's dynamic padding)."""
    import random

    from peftkit.batching import padding_fraction

    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    return padding_fraction(lengths, [order[i : i + batch] for i in range(0, len(order), batch)])


# ------------------------------------------------------------------------------------------------
# The machine's limit


def matmul_ceiling(
    hidden: int,
    intermediate: int,
    token_counts: Sequence[int],
    threads: int,
    device: str = "cpu",
    dtype: str = "float32",
    seconds: float = 0.5,
) -> dict[str, Any]:
    """FLOP/s of the model's linear-layer GEMMs (x @ Wᵀ, fp32 on CPU) at the
    given tokens per step, measured in this process; the ceiling is the best shape."""
    import torch

    torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    shapes = [(hidden, hidden), (hidden, intermediate), (intermediate, hidden)]
    burst = 50 if device == "cuda" else 1  # a GPU call takes microseconds: time many, not the launch
    rows = []
    for tokens in token_counts:
        for k, n in shapes:
            a = torch.randn(tokens, k, device=device, dtype=torch_dtype)
            w = torch.randn(n, k, device=device, dtype=torch_dtype)
            for _ in range(3):
                torch.nn.functional.linear(a, w)
            sync()
            # the fastest of many short timings: on a shared machine the limit is what an uncontended
            # stretch reaches, not an average over other jobs' interruptions
            fastest, started = float("inf"), time.perf_counter()
            while time.perf_counter() - started < seconds:
                tick = time.perf_counter()
                for _ in range(burst):
                    torch.nn.functional.linear(a, w)
                sync()
                fastest = min(fastest, (time.perf_counter() - tick) / burst)
            rows.append({"tokens": tokens, "k": k, "n": n, "flops_per_s": 2 * tokens * k * n / fastest})
    best = max(rows, key=lambda r: r["flops_per_s"])
    out = {"shapes": rows, "ceiling_flops_per_s": best["flops_per_s"], "threads": threads, "dtype": dtype}
    if device == "cuda":  # the device's peak, for reference: the model's small GEMMs cannot fill a GPU
        square = torch.randn(8192, 8192, device=device, dtype=torch_dtype)
        torch.mm(square, square)
        sync()
        started = time.perf_counter()
        for _ in range(20):
            torch.mm(square, square)
        sync()
        out["peak_flops_per_s"] = 20 * 2 * 8192**3 / (time.perf_counter() - started)
    return out


# ------------------------------------------------------------------------------------------------
# The run sequence and the report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="seq_cls", help="seq_cls | token_cls | qa | a recipe path")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per arm")
    parser.add_argument("--max-train-samples", type=int, default=None, help="default: the whole train split")
    parser.add_argument(
        "--max-eval-samples", type=int, default=None, help="validation/test rows (default all)"
    )
    parser.add_argument("--epochs", type=float, default=1, help="the recipe has 2; default 1 (time limit)")
    parser.add_argument("--probe-steps", type=int, default=30, help="steps of the LoRA / full FT probes")
    parser.add_argument("--arms", default=None, help="comma list; default: every arm the recipe has")
    parser.add_argument(
        "--peftkit-set", action="append", default=[], help="extra override for the peftkit arm"
    )
    parser.add_argument(
        "--mega-batch-mult", type=int, default=None, help="peftkit arm: batches sorted together (default 100)"
    )
    parser.add_argument("--output", default=None, help="write every figure as JSON here")
    parser.add_argument("--work", default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def default_arms(recipe: str) -> list[str]:
    return ["peftkit", *BASELINE_ARMS] if recipe == "seq_cls" else ["peftkit"]


def run_arm(arm: str, args: argparse.Namespace, argv: Sequence[str], script: str) -> dict[str, Any] | None:
    result = Path(args.work) / f"{arm}.json"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, script, *argv, "--arm", arm, "--result", str(result), "--work", args.work]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False, cwd=REPO)
    if done.returncode != 0:
        print(f"{arm}: failed (exit {done.returncode})\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    row = json.loads(result.read_text())
    row["process_s"] = time.perf_counter() - started
    print(f"  {arm}: {row['process_s']:.0f} s", file=sys.stderr)
    return row


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1_5_15": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def div(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing (a quick run may have no step past the warm-up)."""
    return None if a is None or not b else a / b


def points(arm: dict[str, Any], base: dict[str, Any], metric: str) -> float | None:
    a, b = (arm.get("test") or {}).get(metric), (base.get("test") or {}).get(metric)
    return None if a is None or b is None else 100 * (a - b)


def verdict(value: float | None, limit: float) -> str:
    return "not measured" if value is None else ("met" if value <= limit else "NOT met")


def report(
    rows: dict[str, dict[str, Any]], ceiling: dict[str, Any], info: dict[str, Any], sampler: dict[str, Any]
) -> dict[str, Any]:
    """Print the table and the ratios; returns the derived figures."""
    top = ceiling["ceiling_flops_per_s"]
    print(
        f"\n{info['cpu']} ({info['cores']} cores), {ceiling['threads']} thread(s), torch {info['torch']}, "
        f"load {info['load_avg_1_5_15'][0]:.2f} at start; {info['date']}"
    )
    header = (
        f"{'arm':<20} {'train s':>8} {'samples/s':>9} {'real tok/s':>10} {'pad tok/s':>9} {'padding':>7} "
        f"{'p50 s':>6} {'p90 s':>6} {'RSS MiB':>8} {'accuracy':>8} {'F1 spam':>7} {'GFLOP/s':>7} {'MFU':>5} "
        f"{'HF flos':>8}"
    )
    print(header)
    print("-" * len(header))
    for arm, r in rows.items():
        test = r.get("test") or {}
        print(
            f"{arm:<20} {fmt(r['train'].get('train_runtime'), '8.1f')} {fmt(r['samples_per_s'], '9.1f')} "
            f"{fmt(r['real_tokens_per_s'], '10.0f')} {fmt(r['padded_tokens_per_s'], '9.0f')} "
            f"{fmt(r['padding_fraction'], '7.1%')} {fmt(r['step_p50'], '6.3f')} {fmt(r['step_p90'], '6.3f')} "
            f"{fmt(r['peak_rss_mib'], '8.0f')} {fmt(test.get('accuracy'), '8.4f')} "
            f"{fmt(test.get('f1_spam'), '7.4f')} {fmt(r['useful_flops_per_s'], '7.1f', 1e-9)} "
            f"{fmt(div(r['useful_flops_per_s'], top), '5.1%')} "
            f"{fmt(r['train'].get('total_flos'), '8.2e')}"
        )
    derived: dict[str, Any] = {"ceiling_gflops": top / 1e9}
    print(f"\nmatmul ceiling ({ceiling['dtype']}, best of the model's GEMM shapes): {top / 1e9:.1f} GFLOP/s")
    for shape in ceiling["shapes"]:
        print(
            f"  [{shape['tokens']} x {shape['k']}] @ [{shape['k']} x {shape['n']}]: "
            f"{shape['flops_per_s'] / 1e9:.1f} GFLOP/s"
        )
    peftkit = rows.get("peftkit")
    if peftkit:
        print(
            f"\npeftkit FLOP accounting: {peftkit['per_token_frozen_weights'] / 1e6:.2f}M frozen + "
            f"{peftkit['per_token_trained_weights'] / 1e6:.3f}M trained GEMM weights per token → "
            f"{peftkit['flops_per_token'] / 1e6:.1f} MFLOP per real token (+ attention, + "
            f"{peftkit['flops_per_sequence'] / 1e6:.2f} MFLOP per sequence for pooler/head)"
        )
        padding = peftkit["padding_fraction"]
        print(
            f"peftkit padding: {fmt(padding, '.1%')} of training positions (per batch: p50 "
            f"{fmt(peftkit['batch_padding_p50'], '.1%')}, p90 {fmt(peftkit['batch_padding_p90'], '.1%')}, "
            f"max {fmt(peftkit['batch_padding_max'], '.1%')}); target ≤ 5%: {verdict(padding, 0.05)}"
        )
        mfu = derived["peftkit_mfu"] = div(peftkit["useful_flops_per_s"], top)
        print(f"peftkit model FLOP utilisation: {fmt(mfu, '.1%')} of the measured ceiling (target ≥ 30%)")
        for base in ("baseline_max_length", "baseline_dynamic"):
            if base not in rows:
                continue
            b = rows[base]
            time_ratio = div(peftkit["train"]["train_runtime"], b["train"]["train_runtime"])
            steady = div(b["samples_per_s"], peftkit["samples_per_s"])  # time per sample, steady state
            wall_ratio = div(peftkit["wall_s"], b["wall_s"])
            acc = points(peftkit, b, "accuracy")
            f1 = points(peftkit, b, "f1_spam")
            target = 0.5 if base == "baseline_max_length" else 0.9
            met = verdict(time_ratio, target) if acc is not None and abs(acc) <= 0.5 else "NOT met"
            derived.update(
                {
                    f"time_ratio_vs_{base}": time_ratio,
                    f"steady_ratio_vs_{base}": steady,
                    f"wall_ratio_vs_{base}": wall_ratio,
                    f"accuracy_points_vs_{base}": acc,
                    f"f1_spam_points_vs_{base}": f1,
                }
            )
            print(
                f"peftkit ÷ {base}: train time {fmt(time_ratio, '.2f')} (target ≤ {target}), time per sample "
                f"at steady state {fmt(steady, '.2f')}, whole process {fmt(wall_ratio, '.2f')}; accuracy "
                f"{fmt(acc, '+.2f')} points, spam F1 {fmt(f1, '+.2f')} points → {met}"
            )
    print(
        f"\npeftkit's sampler on the recipe's whole training split ({sampler['rows']} rows, batch "
        f"{sampler['batch_size']}, {sampler['epochs']} epoch(s), from the length column): padding "
        f"{sampler['padding_fraction']:.1%} (target ≤ 5%: {verdict(sampler['padding_fraction'], 0.05)}); "
        f"random batches: {sampler['random_batches_padding_fraction']:.1%}"
    )
    derived["sampler_padding_fraction"] = sampler["padding_fraction"]
    full = rows.get("full_steps")
    for arm, name, key in (
        ("lora_steps", "LoRA (peft's layers)", "lora_full"),
        ("fused_lora_steps", "LoRA (fused path)", "fused_lora_full"),
    ):
        lora = rows.get(arm)
        if not (lora and full):
            continue
        step = derived[f"{key}_step_ratio"] = div(lora["step_mean"], full["step_mean"])
        flops = derived[f"{key}_flop_ratio"] = div(
            lora["executed_flops_per_step"], full["executed_flops_per_step"]
        )
        derived[f"{key}_rss_ratio"] = div(lora["peak_rss_mib"], full["peak_rss_mib"])
        print(
            f"\n{name} vs full fine-tuning, same {lora['counted_steps']} batches: step "
            f"{fmt(lora['step_mean'], '.3f')} s vs {fmt(full['step_mean'], '.3f')} s "
            f"(ratio {fmt(step, '.2f')}, target ≤ 0.80: {verdict(step, 0.80)}; FLOPs ratio "
            f"{fmt(flops, '.2f')}: 4·N vs 6·N: 0.67); peak RSS "
            f"{lora['peak_rss_mib']:.0f} vs {full['peak_rss_mib']:.0f} MiB; MFU "
            f"{fmt(div(lora['useful_flops_per_s'], top), '.1%')} vs "
            f"{fmt(div(full['useful_flops_per_s'], top), '.1%')}"
        )
    return derived


def main(argv: Sequence[str] | None = None, script: str = __file__) -> dict[str, Any] | None:
    args = build_parser().parse_args(argv)
    if args.arm:
        child(args)
        return None
    args.work = args.work or tempfile.mkdtemp(prefix="bench-train-")
    arms = args.arms.split(",") if args.arms else default_arms(args.recipe)
    info = machine()
    print(f"bench_train: arms {arms}, {args.threads} thread(s), work folder {args.work}", file=sys.stderr)

    from peftkit.modeling import load_model_config
    from peftkit.recipe import load_recipe

    recipe = load_recipe(RECIPES.get(args.recipe, args.recipe))
    config = load_model_config(recipe.model)  # a folder, a Hub id or a GGUF file, as the run reads it
    batch = recipe.train["per_device_train_batch_size"]
    ceiling = matmul_ceiling(
        config.hidden_size,
        config.intermediate_size,
        [batch * 32, batch * recipe.task.max_length],
        args.threads,
        device=args.device,
        dtype="bfloat16" if args.bf16 else "float32",
    )
    passthrough = [
        f"--recipe={args.recipe}",
        f"--threads={args.threads}",
        f"--probe-steps={args.probe_steps}",
        f"--device={args.device}",
        *([f"--max-train-samples={args.max_train_samples}"] if args.max_train_samples else []),
        *([f"--max-eval-samples={args.max_eval_samples}"] if args.max_eval_samples else []),
        *([f"--epochs={args.epochs}"] if args.epochs is not None else []),
        *(["--bf16"] if args.bf16 else []),
        *[f"--peftkit-set={s}" for s in args.peftkit_set],
        *([f"--mega-batch-mult={args.mega_batch_mult}"] if args.mega_batch_mult else []),
    ]
    rows = {}
    for arm in arms:
        row = run_arm(arm, args, passthrough, script)
        if row is not None:
            rows[arm] = row
    padding = sampler_padding(args.recipe, math.ceil(args.epochs or 1), args.mega_batch_mult)
    derived = report(rows, ceiling, info, padding)
    everything = {
        "machine": info,
        "args": vars(args),
        "ceiling": ceiling,
        "sampler_padding": padding,
        "arms": rows,
        "derived": derived,
    }
    if args.output:
        Path(args.output).write_text(json.dumps(everything, indent=2, default=str))
    return everything


if __name__ == "__main__":
    main()
