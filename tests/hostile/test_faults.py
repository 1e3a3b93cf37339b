"""Process faults (issue 19): a diverging run, two writers of one folder, a full disk, and a DeepSpeed
checkpoint that was not saved here. Tiny random BERT, a few steps each."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, invoke_cli
from tests.hostile.common import assert_clear_error
from tests.hostile.test_run_dirs import RECIPE

SMS = REPO / "data" / "sms_spam"


def write_recipe(folder: Path, model: Path, out: Path, extra: str = "") -> Path:
    recipe = folder / "sms.toml"
    text = RECIPE.format(model=model, data=SMS, out=out)
    recipe.write_text(text.replace("[train]\n", f"[train]\n{extra}"))
    return recipe


@pytest.mark.hostile("clear_error")
def test_infinite_learning_rate_is_refused_before_training(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """1e999 is inf in TOML: refused when the recipe is read, before a run directory exists."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_bert_dir, out)
    result = invoke_cli("finetune", str(recipe), "--set", "train.learning_rate=1e999")
    assert_clear_error(result, str(recipe), "train.learning_rate", "must be a finite number")
    assert not out.exists()


@pytest.mark.hostile("clear_error")
def test_diverged_run_ends_failed_naming_step_and_value(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """learning_rate = 1e4 trains into NaN: the run stops as failed, naming the step and the value."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_bert_dir, out)
    result = invoke_cli(
        "finetune", str(recipe), "--set", "train.learning_rate=1e4", "--set", "train.max_steps=40"
    )
    assert_clear_error(result, "training diverged at step", "nan")
    record = json.loads((out / "peftkit_run.json").read_text())
    assert record["status"] == "failed"
    assert "training diverged at step" in record["error"] and "nan" in record["error"]
    assert not (out / "metrics.json").exists()


HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from peftkit.outputs import output_lock
    with output_lock(Path(sys.argv[1])):
        print("held", flush=True)
        sys.stdin.read()
    """
)


def hold_lock(folder: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    from peftkit.recipe import load_recipe
    from peftkit.training import finetune

    work = tmp_path_factory.mktemp("faults")
    finetune(load_recipe(write_recipe(work, tiny_bert_dir, work / "run")))
    return work / "run"


@pytest.mark.hostile("clear_error")
@pytest.mark.parametrize("name", ["finetune", "merge", "export", "sweep", "cv"])
def test_second_writer_is_refused(tiny_bert_dir: Path, small_run: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_bert_dir, out)
    with recipe.open("a") as handle:  # sweep needs a [sweep] table
        handle.write('\n[sweep.space]\n"adapter.r" = {choice = [2, 4]}\n')
    args = {
        "finetune": ["finetune", str(recipe)],
        "merge": ["merge", str(small_run), "--out", str(out), "--samples", "4"],
        "export": ["export", str(small_run), "--out", str(out), "--samples", "4"],
        "sweep": ["sweep", str(recipe), "--trials", "1", "--out", str(out)],
        "cv": ["cv", str(recipe), "--folds", "2", "--out", str(out)],
    }[name]
    holder = hold_lock(out)
    try:
        result = invoke_cli(*args)
    finally:
        holder.communicate("")
    assert_clear_error(result, str(out), f"pid {holder.pid}", "is writing this folder")
    assert not out.exists() or not any(p for p in out.iterdir() if p.name != ".peftkit-reserve")


@pytest.mark.hostile("success")
def test_lock_of_a_dead_process_is_harmless(tmp_path: Path) -> None:
    """flock dies with its process: a killed holder leaves a lock file that the next writer just takes."""
    from peftkit.outputs import lock_path, output_lock

    out = tmp_path / "out"
    holder = hold_lock(out)
    holder.kill()
    holder.wait()
    assert lock_path(out).exists()
    with output_lock(out), output_lock(out):  # nested holds in one process are fine
        pass


def can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt || mount -t tmpfs tmpfs /tmp"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


@pytest.mark.hostile("clear_error")
def test_disk_full_during_finetune_is_one_message_and_failed(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """A real full disk: the run directory on a 600 KiB tmpfs (a private mount namespace, `unshare -rm`).
    Training fits; saving the adapter, config and tokenizer does not."""
    if not can_mount_tmpfs():
        pytest.skip("cannot mount a tmpfs here (unshare -rm refused); see test_disk_full_simulated_merge")
    disk = tmp_path / "disk"
    disk.mkdir()
    recipe = write_recipe(tmp_path, tiny_bert_dir, disk / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    script = (
        f"mount -t tmpfs -o size=600k tmpfs {disk} && "
        f"{sys.executable} -m peftkit finetune {recipe}; echo rc=$?; "
        f"cat {disk}/run/peftkit_run.json"
    )
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    printed, _, after = done.stdout.partition("rc=")
    output = printed + done.stderr  # what the command printed (the record after it keeps its traceback)
    assert after.startswith("2"), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "No space left on device" in output and str(disk / "run") in output, output[-3000:]
    record = json.loads(after[1:])
    assert record["status"] == "failed", record.get("status")


@pytest.mark.hostile("clear_error")
@pytest.mark.parametrize("name", ["merge", "export"])
def test_disk_full_simulated_merge_and_export(
    small_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """ENOSPC raised by the merged model's writer (simulated in-process: the error a full disk gives)."""
    import errno

    from transformers import PreTrainedModel

    def full(self: Any, folder: str, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "out"
    result = invoke_cli(name, str(small_run), "--out", str(out), "--samples", "4")
    assert_clear_error(result, "No space left on device", "model.safetensors", "free space")
    assert not out.exists()


@pytest.mark.hostile("clear_error")
def test_disk_full_simulated_predict(
    small_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails with ENOSPC and no file name (as a full disk does mid-write, simulated by
    failing fsync): the message names the output file."""
    import errno

    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "hello"}\n')
    out = tmp_path / "preds.jsonl"

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    result = invoke_cli("predict", str(small_run), "--input", str(texts), "--output", str(out))
    assert_clear_error(result, "No space left on device", str(out))
    assert not out.exists()


# --- DeepSpeed checkpoints: unpickled only when this machine's peftkit saved them ---


def deepspeed_checkpoint(run: Path, step: int = 2) -> Path:
    """Add DeepSpeed's part (``latest`` + ``global_step<N>/`` torch zip archives) to a checkpoint."""
    import torch

    checkpoint = run / f"checkpoint-{step}"
    states = checkpoint / f"global_step{step}"
    states.mkdir()
    torch.save({"optimizer": {}}, states / "mp_rank_00_optim_states.pt")
    torch.save({"module": {}}, states / "mp_rank_00_model_states.pt")
    (checkpoint / "latest").write_text(f"global_step{step}")
    return checkpoint


@pytest.fixture
def checkpointed_run(tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A finished 2-step run with a complete checkpoint-2 (the key of this 'machine' lives in tmp_path)."""
    from peftkit.recipe import load_recipe
    from peftkit.training import finetune

    monkeypatch.setenv("PEFTKIT_STATE_DIR", str(tmp_path / "state"))
    recipe = write_recipe(
        tmp_path, tiny_bert_dir, tmp_path / "run", 'save_strategy = "steps"\nsave_steps = 2\n'
    )
    text = recipe.read_text().replace('save_strategy = "no"\n', "")
    recipe.write_text(text)
    finetune(load_recipe(recipe))
    assert (tmp_path / "run" / "checkpoint-2" / "optimizer.pt").is_file()
    return tmp_path / "run"


@pytest.mark.hostile("clear_error")
def test_resume_refuses_an_unsigned_deepspeed_checkpoint(checkpointed_run: Path) -> None:
    """A received run whose checkpoint carries global_step* files no peftkit of this machine signed."""
    checkpoint = deepspeed_checkpoint(checkpointed_run)
    recipe = checkpointed_run.parent / "sms.toml"
    result = invoke_cli("finetune", str(recipe), "--resume", "--set", "train.max_steps=3")
    assert_clear_error(result, str(checkpoint), "pickle", "peftkit_checkpoint.json")


@pytest.mark.hostile("success")
def test_signed_deepspeed_checkpoint_is_trusted_until_changed(
    checkpointed_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard's three answers: signed here → allowed; one byte changed → refused; other key → refused.
    And the check no longer skips DeepSpeed's optimizer states when global_step* exists."""
    from peftkit.errors import RunDirError
    from peftkit.integrity import sign_checkpoint
    from peftkit.lifecycle import refuse_unsigned_deepspeed
    from peftkit.runs import checkpoint_problem

    checkpoint = deepspeed_checkpoint(checkpointed_run)
    sign_checkpoint(checkpoint)  # what the on_save callback does after each save
    refuse_unsigned_deepspeed(checkpoint)
    assert checkpoint_problem(checkpoint) is None
    optim = checkpoint / "global_step2" / "mp_rank_00_optim_states.pt"
    original = optim.read_bytes()
    optim.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(RunDirError, match="does not match"):
        refuse_unsigned_deepspeed(checkpoint)
    optim.write_bytes(original)
    monkeypatch.setenv("PEFTKIT_STATE_DIR", str(tmp_path / "another-machine"))
    with pytest.raises(RunDirError, match="does not match"):
        refuse_unsigned_deepspeed(checkpoint)
    optim.write_bytes(original[: len(original) // 2])
    assert (
        checkpoint_problem(checkpoint) == "global_step2/mp_rank_00_optim_states.pt is truncated or corrupted"
    )
    optim.unlink()
    assert "no optimizer states" in str(checkpoint_problem(checkpoint))
    assert zipfile.is_zipfile(checkpoint / "global_step2" / "mp_rank_00_model_states.pt")
