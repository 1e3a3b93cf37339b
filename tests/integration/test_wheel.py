"""A wheel built from a clean checkout ships every recipe: installed in a fresh virtualenv outside the
repository, ``peftkit recipes list`` lists them, ``recipes copy`` copies each one, and ``validate`` finds
one by its name.

The wheel is built from ``git archive HEAD`` (the committed tree, nothing untracked) with ``pip wheel
--no-deps --no-build-isolation``. To stay cheap the fresh virtualenv gets only the wheel (``--no-deps``);
its dependencies come from the test's own environment through a ``.pth`` line, which adds that
site-packages folder to ``sys.path`` after the venv's own but does not run its ``.pth`` files, so an
editable install of peftkit there is not seen. ``peftkit.__file__`` proves which peftkit ran.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

from tests.conftest import REPO


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(the fresh venv's bin folder, an environment without this checkout on any path)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to archive")
    work = tmp_path_factory.mktemp("wheel")
    archive = work / "source.tar"
    run("git", "archive", "--format=tar", "-o", archive, "HEAD", cwd=REPO)
    source = work / "source"
    with tarfile.open(archive) as tar:
        tar.extractall(source, filter="tar")
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        ".",
        "-w",
        work / "dist",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        cwd=source,
    )
    wheels = list((work / "dist").glob("peftkit-*.whl"))
    assert len(wheels) == 1, wheels
    venv = work / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=work)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheels[0], cwd=work)
    purelib = run(
        python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=work
    ).stdout.strip()
    (Path(purelib) / "test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return venv / "bin", env


def test_the_installed_peftkit_is_the_wheel(installed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    bin_dir, env = installed
    where = run(bin_dir / "python", "-c", "import peftkit; print(peftkit.__file__)", cwd=tmp_path, env=env)
    location = Path(where.stdout.strip())
    assert location.is_relative_to(bin_dir.parent), location
    assert not location.is_relative_to(REPO)


def test_recipes_list_and_copy_every_shipped_recipe(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    bin_dir, env = installed
    shipped = sorted(p.stem for p in (REPO / "recipes").glob("*.toml"))
    assert shipped, "the checkout has no recipes/"
    listed = run(bin_dir / "peftkit", "recipes", "list", cwd=tmp_path, env=env).stdout.splitlines()
    assert [line.split()[0] for line in listed] == shipped
    for line in listed:
        name, task, *summary = line.split()
        assert task in ("seq_cls", "token_cls", "qa", "seq2seq") and summary, line
        assert not line.split(maxsplit=2)[2].startswith("peftkit "), "a summary, not the run command"
    for name in shipped:
        run(bin_dir / "peftkit", "recipes", "copy", name, tmp_path, cwd=tmp_path, env=env)
        assert (tmp_path / f"{name}.toml").read_text().splitlines()[2:] != [], name
        # the copy is the shipped text apart from its rebased data paths
        original = (REPO / "recipes" / f"{name}.toml").read_text().splitlines()
        copied = (tmp_path / f"{name}.toml").read_text().splitlines()
        assert len(copied) == len(original) and copied[0] == original[0]


def test_a_shipped_recipe_is_found_by_name(installed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    bin_dir, env = installed
    result = subprocess.run(
        [str(bin_dir / "peftkit"), "validate", "seq_cls_lora"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    # the wheel ships the recipes, not the repository's data: the recipe is found, its data is not
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{bin_dir.parent}" in result.stderr and "seq_cls_lora.toml" in result.stderr, result.stderr
    assert "data.dataset" in result.stderr, result.stderr
