"""Maintenance of requirements.lock, the exact stack the suite passes with (see docs/dependencies.md).

    python scripts/lock.py uncapped           pyproject.toml's requirements without the tested upper bounds
    python scripts/lock.py write --python PY  write requirements.lock from PY's virtualenv (hashes included)
    python scripts/lock.py caps               set pyproject.toml's upper bounds to the locked minor versions

Run by scripts/update_lock.sh; it needs nothing but the standard library, pip and packaging.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
LOCK = REPO / "requirements.lock"
# Not part of the locked stack: the installer itself, and peftkit (installed editable from the checkout).
UNLOCKED = {"pip", "peftkit"}
EXTRAS = ("dev", "export", "deepspeed")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_requirements() -> list[str]:
    """Every requirement of peftkit and of the extras install.sh installs, as written in pyproject.toml."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project["optional-dependencies"][extra]
    return requirements


def uncapped(requirement: str) -> str:
    """The requirement without its upper bound (`<X` clauses), floors and markers kept."""
    from packaging.requirements import Requirement

    parsed = Requirement(requirement)
    kept = [str(spec) for spec in parsed.specifier if spec.operator not in ("<", "<=")]
    marker = f"; {parsed.marker}" if parsed.marker else ""
    return f"{parsed.name}{','.join(sorted(kept))}{marker}"


def freeze(python: str) -> list[str]:
    out = subprocess.run(
        [python, "-m", "pip", "list", "--format=freeze", "--exclude-editable", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if line and normalise(line.split("==")[0]) not in UNLOCKED]


def resolve_hashes(python: str, pins: list[str]) -> dict[str, tuple[str, str]]:
    """name → (version, sha256) of the distribution file pip would install for each pin on this machine."""
    with tempfile.TemporaryDirectory() as tmp:
        pins_file, report = Path(tmp, "pins.txt"), Path(tmp, "report.json")
        pins_file.write_text("\n".join(pins) + "\n")
        subprocess.run(
            [
                *(python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet"),
                *("--disable-pip-version-check", "--report", str(report), "-r", str(pins_file)),
            ],
            check=True,
            stderr=subprocess.DEVNULL,
        )
        resolved = json.loads(report.read_text())["install"]
    hashes: dict[str, tuple[str, str]] = {}
    for item in resolved:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        digest = item["download_info"].get("archive_info", {}).get("hashes", {}).get("sha256")
        if not digest:
            sys.exit(f"lock: no sha256 for {name}=={version} ({item['download_info'].get('url')})")
        hashes[normalise(name)] = (version, digest)
    return hashes


def write_lock(python: str, out: Path) -> None:
    pins = freeze(python)
    hashes = resolve_hashes(python, pins)
    version = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    lines = [
        "# peftkit's tested stack: the exact versions (and file hashes) the whole suite passed with.",
        "# scripts/install.sh installs it with `pip install --require-hashes --no-deps`.",
        "# Not edited by hand: scripts/update_lock.sh rewrites it once the suite passes.",
        f"# Generated {datetime.date.today().isoformat()} for CPython {version} on "
        f"{platform.system().lower()} {platform.machine()}.",
    ]
    for name in sorted(hashes):
        version_, digest = hashes[name]
        lines.append(f"{name}=={version_} \\\n    --hash=sha256:{digest}")
    out.write_text("\n".join(lines) + "\n")
    print(f"lock: wrote {len(hashes)} packages to {out}")


def read_lock(path: Path = LOCK) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", path.read_text(), flags=re.MULTILINE)
    return {normalise(name): version for name, version in pins}


def next_minor(version: str) -> str:
    release = re.match(r"(\d+)(?:\.(\d+))?", version)
    if release is None:
        raise ValueError(f"cannot read the release of {version!r}")
    major, minor = int(release.group(1)), int(release.group(2) or 0)
    return f"{major}.{minor + 1}"


def set_caps(lock: dict[str, str]) -> list[str]:
    """Rewrite each direct requirement's upper bound to below the next minor release of its locked version."""
    from packaging.requirements import Requirement

    text = PYPROJECT.read_text()
    changed = []
    for requirement in pyproject_requirements():
        parsed = Requirement(requirement)
        locked = lock.get(normalise(parsed.name))
        if locked is None:  # not installed here (a marker excludes it): leave it as written
            continue
        capped = uncapped(requirement).split(";")[0] + f",<{next_minor(locked.split('+')[0])}"
        _, _, floors = capped.partition(parsed.name)
        specs = ",".join(s for s in floors.split(",") if s)
        new = f"{parsed.name}{specs}" + (f"; {parsed.marker}" if parsed.marker else "")
        if new != requirement:
            text = text.replace(f'"{requirement}"', f'"{new}"', 1)
            changed.append(f"{requirement} -> {new}")
    PYPROJECT.write_text(text)
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("uncapped")
    write = sub.add_parser("write")
    write.add_argument("--python", default=sys.executable)
    write.add_argument("--out", type=Path, default=LOCK)
    sub.add_parser("caps")
    args = parser.parse_args()
    if args.command == "uncapped":
        print("\n".join(uncapped(r) for r in pyproject_requirements()))
    elif args.command == "write":
        write_lock(args.python, args.out)
    else:
        for line in set_caps(read_lock()) or ["pyproject.toml: caps already match the lock"]:
            print(line)


if __name__ == "__main__":
    main()
