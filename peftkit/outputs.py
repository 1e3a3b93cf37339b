"""Writing outputs safely: atomic files, staging folders, and the one refuse-to-overwrite rule.

Every folder peftkit writes (a run directory, a merged model, a bundle, a combined adapter) follows the
same two rules:

- :func:`check_output_dir`: an output that already holds files is replaced only with ``--overwrite``, and
  only when peftkit wrote it (it holds one of the caller's marker files) or it is empty, so that a mistyped
  ``--out ~`` cannot delete a home folder; an output never swallows one of the command's inputs.
- :func:`staging_folder`: files are written to a scratch folder first and renamed into place when the step
  succeeded; a failed or interrupted step leaves nothing that looks complete. A new output is swapped in as
  a whole folder (:func:`staged_output`); a run directory, which already holds checkpoints, gets the staged
  files one atomic rename each (:func:`publish`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from peftkit.errors import OutputError, OutputLocked, RunDirError, StorageError

_held_locks: dict[Path, tuple[int, int]] = {}  # lock file → (fd, depth): nested holds in one process


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            # mkstemp creates the file private (0600); a record is as readable as any file the user writes
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write names no file: name it
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def _umask() -> int:
    """The process's umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


RUST_OS_ERROR = re.compile(r"Os \{ code: (\d+)|\(os error (\d+)\)")
RESERVE = ".peftkit-reserve"
RESERVE_BYTES = 256 * 1024  # room for a failed run's record when the disk filled up


def storage_error(exc: BaseException, path: Path | None = None) -> StorageError | None:
    """One message for an OS error while writing or reading (disk full, read-only, permissions), naming
    the path; None when ``exc`` is no such error. safetensors reports its I/O errors as SafetensorError
    with the OS error in the text and no path, so ``path`` names where it was writing."""
    code: int | None
    if isinstance(exc, OSError):
        where, code, cause = exc.filename or path or "a file", exc.errno, exc.strerror or str(exc)
    else:
        # Rust's I/O errors, as safetensors (SafetensorError "... Os { code: 28, ... }") and tokenizers
        # (Exception "No space left on device (os error 28)") raise them: no path, the OS error in the text
        match = RUST_OS_ERROR.search(str(exc))
        if match is None:
            return None
        code = int(match.group(1) or match.group(2))
        where, cause = path or "a file", os.strerror(code)
    full = code in (errno.ENOSPC, errno.EDQUOT)
    fix = (
        "free space there (or choose another output folder) and run the command again"
        + ("; a run continues with --resume" if full else "")
        if full
        else "check that the path exists and is writable, then run the command again"
    )
    return StorageError(f"{where}: {cause}; {fix}")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OS error (disk full ...) raised while writing under ``path`` into one StorageError."""
    try:
        yield
    except Exception as exc:
        error = storage_error(exc, path)
        if error is None:
            raise
        raise error from exc


def reserve_space(folder: Path) -> None:
    """Hold :data:`RESERVE_BYTES` of real (not sparse) bytes in ``folder``: freed by
    :func:`release_reserve` when the disk fills up, so that a run's ``failed`` status can still be written.
    """
    with contextlib.suppress(OSError), (folder / RESERVE).open("wb") as handle:
        handle.write(b"\0" * RESERVE_BYTES)
        handle.flush()
        os.fsync(handle.fileno())


def release_reserve(folder: Path) -> None:
    with contextlib.suppress(OSError):
        (folder / RESERVE).unlink()


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def lock_path(out: Path) -> Path:
    """The lock file of an output folder: beside it, so that replacing the folder (``--overwrite``, the
    rename of a staged output) never removes the lock another process is waiting on."""
    target = out.resolve()
    return target.parent / f".{target.name}.peftkit.lock"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """One live writer per output folder: an exclusive ``flock`` on :func:`lock_path` held for the block.

    A second writer (another process) gets an :class:`OutputLocked` naming the folder and the holder's pid.
    The lock dies with its process, so a killed run leaves nothing to clean up (a killed run's lock file
    stays, empty of meaning; a finished writer removes its own). Nested holds of one folder in one process
    (export merging into its bundle) are fine.
    """
    path = lock_path(out)
    if path in _held_locks:
        fd, depth = _held_locks[path]
        _held_locks[path] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held_locks[path]
            _held_locks[path] = (fd, depth - 1)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            try:
                holder = path.read_text().strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise OutputLocked(
                f"{out}: another peftkit process (pid {holder}) is writing this folder now (it holds "
                f"{path}); wait for it to finish or stop it, or choose another output folder. Nothing was "
                "changed"
            ) from None
        # the holder before us removes the file as it lets go: a lock on that removed file guards nothing,
        # so lock the file now at the path instead
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held_locks[path] = (fd, 1)
        yield
    finally:
        _held_locks.pop(path, None)
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked, so no file is left beside the output
        os.close(fd)  # releases the flock


def check_output_dir(
    out: Path,
    overwrite: bool,
    *,
    markers: Sequence[str],
    inputs: Sequence[Path] = (),
    option: str = "--out",
    exists: str = "already exists",
    hint: str = "Use --overwrite to replace it, or choose another --out",
) -> None:
    """Refuse an output that exists (unless ``overwrite``), is a file, or would swallow an input folder.

    ``overwrite`` replaces only folders that hold one of ``markers`` (files peftkit writes) or empty ones.
    ``option`` names the setting that chose ``out`` in the messages; ``exists`` and ``hint`` word the
    refusal of an existing output.
    """
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise OutputError(
            f"{option} {out}: that is the working directory {cwd}"
            + (" or a folder above it" if target != cwd else "")
            + "; an output there would replace it. Choose a folder inside it, e.g. runs/<name>"
        )
    for folder in inputs:
        source = folder.resolve()
        if target == source or target in source.parents:
            raise OutputError(
                f"{option} {out}: that would replace {folder}, an input of this command; "
                "choose a folder outside it"
            )
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"{option} {out}: exists and is a file; choose another {option}")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise RunDirError(f"{out}: {exists}. Nothing was changed. {hint}")
    if not any((out / marker).is_file() for marker in markers):
        raise OutputError(
            f"{out}: exists and was not written by peftkit (no {' / '.join(markers)}); --overwrite "
            f"only replaces peftkit outputs. Remove it yourself or choose another {option}"
        )


@contextlib.contextmanager
def staging_folder(stage: Path) -> Iterator[Path]:
    """A fresh scratch folder at ``stage``, removed when the block ends, whatever happened in it.

    transformers, peft and matplotlib write files in place; writing them here first and then renaming them
    into place (:func:`publish`, :func:`staged_output`) means no reader ever sees half a file.
    """
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, target: Path) -> list[Path]:
    """Move every file of ``stage`` to the same place under ``target`` (one atomic rename each)."""
    published = []
    for source in sorted(p for p in stage.rglob("*") if p.is_file()):
        destination = target / source.relative_to(stage)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, destination)
        published.append(destination)
    return published


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool, *, markers: Sequence[str]) -> Iterator[Path]:
    """A hidden folder beside ``out``; renamed to ``out`` when the block succeeds, deleted when it fails.

    A step killed midway leaves only ``.<name>.partial-*``, never a half-written folder at ``out``. An old
    output is replaced only under :func:`check_output_dir`'s rule, checked again at the end.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}") as stage:
        yield stage
        # files written through temporary files are private (0600); an output folder is meant to be shared
        file_mode = stage.stat().st_mode & 0o666
        for path in stage.rglob("*"):
            if path.is_file():
                path.chmod(file_mode)
        check_output_dir(out, overwrite, markers=markers)  # again: something may have appeared meanwhile
        if out.exists():
            replaced = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
            os.replace(out, replaced)
            os.replace(stage, out)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.replace(stage, out)
