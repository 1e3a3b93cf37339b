"""Memory levers on MiniLM / SMS spam: full fine-tuning, LoRA, LoRA + gradient checkpointing, LoRA + 8-bit
AdamW, QLoRA 4-bit. Each arm runs in a fresh process and reports:

- model state measured from the live tensors after one optimizer step (weights + gradients +
  optimizer state), next to `peftkit plan`'s prediction;
- the activation memory of one training step at a fixed shape (batch x seq_len tokens, padded),
  measured as the rise of the process's peak RSS over its RSS before the step (Linux:
  /proc/self/clear_refs resets the peak), next to plan's estimate. The rise includes the forward's freed
  temporaries that glibc keeps resident (see peftkit.plan.activation_bytes); a GLIBC_TUNABLES setting in
  the environment reaches the arm processes and changes it;
- a short real fine-tuning run's test metrics and the whole run's peak RSS.

    .venv/bin/python scripts/bench_memory.py [--train-samples 1000] [--seq-len 256] [--batch 16]

Not part of the test suite. Full fine-tuning is built here directly (peftkit trains adapters).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "seq_cls_lora.toml"
# the LoRA arms keep peft's own layers (train.fused_lora=false) except fused_lora: peftkit's fused path
PEFT_LAYERS = "train.fused_lora=false"
ARMS = {
    "full": [],
    "lora": [PEFT_LAYERS],
    "fused_lora": [],
    "lora+checkpointing": ["train.gradient_checkpointing=true", PEFT_LAYERS],
    "lora+adamw_8bit": ["train.optim=adamw_bnb_8bit", PEFT_LAYERS],
    "qlora_4bit": ["quantization.bits=4"],
}


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; 0 when absent."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    return _status_bytes("VmHWM")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def tensor_bytes(tensors: object) -> int:
    import torch

    total = 0
    for t in tensors:  # type: ignore[attr-defined]
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def measure_step(arm: str, recipe: object, task: object, args: argparse.Namespace) -> dict[str, float]:
    """Model state and the activation peak of one step at a fixed shape; frees everything on return."""
    import torch
    from transformers import Trainer, TrainingArguments

    from peftkit.adapters import apply_adapter
    from peftkit.modeling import load_stack
    from peftkit.trainer import with_shuffled_length_groups

    stack = load_stack(recipe, ("ham", "spam"), quantized=True)
    model, tokenizer, config = stack.model, stack.ctx.tokenizer, stack.ctx.model_config
    if arm == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        if recipe.quantization is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = apply_adapter(model, recipe.adapter, task, config)
        from peftkit.plan import fused_lora_planned

        if fused_lora_planned(recipe):  # as finetune does
            from peftkit import fused_lora

            fused_lora.install(model)
    if recipe.train.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainer_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        optim=recipe.train.get("optim", "adamw_torch_fused"),
        use_cpu=True,
        learning_rate=1e-4,
        report_to="none",
    )
    trainer = with_shuffled_length_groups(Trainer)(model=model, args=trainer_args)
    optimizer = trainer.create_optimizer()
    batch = tokenizer(
        ["spam " * args.seq_len] * args.batch,
        truncation=True,
        max_length=args.seq_len,
        padding="max_length",
        return_tensors="pt",
    )
    batch["labels"] = torch.zeros(args.batch, dtype=torch.long)

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep gradient buffers: they are model state

    step()  # allocates gradients and optimizer state
    params = list(model.parameters())
    weights = tensor_bytes(params)
    grads = tensor_bytes(p.grad for p in params if p.grad is not None)
    state = sum(tensor_bytes(s.values()) for s in optimizer.state.values())
    eight_bit = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor) and t.dtype == torch.uint8
    )
    gc.collect()
    # hand freed heap back to the OS so the baseline is live memory, not what the warm-up step left cached
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = rss_bytes()
    reset_peak()
    started = time.perf_counter()
    step()
    step_seconds = time.perf_counter() - started
    activation_rise = peak_rss_bytes() - before

    return {
        "measured_state": weights + grads + state,
        "optimizer_8bit_bytes": eight_bit,
        "optimizer_state_bytes": state,
        "activation_rise": activation_rise,
        "step_seconds": step_seconds,
    }


def measure_arm(arm: str, args: argparse.Namespace) -> dict[str, object]:
    """Runs inside the child process."""
    import torch

    from peftkit.plan import plan_recipe
    from peftkit.recipe import load_recipe
    from peftkit.tasks import TASKS
    from peftkit.training import finetune

    out_dir = Path(args.work) / arm.replace("+", "_")
    overrides = [
        *ARMS[arm],
        f"task.max_length={args.seq_len}",
        *([f"data.max_train_samples={args.train_samples}"] if args.train_samples else []),
        f"train.num_train_epochs={args.epochs}",
        f"train.per_device_train_batch_size={args.batch}",
        "train.eval_strategy='no'",
        "train.save_strategy='no'",
        "train.load_best_model_at_end=false",
        "train.report_to=['none']",
        f"train.output_dir='{out_dir}'",
    ]
    recipe = load_recipe(RECIPE, overrides)
    task = TASKS[recipe.task_name]
    torch.manual_seed(0)

    step = measure_step(arm, recipe, task, args)
    plan = plan_recipe(recipe, seq_len=args.seq_len)
    plan_state, plan_activations = plan.model_state_bytes, plan.activation_bytes
    if arm == "full":  # plan describes the adapter recipe; full fine-tuning: everything trains, AdamW fp32
        from peftkit.modeling import load_model_config
        from peftkit.plan import activation_bytes

        plan_state = plan.total_params * (4 + 4 + 8)
        config = load_model_config(recipe.model)
        plan_activations = activation_bytes(
            config, args.batch, args.seq_len, False, recipe.adapter, full_finetuning=True
        )

    # --- a real run of the recipe for the metric; peftkit trains adapters, so full fine-tuning runs the
    # plain transformers reference script (scripts/baseline_finetune.py) with the usual full-FT step size
    metrics: dict[str, object] = {}
    if arm == "full" and not args.skip_finetune:
        metrics = full_finetune_metrics(recipe, args)
    elif not args.skip_finetune:
        result = finetune(recipe, overwrite=True)
        metrics = result.metrics.get("test", {})  # type: ignore[assignment]
    return {
        "arm": arm,
        **step,
        "plan_state": plan_state,
        "plan_activations": plan_activations,
        # the full fine-tuning run is a child process: the arm's peak is the larger of the two
        "peak_rss": max(
            resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        )
        * 1024,
        "accuracy": metrics.get("accuracy"),
        "f1_spam": metrics.get("f1_spam"),
    }


FULL_FINETUNE_LEARNING_RATE = 5e-5  # LoRA's 5e-4 is ten times what full fine-tuning of BERT-size models takes


def full_finetune_metrics(recipe: object, args: argparse.Namespace) -> dict[str, object]:
    """Test metrics of full fine-tuning on the recipe's data and batch, run by the reference script."""
    train = recipe.train  # type: ignore[attr-defined]
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "baseline_finetune.py"),
        "--full-finetune",
        "--dynamic-padding",
        f"--learning-rate={FULL_FINETUNE_LEARNING_RATE}",
        f"--epochs={args.epochs}",
        f"--batch-size={args.batch}",
        f"--max-length={args.seq_len}",
        f"--seed={train['seed']}",
        *([f"--max-train-samples={args.train_samples}"] if args.train_samples else []),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"full fine-tuning run failed:\n{done.stderr[-2000:]}")
    # the Trainer prints its log dicts first; the script's result is the indented JSON object at the end
    result = json.loads(done.stdout[done.stdout.rindex('{\n  "train"') :])
    return dict(result["test"])


def mib(n: object) -> str:
    return "-" if n is None else f"{int(n) / 2**20:,.1f}"  # type: ignore[call-overload]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arm", choices=list(ARMS), help="(internal) run one arm in this process")
    parser.add_argument("--train-samples", type=int, default=None, help="default: the whole train split")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the metric run (the recipe's: 2)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--work", default=None)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--skip-finetune", action="store_true", help="measure memory only, no metric run")
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(measure_arm(args.arm, args)))
        return
    work = args.work or tempfile.mkdtemp(prefix="bench-memory-")
    rows = []
    for arm in args.arms.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--arm",
            arm,
            "--work",
            work,
            "--seq-len",
            str(args.seq_len),
            "--batch",
            str(args.batch),
            *(["--skip-finetune"] if args.skip_finetune else []),
            "--epochs",
            str(args.epochs),
            *(["--train-samples", str(args.train_samples)] if args.train_samples else []),
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        started = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            print(f"{arm}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["wall"] = time.time() - started
        rows.append(row)
        print(f"finished {arm} in {row['wall']:.0f} s", file=sys.stderr)
    header = (
        f"{'arm':<20} {'state MiB':>10} {'plan MiB':>9} {'Δ%':>6} {'8-bit opt':>10} {'act. rise MiB':>14} "
        f"{'plan act.':>10} {'Δ%':>6} {'step s':>7} {'peak RSS MiB':>13} {'accuracy':>9} {'spam F1':>8}"
    )
    sample = f"{args.train_samples} training messages" if args.train_samples else "the full train split"
    print(
        f"\nMiniLM-L6 seq_cls; memory at one step of batch {args.batch} x {args.seq_len} tokens; metric: "
        f"{args.epochs} epochs on {sample}, SMS spam test split\n"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        state_err = 100 * (r["plan_state"] - r["measured_state"]) / r["measured_state"]
        act_err = 100 * (r["plan_activations"] - r["activation_rise"]) / max(r["activation_rise"], 1)
        eight = f"{100 * r['optimizer_8bit_bytes'] / max(r['optimizer_state_bytes'], 1):.0f}% B"
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        f1 = "-" if r["f1_spam"] is None else f"{r['f1_spam']:.4f}"
        print(
            f"{r['arm']:<20} {mib(r['measured_state']):>10} {mib(r['plan_state']):>9} {state_err:>+6.1f} "
            f"{eight:>10} {mib(r['activation_rise']):>14} {mib(r['plan_activations']):>10} {act_err:>+6.1f} "
            f"{r['step_seconds']:>7.2f} {mib(r['peak_rss']):>13} {acc:>9} {f1:>8}"
        )


if __name__ == "__main__":
    main()
