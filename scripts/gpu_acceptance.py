"""One prepared run that checks every GPU path of peftkit on one CUDA device, in at most 8 minutes.

    .venv/bin/python scripts/gpu_acceptance.py --out gpu-acceptance/            # on the GPU machine
    .venv/bin/python scripts/gpu_acceptance.py --out /tmp/acc --dry-run         # CPU, tiny sizes, < 2 min

Parts (each independent: one that fails is reported with its error and the others still run):

- ``bf16_seq_cls``: the default recipe (recipes/seq_cls_lora.toml) for a few dozen steps in bf16;
- ``bf16_smollm2_seq2seq``: recipes/causal_seq2seq_lora.toml (SmolLM2) the same way;
  both through ``peftkit.finetune(load_recipe(path, overrides))``: tokens/s, step time, peak allocated and
  reserved GPU memory, the final test metric;
- ``qlora_smollm2_merge``: SmolLM2 in 4 bits (nf4, double quantization, bf16 compute), ``paged_adamw_8bit``,
  gradient checkpointing, then ``peftkit.merge`` with its parity check;
- ``plan_vs_measured_1b``: ``peftkit plan`` (CUDA model) against ``torch.cuda.max_memory_allocated`` of one
  training step on a randomly initialised Llama-3.2-1B-shaped model built from a config (no download), for
  LoRA, LoRA + checkpointing and QLoRA at three batch x length shapes: plan's error per arm and shape;
- ``mfu_lora_1b``: useful FLOP/s of a LoRA step on that model ÷ a bf16 matmul ceiling measured in the same
  process;
- ``deepspeed_zero2`` / ``deepspeed_zero3``: a single-process DeepSpeed run of the default recipe; the saved
  adapter is checked whole (every LoRA pair and the head, no empty tensor) and non-zero (every lora_B).

Writes ``acceptance.json`` and ``acceptance.md`` (a markdown table) in ``--out``; the exit status is 1 when a
part failed. ``--dry-run`` runs the same code on CPU with tiny models from configs, a handful of steps and
fp32; what cannot run on CPU is skipped with the reason. tests/integration/test_gpu_acceptance.py runs it.
Not part of the library.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import bench_train  # the scripts folder is not a package: found through sys.path

REPO = Path(__file__).resolve().parents[1]
SEQ_CLS = REPO / "recipes" / "seq_cls_lora.toml"
SEQ2SEQ = REPO / "recipes" / "causal_seq2seq_lora.toml"
# Llama-3.2-1B's shape (1.24B parameters with tied embeddings)
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
}
LLAMA_TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}
SHAPES_GPU = ((8, 512), (4, 1024), (2, 2048))  # batch x length
SHAPES_DRY = ((2, 16), (2, 32), (1, 64))
PLAN_ARMS = ("lora", "lora+checkpointing", "qlora")
PLAN_TOLERANCE = 0.15


class Skip(Exception):
    """A part that cannot run here; the message is the reason."""


@dataclass
class Context:
    out: Path
    work: Path
    dry_run: bool
    device: str
    steps: int
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    _models: dict[str, Path] = field(default_factory=dict)

    @property
    def bf16(self) -> bool:
        return self.device == "cuda"

    def precision_overrides(self) -> list[str]:
        """bf16 autocast on a GPU; fp32 on CPU (bf16 compute on CPU is not what users run)."""
        if self.bf16:
            return ["train.bf16=true"]
        return ["train.bf16=false"]


# ------------------------------------------------------------------------------------------------
# Models built from configs (no download)


def tiny_bert(ctx: Context) -> Path:
    """A 2-layer random BERT with the default recipe's (MiniLM) tokenizer, for the dry run."""
    if "bert" not in ctx._models:
        import torch
        from transformers import AutoTokenizer, BertConfig, BertModel

        from peftkit.recipe import load_recipe

        source = load_recipe(SEQ_CLS).model.name_or_path
        tokenizer = AutoTokenizer.from_pretrained(source)
        out = ctx.work / "models" / "tiny-bert"
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
        BertModel(config).save_pretrained(out)
        tokenizer.save_pretrained(out)
        ctx._models["bert"] = out
    return ctx._models["bert"]


def random_llama(ctx: Context, shape: dict[str, Any], name: str) -> Path:
    """A randomly initialised Llama saved with a tokenizer (MiniLM's, EOS = [SEP]): a local model folder."""
    if name not in ctx._models:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from peftkit.recipe import load_recipe

        tokenizer = AutoTokenizer.from_pretrained(load_recipe(SEQ_CLS).model.name_or_path)
        tokenizer.eos_token = tokenizer.sep_token
        # a minimal chat template, so the seq2seq recipe's system prompt and chat path run as with SmolLM2
        tokenizer.chat_template = (
            "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}"
        )
        vocab = max(int(shape.get("vocab_size", 0)), len(tokenizer))
        config = LlamaConfig(
            **{**shape, "vocab_size": vocab},
            max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.cls_token_id,
        )
        out = ctx.work / "models" / name
        torch.manual_seed(0)
        with torch.device(ctx.device):
            model = LlamaForCausalLM(config).to(torch.bfloat16 if ctx.bf16 else torch.float32)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model
        free(ctx)
        ctx._models[name] = out
    return ctx._models[name]


def free(ctx: Context) -> None:
    gc.collect()
    if ctx.device == "cuda":
        import torch

        torch.cuda.empty_cache()


def reset_peak(ctx: Context) -> None:
    if ctx.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------------
# Training through the public path


def finetune_part(ctx: Context, recipe_path: Path, name: str, overrides: Sequence[str]) -> dict[str, Any]:
    """``peftkit.finetune(load_recipe(path, overrides))`` with bench_train's step recorder as a callback."""
    import peftkit
    from peftkit.recipe import load_recipe

    out_dir = ctx.work / "runs" / name
    recipe = load_recipe(
        recipe_path,
        [
            f"train.output_dir='{out_dir}'",
            f"train.max_steps={ctx.steps}",
            f"train.eval_steps={ctx.steps}",
            f"train.save_steps={ctx.steps}",
            "train.logging_steps=5",
            *ctx.precision_overrides(),
            *overrides,
        ],
    )
    recorder = bench_train.step_recorder(ctx.device)
    free(ctx)
    reset_peak(ctx)
    started = time.perf_counter()
    result = peftkit.finetune(recipe, overwrite=True, callbacks=[recorder])
    seconds = time.perf_counter() - started
    summary = recorder.summary()
    memory = bench_train.peak_memory(ctx.device)
    test = result.metrics.get("test", {})
    metric_name = next((k for k in test if not k.endswith(("runtime", "per_second", "loss"))), None)
    return {
        "run_dir": str(result.run_dir),
        "seconds": round(seconds, 1),
        "steps": summary["steps"],
        "step_p50_s": summary["step_p50"],
        "real_tokens_per_s": summary["real_tokens_per_s"],
        "gpu_peak_allocated_mib": memory.get("gpu_peak_allocated_mib"),
        "gpu_peak_reserved_mib": memory.get("gpu_peak_reserved_mib"),
        "peak_rss_mib": memory["peak_rss_mib"],
        "final_metric": {metric_name: test[metric_name]} if metric_name else {},
        "train_loss": result.metrics["train"].get("train_loss"),
    }


def seq_cls_overrides(ctx: Context) -> list[str]:
    if not ctx.dry_run:
        return []
    return [
        f"model.name_or_path='{tiny_bert(ctx)}'",
        "data.max_train_samples=32",
        "data.max_eval_samples=16",
        "data.max_test_samples=16",
        "task.max_length=32",
        "train.per_device_train_batch_size=4",
    ]


def seq2seq_overrides(ctx: Context) -> list[str]:
    common = ["data.max_eval_samples=50", "data.max_test_samples=100", "train.max_train_minutes=4"]
    if not ctx.dry_run:
        return common
    return [
        f"model.name_or_path='{random_llama(ctx, LLAMA_TINY, 'tiny-llama')}'",
        "model.gguf_file=''",
        "data.max_train_samples=32",
        "data.max_eval_samples=4",
        "data.max_test_samples=4",
        "task.max_new_tokens=4",
        "train.per_device_train_batch_size=4",
        "train.per_device_eval_batch_size=4",
        "train.max_train_minutes=2",
        "train.warmup_steps=0",
    ]


def part_bf16_seq_cls(ctx: Context) -> dict[str, Any]:
    return finetune_part(ctx, SEQ_CLS, "bf16_seq_cls", seq_cls_overrides(ctx))


def part_bf16_smollm2(ctx: Context) -> dict[str, Any]:
    return finetune_part(ctx, SEQ2SEQ, "bf16_smollm2_seq2seq", seq2seq_overrides(ctx))


def smollm2_folder(ctx: Context) -> list[str]:
    """SmolLM2 dequantised from its GGUF into a plain folder: a recipe refuses [quantization] with a GGUF
    file, so QLoRA loads the same weights from safetensors. Overrides that point the recipe at it."""
    if ctx.dry_run:
        return []
    import torch
    from transformers import AutoModelForCausalLM

    from peftkit.modeling import drop_gguf_marker, load_tokenizer
    from peftkit.recipe import load_recipe

    out = ctx.work / "models" / "smollm2-135m"
    if not (out / "config.json").is_file():
        section = load_recipe(SEQ2SEQ).model
        model = AutoModelForCausalLM.from_pretrained(
            section.name_or_path, gguf_file=section.gguf_file, dtype=torch.bfloat16
        )
        drop_gguf_marker(model)
        model.save_pretrained(out)
        load_tokenizer(section).save_pretrained(out)
        del model
    return [f"model.name_or_path='{out}'", "model.gguf_file=''"]


def part_qlora_merge(ctx: Context) -> dict[str, Any]:
    """QLoRA (nf4, double quant, bf16 compute on a GPU), paged 8-bit AdamW, checkpointing; then merge."""
    import peftkit

    compute = "bfloat16" if ctx.bf16 else "float32"
    overrides = [
        *seq2seq_overrides(ctx),
        *smollm2_folder(ctx),
        "quantization.bits=4",
        "quantization.quant_type='nf4'",
        "quantization.double_quant=true",
        f"quantization.compute_dtype='{compute}'",
        "train.optim='paged_adamw_8bit'",
        "train.gradient_checkpointing=true",
    ]
    row = finetune_part(ctx, SEQ2SEQ, "qlora_smollm2", overrides)
    started = time.perf_counter()
    merged = peftkit.merge(row["run_dir"], ctx.work / "merged" / "qlora_smollm2", overwrite=True)
    report = merged.report
    row["merge_seconds"] = round(time.perf_counter() - started, 1)
    keys = ("max_abs_diff", "agreement", "passed", "predictions_compared")
    verification = report.get("verification", {})
    checks = verification.get("checks", [])
    row["merge_parity"] = {"status": report.get("status")}
    if checks:  # the merged model reloaded from disk against the adapter model on the unquantized base
        row["merge_parity"]["saved"] = {k: checks[0].get(k) for k in keys}
    quantized = verification.get("quantized_adapter")
    if isinstance(quantized, dict):  # the adapter on the 4-bit base (as trained) against the merged model
        row["merge_parity"]["vs_4bit"] = {k: quantized.get(k) for k in ("max_abs_diff", "agreement")}
    if ctx.device != "cuda":
        row["note"] = "CPU: paged_adamw_8bit falls back to non-paged; nf4 runs bitsandbytes' CPU kernels"
    return row


# ------------------------------------------------------------------------------------------------
# plan against measured memory, and MFU, on a ~1B Llama


def llama_recipe(ctx: Context, model_dir: Path, arm: str, batch: int, length: int) -> Any:
    """A recipe for the random Llama: causal-LM LoRA r=16 on all linear layers, the arm's memory levers."""
    from peftkit.recipe import recipe_from_dict

    data = ctx.work / "llama_data"
    data.mkdir(parents=True, exist_ok=True)
    train = data / "train.jsonl"
    if not train.exists():
        train.write_text(
            "".join(json.dumps({"source": f"s {n}", "target": f"t {n}"}) + "\n" for n in range(8))
        )
    half = "bfloat16" if ctx.bf16 else "float32"
    raw: dict[str, Any] = {
        "model": {"name_or_path": str(model_dir), "dtype": half},
        "task": {"type": "seq2seq"},
        "data": {"train_file": str(train)},
        "adapter": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "train": {
            "per_device_train_batch_size": batch,
            "bf16": ctx.bf16,
            "gradient_checkpointing": arm == "lora+checkpointing",
            "optim": "adamw_torch",
        },
    }
    if arm == "qlora":
        raw["quantization"] = {"bits": 4, "compute_dtype": half}
        raw["train"]["gradient_checkpointing"] = True
        raw["train"]["optim"] = "paged_adamw_8bit"
    return recipe_from_dict(raw, base_dir=data, name=f"llama-{arm}")


def build_trainable(recipe: Any, device: str) -> Any:
    """The recipe's adapted model as finetune() builds it (k-bit preparation, adapter)."""
    from peftkit.adapters import apply_adapter
    from peftkit.modeling import load_model_config, load_model_for_training, load_tokenizer
    from peftkit.tasks import TASKS
    from peftkit.tasks.base import TaskContext

    task = TASKS[recipe.task_name]
    config = load_model_config(recipe.model)
    ctx = TaskContext(
        cfg=recipe.task, tokenizer=load_tokenizer(recipe.model), labels=None, model_config=config
    )
    checkpointing = bool(recipe.train.get("gradient_checkpointing"))
    model = load_model_for_training(recipe.model, task, ctx, recipe.quantization, checkpointing)
    if checkpointing:  # as the Trainer does for gradient_checkpointing=True (non-reentrant)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = apply_adapter(model, recipe.adapter, task, config)
    if recipe.quantization is None:
        model.to(device)
    model.train()
    return model


def optimizer_for(model: Any, name: str) -> Any:
    """The optimizer the Trainer builds for ``optim=name``."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), optim=name, report_to="none")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    return cls([p for p in model.parameters() if p.requires_grad], **kwargs)


def train_step(model: Any, optimizer: Any, ids: Any, device: str, bf16: bool) -> float:
    import torch

    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def part_plan_vs_measured(ctx: Context) -> dict[str, Any]:
    """plan's CUDA model against the peak allocated memory of one training step (after a warm-up step)."""
    import torch

    import peftkit

    model_dir = random_llama(ctx, LLAMA_1B if not ctx.dry_run else LLAMA_TINY, "llama")
    shapes = SHAPES_DRY if ctx.dry_run else SHAPES_GPU
    rows, errors = [], []
    for arm in PLAN_ARMS:
        for batch, length in shapes:
            recipe = llama_recipe(ctx, model_dir, arm, batch, length)
            planned = peftkit.plan(recipe, seq_len=length, device="cuda")
            row: dict[str, Any] = {
                "arm": arm,
                "batch": batch,
                "length": length,
                "plan_mib": planned.total_bytes / 2**20,
                "plan_activation_mib": planned.activation_bytes / 2**20,
                "plan_model_state_mib": planned.model_state_bytes / 2**20,
            }
            try:
                model = build_trainable(recipe, ctx.device)
                optimizer = optimizer_for(model, str(recipe.train["optim"]))
                vocab = model.config.vocab_size
                ids = torch.randint(0, vocab, (batch, length), device=model.device)
                train_step(model, optimizer, ids, ctx.device, ctx.bf16)  # optimizer state now exists
                free(ctx)
                reset_peak(ctx)
                row["loss"] = train_step(model, optimizer, ids, ctx.device, ctx.bf16)
                if ctx.device == "cuda":
                    measured = torch.cuda.max_memory_allocated()
                    row["measured_mib"] = measured / 2**20
                    row["plan_error"] = planned.total_bytes / measured - 1
                    errors.append(abs(row["plan_error"]))
                else:
                    row["measured_mib"] = None
                    row["note"] = "CPU: torch.cuda.max_memory_allocated needs CUDA; the step ran, plan only"
                del model, optimizer
            except Exception as exc:  # one shape failing (out of memory) leaves the others
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            free(ctx)
            rows.append(row)
    failed = [r for r in rows if "error" in r]
    out: dict[str, Any] = {"rows": rows, "calibration": planned.activation_model.calibration}  # type: ignore[union-attr]
    if errors:
        out["max_abs_plan_error"] = max(errors)
        out["within_15_percent"] = all(e <= PLAN_TOLERANCE for e in errors)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(rows)} arm x shape runs failed: {failed[0]['error']}")
    return out


def part_mfu(ctx: Context) -> dict[str, Any]:
    """Useful FLOP/s of LoRA steps on the 1B Llama ÷ the best bf16 GEMM of its shapes, same process."""
    import torch

    model_dir = random_llama(ctx, LLAMA_1B if not ctx.dry_run else LLAMA_TINY, "llama")
    batch, length = (4, 1024) if not ctx.dry_run else (2, 32)
    recipe = llama_recipe(ctx, model_dir, "lora", batch, length)
    model = build_trainable(recipe, ctx.device)
    optimizer = optimizer_for(model, "adamw_torch_fused" if ctx.device == "cuda" else "adamw_torch")
    config = model.config
    gemms: list[dict[str, Any]] = []

    def on_linear(mod: Any, inputs: Any, output: Any) -> None:
        x = inputs[0]
        gemms.append(
            {
                "in": mod.in_features,
                "out": mod.out_features,
                "per": "token",
                "scale": x.numel() / mod.in_features / (batch * length),
                "input_grad": bool(x.requires_grad),
                "trained": bool(mod.weight.requires_grad),
            }
        )

    handles = [m.register_forward_hook(on_linear) for m in model.modules() if type(m) is torch.nn.Linear]
    ids = torch.randint(0, config.vocab_size, (batch, length), device=model.device)
    train_step(model, optimizer, ids, ctx.device, ctx.bf16)
    for h in handles:
        h.remove()
    flops = bench_train.gemm_flops(gemms)
    attention = 3 * 4 * config.num_hidden_layers * config.hidden_size * length**2 * batch
    per_step = flops["flops_per_token"] * batch * length + attention
    steps = 3 if ctx.dry_run else 10
    sync = torch.cuda.synchronize if ctx.device == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, ids, ctx.device, ctx.bf16)
    sync()
    step_s = (time.perf_counter() - started) / steps
    del model, optimizer
    free(ctx)
    dtype = "bfloat16" if ctx.bf16 else "float32"
    ceiling = bench_train.matmul_ceiling(
        config.hidden_size,
        config.intermediate_size,
        [batch * length],
        torch.get_num_threads(),
        ctx.device,
        dtype,
        seconds=0.3 if ctx.dry_run else 0.5,
    )
    useful = per_step / step_s
    out = {
        "batch": batch,
        "length": length,
        "step_s": step_s,
        "useful_flops_per_step": per_step,
        "useful_tflops_per_s": useful / 1e12,
        "ceiling_tflops_per_s": ceiling["ceiling_flops_per_s"] / 1e12,
        "ceiling_dtype": dtype,
        "mfu": useful / ceiling["ceiling_flops_per_s"],
    }
    if "peak_flops_per_s" in ceiling:
        out["device_peak_tflops_per_s"] = ceiling["peak_flops_per_s"] / 1e12
        out["mfu_of_device_peak"] = useful / ceiling["peak_flops_per_s"]
    return out


# ------------------------------------------------------------------------------------------------
# DeepSpeed, single process


def deepspeed_part(ctx: Context, stage: str) -> dict[str, Any]:
    """The default recipe under ``train.deepspeed = stage`` in one process; the adapter checked whole."""
    if ctx.device != "cuda":
        raise Skip(
            "CPU: DeepSpeed compiles its CPU communication op on first use (40-60 s), over the dry run's "
            "2-minute budget; tests/distributed runs ZeRO-2/3 on CPU"
        )
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise Skip("deepspeed is not installed")
    name = f"deepspeed_{stage}"
    out_dir = ctx.work / "runs" / name
    overrides = [
        f"train.output_dir='{out_dir}'",
        f"train.max_steps={ctx.steps}",
        f"train.eval_steps={ctx.steps}",
        f"train.save_steps={ctx.steps}",
        f"train.deepspeed='{stage}'",
        *ctx.precision_overrides(),
    ]
    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29500 + (3 if stage == "zero3" else 2)),
    }
    command = [sys.executable, "-m", "peftkit", "finetune", str(SEQ_CLS), "--overwrite"]
    for o in overrides:
        command += ["--set", o]
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-600:]}")
    check = check_adapter(out_dir)
    if not check["whole"] or not check["non_zero"]:
        raise RuntimeError(f"saved adapter: {check}")
    return {"seconds": round(seconds, 1), **check}


def check_adapter(run_dir: Path) -> dict[str, Any]:
    """Every LoRA module has its A and B, no tensor is empty (ZeRO-3 saves shape-[0] placeholders when it
    fails to gather), the head is there, and every lora_B moved from its zero initialisation."""
    from safetensors.torch import load_file

    files = list(run_dir.rglob("adapter_model.safetensors"))
    top = [f for f in files if f.parent == run_dir] or files
    if not top:
        return {"whole": False, "non_zero": False, "problem": f"no adapter_model.safetensors in {run_dir}"}
    tensors = load_file(str(top[0]))
    a = {k.replace("lora_A", "LORA") for k in tensors if "lora_A" in k}
    b = {k.replace("lora_B", "LORA") for k in tensors if "lora_B" in k}
    empty = [k for k, t in tensors.items() if t.numel() == 0]
    zero_b = [k for k, t in tensors.items() if "lora_B" in k and not bool(t.abs().sum() > 0)]
    head = [k for k in tensors if "lora_" not in k]
    return {
        "tensors": len(tensors),
        "lora_pairs": len(a & b),
        "head_tensors": len(head),
        "empty_tensors": empty[:5],
        "zero_lora_B": zero_b[:5],
        "whole": bool(a) and a == b and not empty and bool(head),
        "non_zero": not zero_b,
    }


def part_zero2(ctx: Context) -> dict[str, Any]:
    return deepspeed_part(ctx, "zero2")


def part_zero3(ctx: Context) -> dict[str, Any]:
    return deepspeed_part(ctx, "zero3")


PARTS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "bf16_seq_cls": part_bf16_seq_cls,
    "bf16_smollm2_seq2seq": part_bf16_smollm2,
    "qlora_smollm2_merge": part_qlora_merge,
    "plan_vs_measured_1b": part_plan_vs_measured,
    "mfu_lora_1b": part_mfu,
    "deepspeed_zero2": part_zero2,
    "deepspeed_zero3": part_zero3,
}


# ------------------------------------------------------------------------------------------------
# Report


def fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def summary_cell(name: str, result: dict[str, Any]) -> str:
    """One line of figures per part for the table."""
    if result["status"] != "ok":
        return result.get("reason") or result.get("error", "")
    r = result["result"]
    if name.startswith(("bf16_", "qlora_")):
        cells = [
            f"{fmt(r.get('real_tokens_per_s'), ',.0f')} tok/s",
            f"step p50 {fmt(r.get('step_p50_s'), '.3f')} s",
            (
                f"peak alloc/res {fmt(r.get('gpu_peak_allocated_mib'), ',.0f')}/"
                f"{fmt(r.get('gpu_peak_reserved_mib'), ',.0f')} MiB"
                if r.get("gpu_peak_allocated_mib") is not None
                else f"peak RSS {fmt(r.get('peak_rss_mib'), ',.0f')} MiB"
            ),
            f"metric {json.dumps(r.get('final_metric'))}",
        ]
        parity = r.get("merge_parity")
        if parity:
            saved, vs4 = parity.get("saved", {}), parity.get("vs_4bit", {})
            cells.append(
                f"merge {parity.get('status')}: max Δ {fmt(saved.get('max_abs_diff'))}, agreement "
                f"{fmt(saved.get('agreement'))}; vs 4-bit max Δ {fmt(vs4.get('max_abs_diff'))}"
            )
        return "; ".join(cells)
    if name == "plan_vs_measured_1b":
        if "max_abs_plan_error" in r:
            return f"max |plan error| {r['max_abs_plan_error']:.1%} (limit 15%); per arm and shape below"
        return "plan figures only (no CUDA); per arm and shape below"
    if name == "mfu_lora_1b":
        return (
            f"MFU {r['mfu']:.1%} ({r['useful_tflops_per_s']:.3g} of {r['ceiling_tflops_per_s']:.3g} "
            f"{r['ceiling_dtype']} TFLOP/s), step {r['step_s']:.3f} s at {r['batch']} x {r['length']}"
        )
    if name.startswith("deepspeed_"):
        return (
            f"adapter whole ({r['lora_pairs']} LoRA pairs, {r['head_tensors']} head tensors), lora_B non-zero"
        )
    return json.dumps(r)[:200]


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# GPU acceptance{' (dry run on CPU)' if report['dry_run'] else ''}",
        "",
        f"device: {report['device_name']}; {report['date']}; torch {report['torch']}; "
        f"{'fp32 on CPU, tiny models from configs' if report['dry_run'] else 'bf16'}; "
        f"total {report['seconds']:.0f} s",
        "",
        "| part | status | seconds | figures |",
        "|---|---|---:|---|",
    ]
    for name, result in report["parts"].items():
        cell = summary_cell(name, result).replace("|", "/")
        lines.append(f"| {name} | {result['status']} | {result['seconds']:.1f} | {cell} |")
    plan = report["parts"].get("plan_vs_measured_1b", {}).get("result")
    if plan:
        lines += [
            "",
            "plan (CUDA model) against peak allocated memory of one training step:",
            "",
            "| arm | batch x length | plan MiB | measured MiB | plan error |",
            "|---|---|---:|---:|---:|",
        ]
        for row in plan["rows"]:
            error = row.get("plan_error")
            lines.append(
                f"| {row['arm']} | {row['batch']} x {row['length']} | {row['plan_mib']:,.1f} | "
                f"{fmt(row.get('measured_mib'), ',.1f')} | {f'{error:+.1%}' if error is not None else '—'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for acceptance.json / acceptance.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models, a few steps (< 2 minutes)")
    parser.add_argument(
        "--parts", default=None, help=f"comma list of parts (default all: {', '.join(PARTS)})"
    )
    parser.add_argument(
        "--budget-s", type=float, default=480, help="parts not started by then are skipped (default 8 min)"
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 40; dry 3)")
    args = parser.parse_args(argv)
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_acceptance.py: no CUDA device; use --dry-run to check this script on CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    ctx = Context(args.out, work, args.dry_run, device, args.steps or (3 if args.dry_run else 40))
    chosen = args.parts.split(",") if args.parts else list(PARTS)
    started = time.perf_counter()
    parts: dict[str, dict[str, Any]] = {}
    for name in chosen:
        tick = time.perf_counter()
        entry: dict[str, Any]
        if tick - started > args.budget_s:
            parts[name] = {
                "status": "skipped",
                "reason": f"time budget of {args.budget_s:.0f} s spent",
                "seconds": 0.0,
            }
            continue
        try:
            entry = {"status": "ok", "result": PARTS[name](ctx)}
        except Skip as skip:
            entry = {"status": "skipped", "reason": str(skip)}
        except Exception as exc:  # every part is independent: report it and go on
            entry = {
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}"[:600],
                "traceback": traceback.format_exc()[-3000:],
            }
        entry["seconds"] = time.perf_counter() - tick
        parts[name] = entry
        print(f"{name}: {entry['status']} in {entry['seconds']:.1f} s", flush=True)
        free(ctx)
    report = {
        "dry_run": args.dry_run,
        "device": device,
        "device_name": torch.cuda.get_device_name(0)
        if device == "cuda"
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "seconds": time.perf_counter() - started,
        "parts": parts,
    }
    (args.out / "acceptance.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "acceptance.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if any(p["status"] == "failed" for p in parts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
