"""A failing rank ends a 2-process job within a minute with a message, instead of hanging."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.distributed.conftest import SAMPLE, launch, launch_env, sets
from tests.distributed.test_launchers import COMMANDS

pytestmark = pytest.mark.distributed

DEADLINE_S = 60


def test_bad_data_ends_a_deepspeed_job_with_the_message(
    tiny_bert_without_dropout: Path, tmp_path: Path, deepspeed_ops: float
) -> None:
    """Rank 0 reads the data first (the others wait at a barrier) and stops: train.csv has no label."""
    data = tmp_path / "data"
    shutil.copytree(REPO / "data" / "sms_spam", data)
    train = data / "train.csv"
    train.write_text(train.read_text().replace("text,label", "text,category", 1))  # no label column
    done = launch(
        COMMANDS["zero2"],
        *sets(
            *SAMPLE,
            f"model.name_or_path='{tiny_bert_without_dropout}'",
            f"data.dataset='{data}'",
            f"train.output_dir='{tmp_path / 'run'}'",
        ),
        timeout=DEADLINE_S + 60,
    )
    print(f"bad data: job ended after {done.seconds:.1f} s (rc {done.returncode})")
    assert done.returncode != 0
    assert "error:" in done.output and "label" in done.output, done.output[-3000:]
    assert done.seconds < DEADLINE_S


def test_killed_rank_ends_a_torchrun_job(tiny_bert_without_dropout: Path, tmp_path: Path) -> None:
    """SIGKILL one of 2 ranks during training: the launcher stops the other and reports which rank died."""
    run_dir = tmp_path / "run"
    argv = [
        *COMMANDS["ddp_rendezvous"].split(),
        *sets(
            f"model.name_or_path='{tiny_bert_without_dropout}'",
            "data.max_train_samples=4000",
            "train.num_train_epochs=5",
            "train.per_device_train_batch_size=8",
            f"train.output_dir='{run_dir}'",
        ),
    ]
    job = subprocess.Popen(
        argv,
        cwd=REPO,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []

    def read() -> None:
        for line in job.stdout or []:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        victim = wait_for_training_rank(job.pid, rank=1, lines=lines, timeout=120)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        job.wait(timeout=DEADLINE_S + 30)
        ended = time.monotonic() - killed
        reader.join(timeout=10)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    output = "".join(lines)
    status = json.loads((run_dir / "peftkit_run.json").read_text())["status"]
    print(f"killed rank: job ended {ended:.1f} s after the kill (rc {job.returncode}); run status {status!r}")
    assert job.returncode != 0
    assert "SIGKILL" in output or "Signal 9" in output, output[-3000:]
    assert ended < DEADLINE_S
    assert status != "completed"


def wait_for_training_rank(launcher: int, rank: int, lines: list[str], timeout: float) -> int:
    """The pid of the launcher's child with RANK=rank, once training has logged its first loss."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("'loss'" in line for line in list(lines)):
            for pid in descendants(launcher):
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ:
                    return pid
        time.sleep(0.2)
    raise AssertionError(
        f"rank {rank} did not log a training loss within {timeout} s: {''.join(lines)[-2000:]}"
    )


def descendants(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found = [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in found:
            children += [child, *descendants(child)]
    return children
