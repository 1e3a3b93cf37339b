"""Integrity records: what peftkit wrote, and the base model a run was trained on, checked on every load.

- :func:`file_digests` / :func:`verify_files`: the SHA-256 of each artefact of a run directory or a merged
  folder (adapter, head, tokenizer files, config, labels), recorded when peftkit wrote them and compared
  before a command uses them, so that a file changed afterwards (a flipped byte inside a tensor, a deleted
  tokenizer.json) is named instead of silently used.
- :func:`base_fingerprint` / :func:`verify_base`: a cheap fingerprint of the base model's weights (the first
  bytes of its largest tensors, read straight from the safetensors files by their header offsets, no
  torch), so that a base replaced by a same-shaped model with other weights is noticed.
- :func:`sign_checkpoint` / :func:`checkpoint_signature_problem`: an HMAC, keyed by a secret kept on this
  machine, over the pickled files of a DeepSpeed checkpoint (``global_step*``), which DeepSpeed's
  checkpoint engine unpickles on resume. A record anyone could recompute (a plain hash) would prove
  nothing about a received run directory; only a checkpoint this machine's peftkit saved matches.

This module imports nothing of peftkit but the errors.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from peftkit.errors import RunDirError

logger = logging.getLogger(__name__)

FINGERPRINT_TENSORS = 4  # the largest tensors of the base model (random-looking weights, not norms)
FINGERPRINT_BYTES = 1 << 16  # bytes read from the start of each
CHECKPOINT_RECORD = "peftkit_checkpoint.json"
KEY_FILE = "checkpoint.key"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(folder: Path, paths: Iterable[Path]) -> dict[str, str]:
    """relative name → SHA-256 of each file of ``paths`` (files under ``folder``)."""
    return {
        str(Path(p).relative_to(folder)): sha256_file(Path(p)) for p in sorted(paths) if Path(p).is_file()
    }


def verify_files(folder: Path, recorded: Mapping[str, str], record: Path) -> None:
    """Every file of ``recorded`` is in ``folder`` with the recorded SHA-256; else one RunDirError naming
    each file that changed or is missing."""
    changed, missing = [], []
    for name, digest in recorded.items():
        path = folder / name
        if not path.is_file():
            missing.append(name)
        elif sha256_file(path) != digest:
            changed.append(name)
    if not changed and not missing:
        return
    parts = []
    if changed:
        parts.append(f"changed since peftkit wrote it: {', '.join(str(folder / n) for n in changed)}")
    if missing:
        parts.append(f"missing: {', '.join(str(folder / n) for n in missing)}")
    raise RunDirError(
        f"{folder}: integrity check failed ({'; '.join(parts)}; SHA-256 recorded in {record.name}). "
        "The files are not the ones peftkit wrote: restore them, or re-run the step that wrote them"
    )


# --------------------------------------------------------------------------------------------------
# The base model's weights


def _weight_files(name_or_path: str, revision: str | None, gguf_file: str | None) -> list[Path]:
    """The base model's weight files on this machine (a local folder or the Hub cache); [] when unknown."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name_or_path, revision=revision, local_files_only=True))
        except Exception:  # not cached, not a Hub id: nothing to fingerprint
            return []
    if gguf_file:
        path = folder / gguf_file
        return [path] if path.is_file() else []
    return sorted(folder.glob("*.safetensors"))


def _tensor_spans(path: Path) -> list[tuple[str, int, int]]:
    """(name, start, end) of each tensor's bytes in a safetensors file, from its header alone."""
    with path.open("rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size).decode("utf-8"))
    base = 8 + header_size
    return [
        (name, base + int(info["data_offsets"][0]), base + int(info["data_offsets"][1]))
        for name, info in header.items()
        if name != "__metadata__"
    ]


def base_fingerprint(name_or_path: str, revision: str | None = None, gguf_file: str | None = None) -> Any:
    """{"files": {file: {tensor: sha256 of its first bytes}}} of the base model, or None when its weights
    are not safetensors/GGUF files on this machine. Cheap: a few reads of 64 KiB."""
    files = _weight_files(name_or_path, revision, gguf_file)
    if not files:
        return None
    result: dict[str, dict[str, str]] = {}
    try:
        if gguf_file:
            path = files[0]
            size = path.stat().st_size
            with path.open("rb") as handle:
                head = handle.read(FINGERPRINT_BYTES)
                handle.seek(max(0, size - FINGERPRINT_BYTES))
                tail = handle.read(FINGERPRINT_BYTES)
            result[path.name] = {
                "head": hashlib.sha256(head).hexdigest(),
                "tail": hashlib.sha256(tail).hexdigest(),
            }
            return {"files": result}
        spans = [(path, *span) for path in files for span in _tensor_spans(path)]
        largest = sorted(spans, key=lambda s: (-(s[3] - s[2]), s[1]))[:FINGERPRINT_TENSORS]
        for path, name, start, end in sorted(largest, key=lambda s: (s[0].name, s[1])):
            with path.open("rb") as handle:
                handle.seek(start)
                data = handle.read(min(end - start, FINGERPRINT_BYTES))
            result.setdefault(path.name, {})[name] = hashlib.sha256(data).hexdigest()
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    return {"files": result}


def verify_base(
    name_or_path: str, revision: str | None, gguf_file: str | None, recorded: Any, key: str
) -> None:
    """The base model at ``name_or_path`` has the weights the run recorded; else a RunDirError naming it."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("files"), dict):
        return
    current = base_fingerprint(name_or_path, revision, gguf_file)
    if current is None:
        logger.warning(
            "%s %s: its weights cannot be read to check them against the run's record", key, name_or_path
        )
        return
    changed = [
        f"{file}:{tensor}"
        for file, tensors in recorded["files"].items()
        for tensor, digest in (tensors or {}).items()
        if current["files"].get(file, {}).get(tensor) != digest
    ]
    if changed:
        raise RunDirError(
            f"{key} {name_or_path}: the base model's weights are not the ones this run was trained on "
            f"(tensor {', '.join(changed[:3])} differ from the fingerprint recorded at training); the "
            "adapter would be applied to another model. Restore the original base model"
        )


# --------------------------------------------------------------------------------------------------
# DeepSpeed checkpoints: only unpickled when this machine's peftkit saved them


def _key_path() -> Path:
    root = os.environ.get("PEFTKIT_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "peftkit"
    )
    return Path(root) / KEY_FILE


def _machine_key() -> bytes:
    """A secret of this user on this machine (created 0600 on first use)."""
    path = _key_path()
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return bytes.fromhex(key)


def deepspeed_files(checkpoint: Path) -> list[Path]:
    """The files of a checkpoint's ``global_step*`` folders (what DeepSpeed's engine unpickles)."""
    return sorted(p for folder in checkpoint.glob("global_step*") for p in folder.rglob("*") if p.is_file())


def _signature(checkpoint: Path, files: list[Path]) -> str:
    mac = hmac.new(_machine_key(), digestmod=hashlib.sha256)
    for path in files:
        mac.update(str(path.relative_to(checkpoint)).encode() + b"\0" + bytes.fromhex(sha256_file(path)))
    return mac.hexdigest()


def sign_checkpoint(checkpoint: Path) -> None:
    """Write ``peftkit_checkpoint.json``: the HMAC of the checkpoint's DeepSpeed files (none: nothing)."""
    from peftkit.outputs import write_json_atomic

    files = deepspeed_files(checkpoint)
    if not files:
        return
    names = [str(p.relative_to(checkpoint)) for p in files]
    write_json_atomic(checkpoint / CHECKPOINT_RECORD, {"files": names, "hmac": _signature(checkpoint, files)})


def checkpoint_signature_problem(checkpoint: Path) -> str | None:
    """Why a DeepSpeed checkpoint may not be unpickled (no record, or it does not match), or None."""
    files = deepspeed_files(checkpoint)
    if not files:
        return None
    record_path = checkpoint / CHECKPOINT_RECORD
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        recorded = str(record["hmac"])
    except (OSError, ValueError, KeyError, TypeError):
        return (
            f"it has no readable {CHECKPOINT_RECORD} (written when this machine's peftkit saves a checkpoint)"
        )
    if not hmac.compare_digest(recorded, _signature(checkpoint, files)):
        return (
            f"its {CHECKPOINT_RECORD} does not match its global_step* files (changed since saved, or saved "
            "on another machine)"
        )
    return None
