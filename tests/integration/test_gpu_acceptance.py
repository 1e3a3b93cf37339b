"""scripts/gpu_acceptance.py --dry-run: the GPU acceptance run's code, on CPU with tiny models, so that it
cannot rot between GPU visits. Every part is reported, ok or skipped with its reason; the JSON and the
markdown table agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_acceptance.py"
PARTS = (
    "bf16_seq_cls",
    "bf16_smollm2_seq2seq",
    "qlora_smollm2_merge",
    "plan_vs_measured_1b",
    "mfu_lora_1b",
    "deepspeed_zero2",
    "deepspeed_zero3",
)


def test_dry_run_reports_every_part(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "acceptance.json").read_text())
    assert report["dry_run"] is True and report["device"] == "cpu"
    assert tuple(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert part["status"] in ("ok", "skipped"), (name, part.get("error"), part.get("traceback"))
        if part["status"] == "skipped":
            assert part["reason"], name
    parts = report["parts"]
    # figures the GPU run will report, present on CPU too
    for name in ("bf16_seq_cls", "bf16_smollm2_seq2seq", "qlora_smollm2_merge"):
        result = parts[name]["result"]
        assert result["real_tokens_per_s"] > 0 and result["step_p50_s"] > 0, name
        assert result["final_metric"], name
    assert parts["qlora_smollm2_merge"]["result"]["merge_parity"]["status"] == "passed"
    plan = parts["plan_vs_measured_1b"]["result"]
    assert {(r["arm"], r["batch"], r["length"]) for r in plan["rows"]} == {
        (arm, b, s) for arm in ("lora", "lora+checkpointing", "qlora") for b, s in ((2, 16), (2, 32), (1, 64))
    }
    assert all(r["plan_mib"] > 0 and "error" not in r for r in plan["rows"])
    assert "not yet checked against a GPU measurement" in plan["calibration"]
    assert 0 < parts["mfu_lora_1b"]["result"]["mfu"] < 1
    for stage in ("deepspeed_zero2", "deepspeed_zero3"):
        assert parts[stage]["status"] == "skipped" and "DeepSpeed" in parts[stage]["reason"]
    table = (tmp_path / "acceptance.md").read_text()
    assert table.startswith("# GPU acceptance (dry run on CPU)")
    for name in PARTS:
        status = parts[name]["status"]
        assert f"| {name} | {status} |" in table
    assert "| qlora | 1 x 64 |" in table
    assert seconds < 240  # the script's own figure is < 2 minutes on an idle 2-core machine
    assert report["seconds"] < 180
