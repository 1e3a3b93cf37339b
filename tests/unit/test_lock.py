"""requirements.lock: the shipped lock is complete and agrees with pyproject.toml's ranges, and `peftkit env`
names every package whose installed version differs from it (`--check-lock` fails on them, as CI runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from peftkit import lock
from tests.conftest import REPO, invoke_cli


def test_shipped_lock_pins_the_stack_within_pyproject_ranges() -> None:
    from packaging.requirements import Requirement

    locked = lock.locked_versions(REPO / "requirements.lock")
    assert lock.LOCK_FILE.resolve() == (REPO / "requirements.lock").resolve()  # the package ships this lock
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "deepspeed", "setuptools"):
        assert name in locked, name
    assert "peftkit" not in locked and "pip" not in locked
    text = (REPO / "requirements.lock").read_text()
    assert text.count("--hash=sha256:") == len(locked)  # every pin carries its file hash
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        r for extra in ("dev", "export", "deepspeed") for r in project["optional-dependencies"][extra]
    ]
    for requirement in map(Requirement, requirements):
        if requirement.marker and not requirement.marker.evaluate():
            continue
        version = locked[lock.normalise(requirement.name)]
        assert requirement.specifier.contains(version, prereleases=True), (str(requirement), version)
        assert any(s.operator == "<" for s in requirement.specifier), f"{requirement}: no tested upper bound"


def test_differences_name_each_package() -> None:
    locked = {"transformers": "5.24.0", "peft": "0.21.2", "torch": "2.13.0+cpu"}
    installed = {"transformers": "5.25.0", "peft": "0.21.2"}
    differences = lock.lock_differences(locked, installed)
    assert differences == {
        "torch": {"installed": None, "locked": "2.13.0+cpu"},
        "transformers": {"installed": "5.25.0", "locked": "5.24.0"},
    }
    assert lock.describe(differences) == [
        "torch not installed (lock: 2.13.0+cpu)",
        "transformers 5.25.0 (lock: 5.24.0)",
    ]


def test_env_check_lock_fails_on_a_differing_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    planted = tmp_path / "requirements.lock"
    planted.write_text(
        f"click=={metadata.version('click')} \\\n    --hash=sha256:{'0' * 64}\n"
        "transformers==0.0.1 \\\n    --hash=sha256:" + "1" * 64 + "\n"
    )
    monkeypatch.setattr(lock, "LOCK_FILE", planted)
    result = invoke_cli("env", "--check-lock")
    assert result.exit_code == 1
    assert "1 of 2 packages differ from requirements.lock" in result.output
    assert f"transformers {metadata.version('transformers')} (lock: 0.0.1)" in result.output
    assert "click" not in result.output.split("differ from requirements.lock")[1]

    planted.write_text(f"click=={metadata.version('click')} \\\n    --hash=sha256:{'0' * 64}\n")
    lock._read_lock.cache_clear()
    result = invoke_cli("env", "--check-lock")
    assert result.exit_code == 0, result.output
    assert "all 1 packages as in requirements.lock" in result.output


def test_records_name_the_lock_differences(monkeypatch: pytest.MonkeyPatch) -> None:
    from peftkit import runs

    planted = {"transformers": {"installed": "5.25.0", "locked": "5.24.0"}}
    monkeypatch.setattr(lock, "lock_differences", lambda: planted)
    record = runs.stack_record()
    assert record["lock_differences"] == planted
    assert record["versions"]["transformers"]
