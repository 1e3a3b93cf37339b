"""Atomic writes: a record appears whole and with the permissions any file the user writes gets."""

from __future__ import annotations

import os
from pathlib import Path

from peftkit.outputs import write_text_atomic


def test_atomic_write_follows_the_umask_not_mkstemps_private_mode(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "metrics.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").read_text() == "{}"
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left
