"""Crash and resume: a run killed mid-epoch and resumed ends with the adapter of an uninterrupted run.

The runs are real ``peftkit finetune`` processes on a tiny BERT. To kill one at a known point, it runs
through a small driver that is ``python -m peftkit`` with a sleep added to each training step (sleeping
draws no random numbers, so it changes nothing else) and, for the half-written checkpoint case, a
SIGKILL of itself in the middle of writing a checkpoint.

Tolerance: adapter tensors and evaluation metrics must agree within atol 1e-5 (on this CPU they agree
exactly; resuming restores the weights, optimizer, scheduler and RNG states, and the data order).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_cli_seq_cls import write_split

pytestmark = pytest.mark.slow

ATOL = 1e-5
STEPS_PER_EPOCH = 8  # 64 training examples, batch 8
EPOCHS = 3
SAVE_STEPS = 3  # checkpoints at 3, 6, 9, 12, 15, ...: most of them mid-epoch

RECIPE = """
[model]
name_or_path = "{model}"

[task]
type = "seq_cls"
max_length = 32

[data]
train_file = "train.csv"
validation_file = "validation.csv"
test_file = "test.csv"

[adapter]
r = 4
alpha = 8
dropout = 0.1  # dropout makes the result depend on the RNG states a resume must restore

[train]
num_train_epochs = {epochs}
per_device_train_batch_size = 8
learning_rate = 2e-3
logging_steps = 2
eval_strategy = "epoch"
save_strategy = "steps"
save_steps = {save_steps}
save_total_limit = 2
load_best_model_at_end = false  # the final adapter is the last one trained
report_to = "none"
disable_tqdm = true
output_dir = "{out}"
"""

DRIVER = '''"""`python -m peftkit`, slower per training step; optionally dying while writing a checkpoint."""
import os
import runpy
import signal
import time

import transformers

delay = float(os.environ.get("SLOW_STEP_S", "0"))
die_at = int(os.environ.get("DIE_WRITING_CHECKPOINT", "0"))
training_step = transformers.Trainer.training_step


def slow_training_step(self, *args, **kwargs):
    time.sleep(delay)
    return training_step(self, *args, **kwargs)


transformers.Trainer.training_step = slow_training_step
if die_at:
    save_rng_state = transformers.Trainer._save_rng_state

    def die_while_saving(self, output_dir):
        if self.state.global_step == die_at:  # adapter and optimizer are written; RNG and trainer_state not
            os.kill(os.getpid(), signal.SIGKILL)
        return save_rng_state(self, output_dir)

    transformers.Trainer._save_rng_state = die_while_saving
runpy.run_module("peftkit", run_name="__main__", alter_sys=True)
'''


def cli_env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def run_cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peftkit", *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def make_workspace(folder: Path, model: Path, name: str = "run") -> Path:
    """Data, the recipe (writing to ``folder/name``) and the driver; returns the recipe path."""
    folder.mkdir(parents=True, exist_ok=True)
    write_split(folder / "train.csv", STEPS_PER_EPOCH * 8, 0)
    write_split(folder / "validation.csv", 16, 1)
    write_split(folder / "test.csv", 16, 2)
    (folder / "driver.py").write_text(DRIVER)
    recipe = folder / "recipe.toml"
    recipe.write_text(RECIPE.format(model=model, out=folder / name, epochs=EPOCHS, save_steps=SAVE_STEPS))
    return recipe


def start_driver(recipe: Path, **env: str) -> subprocess.Popen[str]:
    logs = recipe.parent / "driver.log"
    return subprocess.Popen(
        [sys.executable, str(recipe.parent / "driver.py"), "finetune", str(recipe)],
        cwd=recipe.parent,
        env=cli_env(**env),
        stdout=logs.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 300) -> None:
    """Until ``path`` exists; fails if the process ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            log = (path.parents[1].parent / "driver.log").read_text()[-3000:]
            pytest.fail(f"the run ended (code {process.returncode}) before {path} appeared:\n{log}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def reference_run(tmp_path_factory: pytest.TempPathFactory, model: Path) -> Path:
    """An uninterrupted run of the recipe; built once per session and shared by the resume tests."""
    folder = tmp_path_factory.getbasetemp() / "resume-reference"
    run_dir = folder / "run"
    if not (run_dir / "metrics.json").is_file():
        recipe = make_workspace(folder, model)
        result = run_cli("finetune", str(recipe), cwd=folder)
        assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def adapter(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_result(resumed: Path, reference: Path) -> None:
    """Adapter tensors, evaluation metrics and the per-epoch evaluation history agree within ATOL."""
    import torch

    mine, theirs = adapter(resumed), adapter(reference)
    assert sorted(mine) == sorted(theirs)
    for name in theirs:
        torch.testing.assert_close(
            mine[name], theirs[name], atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}"
        )
    resumed_metrics = json.loads((resumed / "metrics.json").read_text())
    reference_metrics = json.loads((reference / "metrics.json").read_text())
    for split in ("validation", "test"):
        for key, value in reference_metrics[split].items():
            if "runtime" in key or "per_second" in key:
                continue
            assert resumed_metrics[split][key] == pytest.approx(value, abs=ATOL), (split, key)

    def evaluations(run_dir: Path) -> list[tuple[float, float]]:
        history = json.loads((run_dir / "log_history.json").read_text())
        return [(e["epoch"], e["eval_loss"]) for e in history if "eval_loss" in e]

    assert len(evaluations(resumed)) == EPOCHS
    for (epoch, loss), (ref_epoch, ref_loss) in zip(
        evaluations(resumed), evaluations(reference), strict=True
    ):
        assert epoch == ref_epoch and loss == pytest.approx(ref_loss, abs=ATOL)


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path
) -> None:
    reference = reference_run(tmp_path_factory, tiny_bert_dir)
    recipe = make_workspace(tmp_path, tiny_bert_dir)
    run_dir = tmp_path / "run"
    # wait for checkpoint-12, mid second epoch (steps 9-16), then kill without warning
    process = start_driver(recipe, SLOW_STEP_S="0.3")
    wait_for(run_dir / "checkpoint-12" / "trainer_state.json", process)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL

    from peftkit.runs import newest_valid_checkpoint

    checkpoint = newest_valid_checkpoint(run_dir, log=False)
    assert checkpoint is not None and step_of(checkpoint) >= 12
    assert step_of(checkpoint) % STEPS_PER_EPOCH != 0, "the kill must land mid-epoch"
    meta = json.loads((run_dir / "peftkit_run.json").read_text())
    assert meta["status"] == "running" and meta["pid"] == process.pid
    assert not (run_dir / "adapter_model.safetensors").exists()

    # commands that need a finished run refuse it, naming the checkpoint that could be used instead
    (tmp_path / "in.jsonl").write_text('{"text": "win free cash"}\n')
    for command in (
        ["merge", str(run_dir), "--out", "merged"],
        ["predict", str(run_dir), "--input", "in.jsonl", "--output", "out.jsonl"],
        ["evaluate", str(run_dir)],
    ):
        refused = run_cli(*command, cwd=tmp_path)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert (
            f"error: {run_dir}: the run did not finish: its status is still 'running' but its process "
            f"(pid {process.pid}) is gone, so it was killed or crashed; its last good checkpoint is "
            f"{checkpoint} (usable in place of the final adapter, e.g. `peftkit merge {run_dir} --checkpoint "
            f"{checkpoint.name} --out <folder>`). Finish it with `peftkit finetune {recipe} --resume`"
        ) in refused.stderr, command
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "merged").exists()

    resumed = run_cli("finetune", str(recipe), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint}" in resumed.stderr
    assert_same_result(run_dir, reference)
    meta = json.loads((run_dir / "peftkit_run.json").read_text())
    assert meta["status"] == "completed" and meta["error"] is None
    assert meta["resumes"] == [
        {"at": meta["resumes"][0]["at"], "from_checkpoint": str(checkpoint), "previous_status": "running"}
    ]
    assert json.loads((run_dir / "metrics.json").read_text())["resumed_from"] == str(checkpoint)


def test_half_written_checkpoint_is_skipped_and_resume_still_matches(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path
) -> None:
    reference = reference_run(tmp_path_factory, tiny_bert_dir)
    recipe = make_workspace(tmp_path, tiny_bert_dir)
    run_dir = tmp_path / "run"
    died = start_driver(recipe, DIE_WRITING_CHECKPOINT="15")
    assert died.wait(timeout=600) == -signal.SIGKILL
    partial = run_dir / "checkpoint-15"
    assert (partial / "adapter_model.safetensors").is_file() and (partial / "optimizer.pt").is_file()
    assert not (partial / "trainer_state.json").exists()

    resumed = run_cli("finetune", str(recipe), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"skipping {partial}: no trainer_state.json (the Trainer writes it last); it was being written "
        "when the run stopped, so it cannot be trusted"
    ) in resumed.stderr
    assert f"moved it to {run_dir / 'incomplete-checkpoint-15'}" in resumed.stderr
    assert f"resuming from {run_dir / 'checkpoint-12'}" in resumed.stderr
    assert (run_dir / "incomplete-checkpoint-15" / "optimizer.pt").is_file()
    assert_same_result(run_dir, reference)


def test_resume_auto_in_the_recipe_and_a_changed_recipe(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path
) -> None:
    """``[train] resume = "auto"`` resumes without the flag; a recipe whose data changed is refused."""
    reference = reference_run(tmp_path_factory, tiny_bert_dir)
    recipe = make_workspace(tmp_path, tiny_bert_dir)
    run_dir = tmp_path / "run"
    died = start_driver(recipe, DIE_WRITING_CHECKPOINT="18")
    assert died.wait(timeout=600) == -signal.SIGKILL

    plain = run_cli("finetune", str(recipe), cwd=tmp_path)
    assert plain.returncode == 2 and "a run already exists there. Nothing was changed." in plain.stderr
    changed = run_cli(
        "finetune", str(recipe), "--resume", "--set", "data.test_file=validation.csv", cwd=tmp_path
    )
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert (
        f"error: {run_dir}: cannot resume: the recipe changed since this run started (data.test_file)"
    ) in changed.stderr

    auto = run_cli("finetune", str(recipe), "--set", 'train.resume="auto"', cwd=tmp_path)
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoint-15'}" in auto.stderr
    assert_same_result(run_dir, reference)
