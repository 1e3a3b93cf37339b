"""SIGTERM and SIGINT during training: a checkpoint, a clean exit (143/130), a resume hint, status
``interrupted``; the resumed run ends with the adapter of an uninterrupted one."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from peftkit.runs import checkpoint_problem
from tests.integration.test_resume import (
    EPOCHS,
    STEPS_PER_EPOCH,
    assert_same_result,
    make_workspace,
    reference_run,
    run_cli,
    start_driver,
    wait_for,
)

pytestmark = pytest.mark.slow
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH


def interrupt(recipe: Path, signum: int) -> tuple[int, str, int]:
    """Start the run, send ``signum`` in its second epoch; returns (exit code, output, step it stopped at)."""
    run_dir = recipe.parent / "run"
    process = start_driver(recipe, SLOW_STEP_S="0.3")
    wait_for(run_dir / "checkpoint-9" / "trainer_state.json", process)
    process.send_signal(signum)
    code = process.wait(timeout=120)
    output = (recipe.parent / "driver.log").read_text()
    found = re.search(
        rf"training stopped by {signal.Signals(signum).name} at step (\d+) of {TOTAL_STEPS}", output
    )
    assert found, output[-3000:]
    return code, output, int(found.group(1))


def test_sigterm_saves_a_checkpoint_exits_143_and_resumes_exactly(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path
) -> None:
    reference = reference_run(tmp_path_factory, tiny_bert_dir)
    recipe = make_workspace(tmp_path, tiny_bert_dir)
    run_dir = tmp_path / "run"
    code, output, step = interrupt(recipe, signal.SIGTERM)
    checkpoint = run_dir / f"checkpoint-{step}"

    assert code == 143
    assert "SIGTERM received: saving a checkpoint after this step, then stopping" in output
    assert (
        f"error: training stopped by SIGTERM at step {step} of {TOTAL_STEPS}; its last checkpoint is "
        f"{checkpoint}. Resume with: peftkit finetune {recipe} --resume"
    ) in output
    assert "Traceback" not in output
    assert checkpoint_problem(checkpoint) is None
    assert 9 < step < 2 * STEPS_PER_EPOCH, "stopped in the second epoch, right after the signal"
    meta = json.loads((run_dir / "peftkit_run.json").read_text())
    assert meta["status"] == "interrupted"
    assert meta["error"] == f"stopped by SIGTERM at step {step} of {TOTAL_STEPS}"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == step
    # no evaluation was run (or logged) for the mid-epoch stop: an uninterrupted run has none there
    assert [e["epoch"] for e in state["log_history"] if "eval_loss" in e] == [1.0]

    resumed = run_cli("finetune", str(recipe), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint}" in resumed.stderr
    assert_same_result(run_dir, reference)


def test_sigint_exits_130_with_the_resume_hint(tmp_path: Path, tiny_bert_dir: Path) -> None:
    recipe = make_workspace(tmp_path, tiny_bert_dir)
    code, output, step = interrupt(recipe, signal.SIGINT)
    assert code == 130
    assert (
        f"error: training stopped by SIGINT at step {step} of {TOTAL_STEPS}; its last checkpoint is "
        f"{tmp_path / 'run' / f'checkpoint-{step}'}. Resume with: peftkit finetune {recipe} --resume"
    ) in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert json.loads((tmp_path / "run" / "peftkit_run.json").read_text())["status"] == "interrupted"
