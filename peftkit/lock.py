"""The tested stack: the versions of ``requirements.lock`` against the versions installed.

``scripts/install.sh`` installs the lock exactly. A stack that differs from it (a user's own environment, a
newer release) is not an error, but it is said: ``peftkit env`` prints the differences, ``peftkit env
--check-lock`` fails on them (CI runs it), and every run record keeps them beside the versions it used.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import metadata
from pathlib import Path

# A link to the repository's requirements.lock in a checkout; a copy of it inside a wheel (package data).
LOCK_FILE = Path(__file__).with_name("requirements.lock")
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+)", re.MULTILINE)


def normalise(name: str) -> str:
    """The PEP 503 form of a distribution name (``Scikit_Learn`` → ``scikit-learn``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(path: Path | None = None) -> dict[str, str]:
    """name → version pinned by the lock (``LOCK_FILE`` by default); empty when there is no lock file."""
    return dict(_read_lock(path or LOCK_FILE))


@cache
def _read_lock(path: Path) -> tuple[tuple[str, str], ...]:
    try:
        text = path.read_text()
    except OSError:
        return ()
    return tuple((normalise(name), version) for name, version in PIN.findall(text))


def installed_versions() -> dict[str, str]:
    """name → version of every distribution in this environment."""
    versions: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions.setdefault(normalise(name), dist.version)
    return versions


def lock_differences(
    locked: dict[str, str] | None = None, installed: dict[str, str] | None = None
) -> dict[str, dict[str, str | None]]:
    """Every locked package whose installed version is another one (or none): name → {installed, locked}."""
    locked = locked_versions() if locked is None else locked
    installed = installed_versions() if installed is None else installed
    return {
        name: {"installed": installed.get(name), "locked": version}
        for name, version in sorted(locked.items())
        if installed.get(name) != version
    }


def describe(differences: dict[str, dict[str, str | None]]) -> list[str]:
    """One line per differing package: ``transformers 5.25.0 (lock: 5.24.0)``."""
    return [
        f"{name} {versions['installed'] or 'not installed'} (lock: {versions['locked']})"
        for name, versions in differences.items()
    ]
