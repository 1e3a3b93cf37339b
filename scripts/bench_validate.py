"""What a fresh ``peftkit validate`` process costs, per hostile recipe case (tests/hostile/test_recipes.py).

Each case's recipe points at a tiny BERT folder without weights (config and tokenizer only), as in the test,
and runs in its own ``python -m peftkit validate`` process, so every import is paid. Prints one row per case
(exit code, wall seconds, CPU seconds of the process) and the load average before and after, plus a clean
recipe (every check passes: the most validate does). The goal of issue 19 is under 15 s wall per case.

    .venv/bin/python scripts/bench_validate.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.hostile.test_recipes import CASES, _recipe, write_models  # noqa: E402


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (the fastest is shown)")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = write_models(root)
        bare, train = models["bare"], models["train"]
        cases = [*CASES, ("clean recipe (every check passes)", {}, "", [], [])]
        load_before = os.getloadavg()
        rows = []
        for name, edit, raw, sets, _ in cases:
            recipe = root / f"{len(rows)}.toml"
            recipe.write_text(_recipe(bare, train, edit, raw))
            command = [sys.executable, "-m", "peftkit", "validate", str(recipe)]
            command += [arg for value in sets for arg in ("--set", value)]
            best: tuple[float, float, int] | None = None
            for _ in range(args.repeat):
                cpu0, wall0 = _children_cpu(), time.perf_counter()
                code = subprocess.run(command, cwd=root, env=env, capture_output=True).returncode
                sample = (time.perf_counter() - wall0, _children_cpu() - cpu0, code)
                best = sample if best is None or sample[0] < best[0] else best
            assert best is not None
            rows.append((name, *best))
            print(f"  {name}: exit {best[2]}, {best[0]:.2f} s", file=sys.stderr, flush=True)
        load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} cores)")
    print("| case | exit | wall s | CPU s |")
    print("|---|---|---|---|")
    for name, wall, cpu, code in rows:
        print(f"| {name} | {code} | {wall:.2f} | {cpu:.2f} |")
    walls = [row[1] for row in rows[:-1]]
    median = sorted(walls)[len(walls) // 2]
    print(f"\n{len(walls)} hostile cases: wall max {max(walls):.2f} s, median {median:.2f} s;", end=" ")
    print(f"{sum(w < 15 for w in walls)} under 15 s")


if __name__ == "__main__":
    main()
