"""Assertions shared by the hostile-input corpus (see ``conftest.py`` for how cases are counted)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def assert_clear_error(result: Any, *needles: str) -> None:
    """``result`` (a ``CompletedProcess`` or click ``Result``) exited 2 with one message and no traceback,
    and that message names every one of ``needles`` (a file, a ``table.key``, a line number ...)."""
    code = getattr(result, "returncode", None)
    if code is None:
        code = result.exit_code
    stderr = getattr(result, "stderr", None) or ""
    output = f"{getattr(result, 'stdout', '') or ''}{stderr}{getattr(result, 'output', '') or ''}"
    assert "Traceback" not in output, f"traceback instead of one message:\n{output[-3000:]}"
    assert code == 2, f"exit code {code}, wanted 2:\n{output[-3000:]}"
    for needle in needles:
        assert needle in output, f"the message does not name {needle!r}:\n{output[-3000:]}"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes (compare before and after a command)."""
    if not folder.exists():
        return {}
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def assert_nothing_lost(before: dict[str, str], after: dict[str, str], where: Path) -> None:
    """Every file that was in ``before`` is still there with the same bytes (new files are allowed)."""
    lost = sorted(name for name in before if name not in after)
    changed = sorted(name for name in before if name in after and before[name] != after[name])
    assert not lost and not changed, f"DATA LOST in {where}: removed {lost[:10]}, changed {changed[:10]}"
