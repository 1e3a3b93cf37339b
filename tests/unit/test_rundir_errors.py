"""The run directory under damage: half-written checkpoints, corrupted files, dead processes, signals.

No model is trained here: checkpoints and run folders are built by hand, file by file, so that each
damage has its exact message.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from peftkit import runs
from peftkit.errors import RunDirError
from peftkit.lifecycle import StopRequest, stop_requests
from peftkit.trainer import save_and_stop_callback


def write_adapter(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"lora_A.weight": torch.zeros(4, 8)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))


def make_checkpoint(run_dir: Path, step: int) -> Path:
    """A checkpoint as the Trainer writes it: adapter, optimizer, scheduler, RNG, trainer_state.json last."""
    import torch

    folder = run_dir / f"checkpoint-{step}"
    write_adapter(folder)
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"cpu": torch.zeros(3)}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return folder


def make_run(tmp_path: Path, status: str = "completed", **meta: Any) -> Path:
    run_dir = tmp_path / "run"
    write_adapter(run_dir)
    record = {"status": status, "recipe": {}, "recipe_source": "recipes/r.toml", **meta}
    (run_dir / "peftkit_run.json").write_text(json.dumps(record))
    return run_dir


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# --------------------------------------------------------------------------------------------------
# Checkpoints


def test_a_complete_checkpoint_is_valid(tmp_path: Path) -> None:
    assert runs.checkpoint_problem(make_checkpoint(tmp_path, 4)) is None


HEADER_PAST_END = (
    "adapter_model.safetensors is corrupted or truncated (its header runs past the end of the file)"
)
DAMAGES = {
    "no trainer_state.json (the Trainer writes it last)": lambda c: (c / "trainer_state.json").unlink(),
    "trainer_state.json is unreadable": lambda c: truncate(c / "trainer_state.json", 12),
    "trainer_state.json has no global_step": lambda c: (c / "trainer_state.json").write_text("{}"),
    "no adapter_config.json": lambda c: (c / "adapter_config.json").unlink(),
    "adapter_config.json is unreadable": lambda c: truncate(c / "adapter_config.json", 5),
    "adapter_model.safetensors is missing": lambda c: (c / "adapter_model.safetensors").unlink(),
    "adapter_model.safetensors is truncated (too short to be a safetensors file)": lambda c: truncate(
        c / "adapter_model.safetensors", 5
    ),
    "adapter_model.safetensors is corrupted (not a safetensors file: unreadable header)": lambda c: (
        c / "adapter_model.safetensors"
    ).write_bytes((5).to_bytes(8, "little") + b"nope!"),
    HEADER_PAST_END: lambda c: truncate(c / "adapter_model.safetensors", 40),
    "no optimizer.pt": lambda c: (c / "optimizer.pt").unlink(),
    "optimizer.pt is truncated or corrupted": lambda c: truncate(c / "optimizer.pt", 100),
    "no scheduler.pt": lambda c: (c / "scheduler.pt").unlink(),
    "rng_state.pth is truncated or corrupted": lambda c: truncate(c / "rng_state.pth", 50),
}


@pytest.mark.parametrize("expected", list(DAMAGES))
def test_each_half_written_checkpoint_is_named(tmp_path: Path, expected: str) -> None:
    checkpoint = make_checkpoint(tmp_path, 4)
    DAMAGES[expected](checkpoint)
    assert runs.checkpoint_problem(checkpoint) == expected


def test_safetensors_cut_short_in_its_data(tmp_path: Path) -> None:
    write_adapter(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    size = path.stat().st_size
    truncate(path, size - 10)
    assert runs.safetensors_problem(path) == f"truncated ({size - 10} of {size} bytes)"


def test_newest_valid_checkpoint_skips_broken_ones_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for step in (9, 10, 12):
        make_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-12" / "trainer_state.json").unlink()  # died while writing it
    (tmp_path / "incomplete-checkpoint-99").mkdir()  # set aside earlier: not a checkpoint
    (tmp_path / "checkpoint-x").mkdir()
    with caplog.at_level(logging.WARNING, logger="peftkit.runs"):
        found = runs.newest_valid_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoint-10"  # numeric order: 10 is newer than 9
    assert (
        f"skipping {tmp_path / 'checkpoint-12'}: no trainer_state.json (the Trainer writes it last); "
        "it was being written when the run stopped, so it cannot be trusted"
    ) in caplog.text
    assert (tmp_path / "checkpoint-12").is_dir(), "without set_aside nothing is renamed"


def test_set_aside_renames_incomplete_checkpoints_and_keeps_them(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 3)
    broken = make_checkpoint(tmp_path, 6)
    truncate(broken / "optimizer.pt", 10)
    (tmp_path / "incomplete-checkpoint-6").mkdir()  # from an earlier crash at the same step
    assert runs.newest_valid_checkpoint(tmp_path, set_aside=True) == tmp_path / "checkpoint-3"
    assert not broken.exists()
    assert (tmp_path / "incomplete2-checkpoint-6" / "adapter_model.safetensors").is_file()
    assert runs.list_checkpoints(tmp_path) == [tmp_path / "checkpoint-3"]


def test_no_valid_checkpoint_at_all(tmp_path: Path) -> None:
    (make_checkpoint(tmp_path, 2) / "scheduler.pt").unlink()
    assert runs.newest_valid_checkpoint(tmp_path, log=False) is None
    assert runs.newest_valid_checkpoint(tmp_path / "absent", log=False) is None


# --------------------------------------------------------------------------------------------------
# Run status


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_run_is_named_as_such_with_its_last_good_checkpoint(tmp_path: Path) -> None:
    pid = dead_pid()
    run_dir = make_run(tmp_path, status="running", pid=pid, host=socket.gethostname())
    make_checkpoint(run_dir, 5)
    (make_checkpoint(run_dir, 10) / "trainer_state.json").unlink()
    with pytest.raises(RunDirError) as info:
        runs.check_complete(run_dir)
    assert str(info.value) == (
        f"{run_dir}: the run did not finish: its status is still 'running' but its process (pid {pid}) is "
        f"gone, so it was killed or crashed; its last good checkpoint is {run_dir / 'checkpoint-5'} (usable "
        f"in place of the final adapter, e.g. `peftkit merge {run_dir} --checkpoint checkpoint-5 --out "
        "<folder>`). Finish it with `peftkit finetune recipes/r.toml --resume`"
    )


def test_an_interrupted_or_failed_run_is_refused(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, status="interrupted", error="stopped by SIGTERM at step 7 of 24")
    make_checkpoint(run_dir, 7)
    with pytest.raises(RunDirError) as info:
        runs.check_complete(run_dir)
    assert str(info.value) == (
        f"{run_dir}: the run is 'interrupted' (stopped by SIGTERM at step 7 of 24), not completed; its last "
        f"good checkpoint is {run_dir / 'checkpoint-7'} (usable in place of the final adapter, e.g. `peftkit "
        f"merge {run_dir} --checkpoint checkpoint-7 --out <folder>`). Finish it with `peftkit finetune "
        "recipes/r.toml --resume`"
    )
    failed = make_run(tmp_path / "f", status="failed", error="RuntimeError: boom")
    with pytest.raises(
        RunDirError, match=r"the run is 'failed' \(RuntimeError: boom\), not completed; it has "
    ):
        runs.check_complete(failed)
    # a checkpoint of the run may be used explicitly, even though the run did not finish
    assert runs.check_complete(run_dir, adapter_dir=run_dir / "checkpoint-7")["status"] == "interrupted"


def test_a_running_run_on_another_machine_is_not_called_dead(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, status="running", pid=dead_pid(), host="elsewhere")
    with pytest.raises(RunDirError, match=r"still 'running' \(training now, or killed on another machine\)"):
        runs.check_complete(run_dir)


BROKEN_RUN = {
    "adapter_model.bin": lambda r: (r / "adapter_model.safetensors").rename(r / "adapter_model.bin"),
    "adapter_model.safetensors": lambda r: truncate(r / "adapter_model.safetensors", 3),
    "adapter_config.json": lambda r: (r / "adapter_config.json").write_text('{"r": 4}'),
    "peftkit_run.json": lambda r: (r / "peftkit_run.json").write_text('["completed"]'),
}
BROKEN_MESSAGES = {
    "adapter_model.bin": "refused: adapter weights in pickle format can run arbitrary code when loaded, and "
    "peftkit loads only adapter_model.safetensors. Re-run finetune, or convert a file you trust with "
    "safetensors.torch.save_file",
    "adapter_model.safetensors": "truncated (too short to be a safetensors file); re-run finetune",
    "adapter_config.json": "corrupted (no 'peft_type' entry); re-run the step that wrote it",
    "peftkit_run.json": "corrupted (expected a JSON object, found list); re-run the step that wrote it",
}


@pytest.mark.parametrize("name", list(BROKEN_RUN))
def test_broken_run_files_are_named(tmp_path: Path, name: str) -> None:
    run_dir = make_run(tmp_path)
    runs.check_complete(run_dir)  # whole before the damage
    BROKEN_RUN[name](run_dir)
    with pytest.raises(RunDirError) as info:
        runs.check_complete(run_dir)
    assert str(info.value) == f"{run_dir / name}: {BROKEN_MESSAGES[name]}"


def test_unreadable_json_files(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(b'{"a": "caf\xe9"}')
    with pytest.raises(RunDirError, match=rf"^{path}: corrupted \(not UTF-8 text\); re-run the step"):
        runs.read_json(path)
    path.write_text('{"labels": ["a",')
    with pytest.raises(RunDirError, match=rf"^{path}:1: corrupted JSON \(Expecting value\)"):
        runs.read_json(path)
    path.write_text('{"labels": "a"}')
    with pytest.raises(RunDirError, match=rf"^{path}: corrupted \('labels' is a str\)"):
        runs.read_json_object(path, {"labels": (list, type(None))})


# --------------------------------------------------------------------------------------------------
# Resuming


def test_resume_refuses_a_changed_recipe_and_a_live_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stored = {"model": {"name_or_path": "m"}, "data": {"train_file": "/a.csv"}, "train": {"seed": 1}}
    run_dir = make_run(tmp_path, status="interrupted", recipe=stored)
    same = json.loads(json.dumps(stored))
    assert runs.check_resumable(run_dir, same) is not None
    changed = {**same, "data": {"train_file": "/b.csv"}, "adapter": {"r": 8}}
    with pytest.raises(RunDirError) as info:
        runs.check_resumable(run_dir, changed)
    assert str(info.value) == (
        f"{run_dir}: cannot resume: the recipe changed since this run started (data.train_file, adapter.r); "
        "a resumed run must train the same model on the same data. Undo the change, use --overwrite to "
        "start over, or set another train.output_dir"
    )
    with caplog.at_level(logging.WARNING, logger="peftkit.runs"):
        runs.check_resumable(run_dir, {**same, "train": {"seed": 1, "num_train_epochs": 5}})
    assert "resuming with changed [train] keys train.num_train_epochs" in caplog.text

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = make_run(tmp_path / "l", status="running", pid=sleeper.pid, host=socket.gethostname())
        with pytest.raises(RunDirError, match=rf"another process \(pid {sleeper.pid}\) is training this run"):
            runs.check_resumable(live, {})
    finally:
        sleeper.kill()
        sleeper.wait()
    assert runs.check_resumable(live, {}) is not None  # the process is gone: the run may be resumed
    assert runs.check_resumable(tmp_path / "nothing-yet", {}) is None


def test_overwrite_refuses_a_run_a_live_process_is_training(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = make_run(tmp_path / "l", status="running", pid=sleeper.pid, host=socket.gethostname())
        with pytest.raises(
            RunDirError, match=rf"pid {sleeper.pid}\) is training this run.*then overwrite it"
        ):
            runs.prepare_run_dir(live, overwrite=True, resume=False)
        assert (live / runs.RUN_META).is_file()  # nothing was removed
    finally:
        sleeper.kill()
        sleeper.wait()
    runs.prepare_run_dir(live, overwrite=True, resume=False)  # the process is gone: overwrite proceeds
    assert live.is_dir() and not any(live.iterdir())
    garbled = tmp_path / "g"
    garbled.mkdir()
    (garbled / runs.RUN_META).write_text("{not json")
    runs.prepare_run_dir(garbled, overwrite=True, resume=False)  # an unreadable record does not block it
    assert not any(garbled.iterdir())


def test_overwrite_never_removes_a_folder_peftkit_did_not_write(tmp_path: Path) -> None:
    """train.output_dir follows the rule of merge and export outputs: --overwrite replaces peftkit's only."""
    from peftkit.outputs import OutputError

    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match=r"was not written by peftkit.*choose another train.output_dir"):
        runs.prepare_run_dir(precious, overwrite=True, resume=False)
    with pytest.raises(RunDirError, match=r"a run already exists there\. Nothing was changed"):
        runs.prepare_run_dir(precious, overwrite=False, resume=False)
    assert (precious / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"train.output_dir .*: exists and is a file"):
        runs.prepare_run_dir(tmp_path / "file", overwrite=False, resume=True)
    runs.prepare_run_dir(precious, overwrite=False, resume=True)  # --resume keeps what is there
    assert (precious / "thesis.tex").is_file()


def test_completed_runs_are_told_from_unfinished_and_broken_ones(tmp_path: Path) -> None:
    done = make_run(tmp_path / "d")
    (done / runs.METRICS).write_text(json.dumps({"validation": {"f1": 0.5}}))
    completed = runs.read_completed(done)
    assert completed is not None and completed[1] == {"validation": {"f1": 0.5}}
    running = make_run(tmp_path / "r", status="running")
    (running / runs.METRICS).write_text("{}")
    assert runs.read_completed(running) is None
    (done / runs.METRICS).write_text("{cut sho")
    assert runs.read_completed(done) is None
    assert runs.read_completed(tmp_path / "nothing") is None


def test_resume_refuses_checkpoints_without_optimizer_state(tmp_path: Path) -> None:
    from peftkit.lifecycle import resume_checkpoint
    from peftkit.recipe import recipe_from_dict

    (tmp_path / "model").mkdir()
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\n")
    raw = {
        "model": {"name_or_path": "./model"},
        "task": {"type": "seq_cls"},
        "data": {"train_file": "train.csv"},
        "train": {"save_only_model": True, "output_dir": str(tmp_path / "run")},
    }
    recipe = recipe_from_dict(raw, base_dir=tmp_path)
    with pytest.raises(RunDirError, match=r"cannot resume: train.save_only_model = true keeps no optimizer"):
        resume_checkpoint(recipe, tmp_path / "run", main=True)


def test_training_batches_depend_only_on_seed_and_epoch() -> None:
    """A run resumed in epoch 2 must see epoch 2's batches although it never replayed epoch 1's randomness."""
    import torch

    from peftkit.batching import ShuffledLengthGroupedSampler

    lengths = [5 + (i * 37) % 50 for i in range(64)]
    uninterrupted = ShuffledLengthGroupedSampler(lengths, 8, seed=42)
    epochs = []
    for epoch in range(3):
        uninterrupted.set_epoch(epoch)
        torch.rand(100)  # dropout, evaluation, ... draw from the global RNG between epochs
        epochs.append(list(uninterrupted))
    resumed = ShuffledLengthGroupedSampler(lengths, 8, seed=42)
    resumed.set_epoch(2)
    assert list(resumed) == epochs[2]
    assert epochs[0] != epochs[1] != epochs[2]  # still reshuffled every epoch
    assert sorted(epochs[2]) == list(range(64))
    other_seed = ShuffledLengthGroupedSampler(lengths, 8, seed=43)
    other_seed.set_epoch(2)
    assert list(other_seed) != epochs[2]


# --------------------------------------------------------------------------------------------------
# Atomic writes


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.json"
    runs.write_json_atomic(path, {"old": 1})

    def broken_replace(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        runs.write_json_atomic(path, {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_staging_publishes_whole_files_and_cleans_up(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "plots").mkdir(parents=True)
    (run_dir / "plots" / "loss.png").write_text("old")
    with runs.staging_dir(run_dir) as stage:
        (stage / "plots").mkdir()
        (stage / "plots" / "loss.png").write_text("new")
        (stage / "adapter_config.json").write_text("{}")
        published = runs.publish(stage, run_dir)
    assert sorted(p.relative_to(run_dir).as_posix() for p in published) == [
        "adapter_config.json",
        "plots/loss.png",
    ]
    assert (run_dir / "plots" / "loss.png").read_text() == "new"
    assert not (run_dir / runs.STAGING).exists()


# --------------------------------------------------------------------------------------------------
# Signals


def test_a_signal_during_training_only_raises_the_flag() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with stop_requests() as stop:
        stop.training = True
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # no exception: the Trainer finishes the step and saves
        with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_outside_training_stops_at_once() -> None:
    with stop_requests() as stop, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signum == signal.SIGTERM


def test_the_callback_saves_and_stops_without_an_extra_evaluation() -> None:
    from transformers import TrainerControl

    request = StopRequest()
    callback = save_and_stop_callback(request)
    control = TrainerControl()
    state = SimpleNamespace(epoch=1.5, global_step=12)
    callback.on_step_end(None, state, control)
    assert not control.should_training_stop  # no signal yet
    request.signum = signal.SIGTERM
    callback.on_step_end(None, state, control)
    assert control.should_training_stop
    control.should_evaluate = control.should_log = True  # what eval_strategy="epoch" asks at epoch end
    callback.on_epoch_end(None, state, control)
    assert control.should_save and not control.should_evaluate and not control.should_log
    at_epoch_end = TrainerControl(should_evaluate=True)
    callback.on_epoch_end(None, SimpleNamespace(epoch=2.0, global_step=16), at_epoch_end)
    assert at_epoch_end.should_save and at_epoch_end.should_evaluate  # a real epoch end keeps its evaluation
