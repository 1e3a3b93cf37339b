"""Does `peftkit merge` pass recipes/causal_seq2seq_lora.toml's run with its default settings, and does a
planted 1e-3 error in one weight still fail it? (issue 18)

Trains the shipped SmolLM2 recipe for a few steps (its model, task, adapter and data; fewer steps and fewer
scored pairs), merges the run with `peftkit merge` and no options, then merges it again with 1e-3 added to
one weight of the merged model before it is saved, once per planted weight below. Prints the figures of
each verification check as JSON lines and a Markdown table.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/merge_smollm2_tolerance.py [--work DIR] [--steps 10]

Not part of the test suite (several CPU minutes: the GGUF base is dequantised on every load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "causal_seq2seq_lora.toml"
# where 1e-3 is added: one scalar that feeds every logit, and one whole projection matrix
PLANTS = {
    "final norm, one element": ("model.norm.weight", "element"),
    "layer 0 o_proj, every element": ("model.layers.0.self_attn.o_proj.weight", "all"),
    "lm_head/embedding row 0, one element": ("lm_head.weight", "element"),
}


def finetune(work: Path, steps: int) -> Path:
    run = work / "run"
    if (run / "peftkit_run.json").is_file() and '"completed"' in (run / "peftkit_run.json").read_text():
        return run
    overrides = [
        f"train.max_steps={steps}",
        "train.warmup_steps=0",
        "train.max_train_minutes=30",
        'train.eval_strategy="no"',
        'train.save_strategy="no"',
        "data.max_eval_samples=16",  # the merge's verification sample is the validation split's first 32
        "data.max_test_samples=4",
        f'train.output_dir="{run}"',
    ]
    command = [sys.executable, "-m", "peftkit", "finetune", str(RECIPE), "--overwrite"]
    for item in overrides:
        command += ["--set", item]
    started = time.time()
    subprocess.run(command, check=True, cwd=REPO)
    print(f"finetune: {time.time() - started:.0f} s", file=sys.stderr)
    return run


def merge_default(run: Path, out: Path) -> dict[str, Any]:
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "peftkit", "merge", str(run), "--out", str(out), "--overwrite"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    wall = time.time() - started
    report = json.loads((out / "merge_report.json").read_text()) if result.returncode == 0 else {}
    checks = (report.get("verification") or {}).get("checks") or []
    return {"case": "default", "exit_code": result.returncode, "wall_s": round(wall, 1), "checks": checks,
            "output_tail": result.stdout[-600:] + result.stderr[-600:]}  # fmt: skip


def merge_planted(run: Path, out: Path, name: str) -> dict[str, Any]:
    """In this process: merge_run with 1e-3 added to one weight after merge_and_unload."""
    import importlib

    import torch

    from peftkit.errors import MergeVerificationError

    merge_module = importlib.import_module("peftkit.merge")
    parameter, how = PLANTS[name]
    original_drop, original_check = merge_module.drop_gguf_marker, merge_module._check_saved
    seen: list[dict[str, Any]] = []

    def plant(model: Any) -> None:
        original_drop(model)
        weight = model.get_parameter(parameter)
        with torch.no_grad():
            if how == "all":
                weight += 1e-3
            else:
                weight.view(-1)[0] += 1e-3

    def record(*args: Any, **kwargs: Any) -> Any:
        check = original_check(*args, **kwargs)
        seen.append(check)
        return check

    merge_module.drop_gguf_marker, merge_module._check_saved = plant, record
    started = time.time()
    try:
        merge_module.merge_run(run, out, overwrite=True)
        failed = False
    except MergeVerificationError:
        failed = True
    finally:
        merge_module.drop_gguf_marker, merge_module._check_saved = original_drop, original_check
    return {"case": f"planted: {name}", "failed": failed, "wall_s": round(time.time() - started, 1),
            "checks": seen}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/smollm2-merge"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--plant", choices=sorted(PLANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.plant:  # one planted merge, in a fresh process of its own
        print(json.dumps(merge_planted(args.work / "run", args.work / "planted", args.plant)))
        return
    run = finetune(args.work, args.steps)
    rows = [merge_default(run, args.work / "merged")]
    print(json.dumps(rows[-1]), flush=True)
    for name in PLANTS:
        result = subprocess.run(
            [sys.executable, __file__, "--work", str(args.work), "--plant", name],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        rows.append(json.loads(lines[-1]) if lines else {"case": name, "error": result.stderr[-800:]})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| case | result | max abs Δlogit | limit | max abs logit | agreement |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        for check in row.get("checks") or []:
            verdict = "passed" if check["passed"] else "FAILED"
            print(
                f"| {row['case']} | {verdict} | {check['max_abs_diff']:.3g} | {check.get('limit', 0):.3g} | "
                f"{check.get('max_abs_reference', 0):.3g} | {check['agreement']:.4f} "
                f"({check['predictions_compared']}) |"
            )


if __name__ == "__main__":
    main()
