"""A fine-tuning run's life around training: one context manager, :func:`run_lifecycle`.

It prepares the run directory, records the run's status in peftkit_run.json (``running``, then
``completed``, ``failed`` or ``interrupted``), chooses the checkpoint a resumed run continues from, turns
SIGINT/SIGTERM into stop requests, and does the distributed plumbing: rank-0-only side effects go
through :meth:`Run.main_only`, and :func:`leave_process_group` ends a launch cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from peftkit import runs
from peftkit.errors import RunDirError, TrainingInterrupted
from peftkit.outputs import output_lock, release_reserve, reserve_space
from peftkit.recipe import Recipe

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class StopRequest:
    """Set by the SIGINT/SIGTERM handler; read by the save-and-stop callback at the end of each step."""

    signum: int | None = None
    training: bool = False  # while True a first signal asks for a checkpoint instead of stopping at once


@dataclass
class Run:
    """What ``finetune`` needs from the lifecycle while the run is in progress."""

    recipe: Recipe
    dir: Path
    main: bool  # rank 0 (or the only process): the one that writes the run directory
    world_size: int
    stop: StopRequest = field(default_factory=StopRequest)
    checkpoint: Path | None = None  # resume from here (None: from the beginning)

    def main_only(self, write: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """Call ``write`` on rank 0 only: the one place where rank-0-only side effects are decided."""
        return write(*args, **kwargs) if self.main else None

    @contextlib.contextmanager
    def training(self, trainer: Any) -> Iterator[None]:
        """Around ``trainer.train()``: a first signal now saves a checkpoint and stops after this step."""
        self.stop.training = True
        try:
            yield
        finally:
            self.stop.training = False
        if self.stop.signum is not None:
            raise interrupted(self.recipe, self.dir, self.stop.signum, trainer.state)

    def complete(
        self,
        task_name: str,
        labels: Any,
        metrics: dict[str, Any],
        log_history: Any,
        data: dict[str, Any],
        integrity: dict[str, Any] | None = None,
    ) -> None:
        """Write the run's final records and status ``completed`` (rank 0), then wait for every rank."""
        self.main_only(
            runs.write_completed_run, self.dir, task_name, labels, metrics, log_history, data, integrity
        )
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()  # no rank leaves (and ends its process) before rank 0 has written the run


@contextlib.contextmanager
def run_lifecycle(recipe: Recipe, launch_args: Any, *, overwrite: bool, resume: bool) -> Iterator[Run]:
    """The run directory prepared (and its checkpoint chosen, when resuming), signals handled, status kept.

    ``launch_args`` are the run's TrainingArguments: reading their world size starts the process group of
    a distributed launch first, so that an error on one rank (say rank 0 refusing an existing run
    directory) makes the others fail at their next collective instead of waiting half an hour to connect
    to a rank that is gone. Any exception leaving the block marks the run ``failed`` (``interrupted`` for
    a signal) in peftkit_run.json before it propagates.
    """
    world_size = launch_args.world_size  # reading it starts the process group
    if getattr(launch_args, "deepspeed_plugin", None) is not None and world_size > 1:  # recipe or accelerate
        import deepspeed

        deepspeed.init_distributed()  # zero.Init (ZeRO-3 loads weights partitioned) needs DeepSpeed's group
    run = Run(recipe, recipe.output_dir.resolve(), runs.is_main_process(), world_size)
    resume = resume or recipe.train.get("resume") == "auto"
    with contextlib.ExitStack() as lock:
        if run.main:  # one live writer per run directory (rank 0 writes it)
            lock.enter_context(output_lock(run.dir))
        with _recorded(recipe, run, overwrite=overwrite, resume=resume):
            yield run


@contextlib.contextmanager
def _recorded(recipe: Recipe, run: Run, *, overwrite: bool, resume: bool) -> Iterator[Run]:
    """The run directory prepared, its status recorded, signals handled (the body of run_lifecycle)."""
    run.main_only(
        runs.prepare_run_dir, run.dir, overwrite=overwrite, resume=resume, inputs=runs.recipe_inputs(recipe)
    )
    if resume:
        run.checkpoint = resume_checkpoint(recipe, run.dir, run.main)
    else:
        run.main_only(runs.write_started_run, run.dir, recipe)
    run.main_only(reserve_space, run.dir)
    try:
        with _signals_recorded(recipe, run):
            yield run
    finally:
        run.main_only(release_reserve, run.dir)


@contextlib.contextmanager
def _signals_recorded(recipe: Recipe, run: Run) -> Iterator[Run]:
    with stop_requests() as stop:
        run.stop = stop
        try:
            yield run
        except TrainingInterrupted as exc:
            _record_stop(run, "interrupted", exc.summary)
            raise
        except KeyboardInterrupt:
            # a signal outside training, or a second one during it: stop at once
            stopped = interrupted(recipe, run.dir, stop.signum or signal.SIGINT, None)
            _record_stop(run, "interrupted", stopped.summary)
            raise stopped from None
        except BaseException as exc:
            _record_stop(run, "failed", f"{type(exc).__name__}: {exc}")
            raise


def leave_process_group() -> None:
    """End a distributed launch cleanly: every rank leaves the process group before its process exits.

    Left to interpreter shutdown, a ZeRO-3 rank on CPU once aborted ("terminate called without an active
    exception") while rank 0 was still saving, and the launcher then killed the whole job.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resume_checkpoint(recipe: Recipe, run_dir: Path, main: bool) -> Path | None:
    """The checkpoint to resume from, after checking the run there may be resumed with this recipe.

    Incomplete checkpoints (the process died while writing them) are skipped with a log line, and set
    aside by the main process. The run's metadata records each resume.
    """
    if recipe.train.get("save_only_model"):
        raise RunDirError(
            f"{run_dir}: cannot resume: train.save_only_model = true keeps no optimizer, scheduler or RNG "
            "state in the checkpoints; remove it (or use --overwrite to start over)"
        )
    previous = runs.check_resumable(run_dir, recipe.to_dict()) if main else None
    checkpoint = runs.newest_valid_checkpoint(run_dir, log=main, set_aside=main)
    if checkpoint is None and previous is not None and previous.get("status") == "completed":
        raise RunDirError(
            f"{run_dir}: the run is completed and has no checkpoint left to resume from; "
            "use --overwrite to train it again"
        )
    if main and checkpoint is not None:
        refuse_unsigned_deepspeed(checkpoint)
    if main:
        if checkpoint is None and previous is None:
            logger.info("resume: no run in %s yet, starting from the beginning", run_dir)
        elif checkpoint is None:
            logger.warning("resume: no complete checkpoint in %s, starting from the beginning", run_dir)
        else:
            logger.info("resuming from %s", checkpoint)
        meta = runs.run_meta(recipe, status="running")
        if previous is not None:
            meta["started"] = previous.get("started", meta["started"])
            history = previous.get("resumes")
            meta["resumes"] = [*(history if isinstance(history, list) else [])]
            meta["resumes"].append(
                {
                    "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "from_checkpoint": str(checkpoint) if checkpoint else None,
                    "previous_status": previous.get("status"),
                }
            )
        runs.write_json_atomic(run_dir / runs.RUN_META, meta)
    return checkpoint


def refuse_unsigned_deepspeed(checkpoint: Path) -> None:
    """DeepSpeed's checkpoint engine unpickles a checkpoint's ``global_step*`` files (``torch.load`` with
    ``weights_only=False``), which can run code: resume only from one this machine's peftkit saved."""
    from peftkit.integrity import checkpoint_signature_problem

    problem = checkpoint_signature_problem(checkpoint)
    if problem:
        raise RunDirError(
            f"{checkpoint}: refused: DeepSpeed would load its global_step* files with pickle, which can run "
            f"arbitrary code, and {problem}. Resume only runs this machine's peftkit saved; else start over "
            "with --overwrite (or set another train.output_dir)"
        )


def interrupted(recipe: Recipe, run_dir: Path, signum: int, state: Any) -> TrainingInterrupted:
    """The error that ends an interrupted run: where it stopped, its checkpoint, and how to resume."""
    name = signal.Signals(signum).name
    at = f" at step {state.global_step} of {state.max_steps}" if state is not None else ""
    checkpoint = runs.newest_valid_checkpoint(run_dir, log=False)
    saved = f"its last checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved"
    return TrainingInterrupted(
        f"training stopped by {name}{at}; {saved}. Resume with: peftkit finetune {recipe.source} --resume",
        signum,
        summary=f"stopped by {name}{at}",
    )


def _record_stop(run: Run, status: str, error: str) -> None:
    if not (run.main and (run.dir / runs.RUN_META).exists()):
        return
    fields = {"status": status, "error": error, "traceback": traceback.format_exc()}
    try:
        runs.update_meta(run.dir, **fields)
    except OSError:  # the disk is full: free the space reserved for this record, and write it small
        release_reserve(run.dir)
        fields["traceback"] = fields["traceback"][-2000:]
        try:
            runs.update_meta(run.dir, **fields)
        except OSError as exc:
            logger.error("could not record status %r in %s: %s", status, run.dir / runs.RUN_META, exc)


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Handle SIGINT and SIGTERM while fine-tuning; the previous handlers come back afterwards.

    During training the first signal only raises a flag (the Trainer then saves a checkpoint and stops
    after the current step); outside training, or on a second signal, it stops at once with a
    KeyboardInterrupt. Signal handlers can only be set from the main thread: elsewhere nothing changes.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: Any) -> None:
        first = request.signum is None
        if first:
            request.signum = signum
        if first and request.training:
            logger.warning(
                "%s received: saving a checkpoint after this step, then stopping (send it again to stop now)",
                signal.Signals(signum).name,
            )
            return
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
