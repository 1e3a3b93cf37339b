"""scripts/bench_train.py on a CUDA GPU in bf16: the same arms and figures, plus GPU memory (peak allocated
and reserved per arm), tokens/s in bf16, and the GPU's bf16 matmul ceiling (the model's GEMM shapes, and
one large square GEMM for the device's peak).

    .venv/bin/python scripts/bench_gpu.py [--output bench_gpu.json] [bench_train options]
    .venv/bin/python scripts/bench_gpu.py --dry-run    # no GPU: the same code path on CPU, fp32, a few rows

On a GPU the default is the recipe's whole schedule (2 epochs); --epochs and --max-train-samples work as in
bench_train.py. Not part of the test suite.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import bench_train  # the scripts folder is not a package: found through sys.path


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--arm" in argv or any(a.startswith("--arm=") for a in argv):
        return bench_train.main(argv, script=__file__)  # a child process: same code as bench_train's
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    if dry_run:
        defaults = [
            "--device=cpu",
            "--threads=1",
            "--max-train-samples=64",
            "--max-eval-samples=32",
            "--probe-steps=4",
        ]
    else:
        import torch

        if not torch.cuda.is_available():
            sys.exit(
                "bench_gpu.py: no CUDA device; run bench_train.py, or --dry-run to check this script on CPU"
            )
        defaults = ["--device=cuda", "--bf16", "--epochs=2"]
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    argv = [d for d in defaults if d.split("=", 1)[0] not in given] + argv
    result = bench_train.main(argv, script=__file__)
    if result is None:
        return None
    print()
    for arm, row in result["arms"].items():
        gpu = row.get("gpu_peak_allocated_mib")
        if gpu is not None:
            print(
                f"{arm:<20} GPU peak allocated {gpu:,.0f} MiB, "
                f"reserved {row['gpu_peak_reserved_mib']:,.0f} MiB; "
                f"{row['real_tokens_per_s']:,.0f} real tokens/s"
            )
    peak = result["ceiling"].get("peak_flops_per_s")
    if peak:
        mfu = result["derived"].get("peftkit_mfu")
        share = (mfu or 0) * result["ceiling"]["ceiling_flops_per_s"] / peak
        print(
            f"device peak ({result['ceiling']['dtype']} square GEMM): {peak / 1e12:.1f} TFLOP/s; "
            f"peftkit {share:.1%} of it"
        )
    return result


if __name__ == "__main__":
    main()
