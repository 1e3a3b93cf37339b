"""Overwrite rules (issue 19): ``--overwrite`` replaces only what peftkit wrote, never an input of the
command, the working directory or a folder above it. Every case snapshots the folder at stake before and
after the command (tests/hostile/common.py) and is refused before any model is trained."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, invoke_cli
from tests.hostile.common import assert_clear_error, assert_nothing_lost, snapshot
from tests.hostile.test_run_dirs import RECIPE

SMS = REPO / "data" / "sms_spam"


def recipe_file(folder: Path, model: Path, out: str, data: Path = SMS) -> Path:
    recipe = folder / "sms.toml"
    recipe.write_text(
        RECIPE.format(model=model, data=data, out=out) + '\n[sweep.space]\n"adapter.r" = {choice = [2]}\n'
    )
    return recipe


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("mine\n")
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return path


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    from peftkit.recipe import load_recipe
    from peftkit.training import finetune

    work = tmp_path_factory.mktemp("overwrite")
    finetune(load_recipe(recipe_file(work, tiny_bert_dir, str(work / "run"))))
    return work / "run"


@pytest.mark.hostile("clear_error")
def test_finetune_overwrite_of_a_folder_peftkit_did_not_write(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """``output_dir = "../../etc"``-like: a folder of unrelated files above the recipe."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    etc = user_folder(tmp_path / "etc")
    recipe = recipe_file(work, tiny_bert_dir, "../../etc")
    before = snapshot(etc)
    result = invoke_cli("finetune", str(recipe), "--overwrite", "--set", f"train.output_dir={str(etc)!r}")
    assert_clear_error(result, str(etc), "not written by peftkit")
    assert_nothing_lost(before, snapshot(etc), etc)


@pytest.mark.hostile("clear_error")
@pytest.mark.parametrize("command", ["validate", "finetune"])
def test_empty_output_dir_is_refused_at_validate(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    cwd = user_folder(tmp_path / "cwd")
    monkeypatch.chdir(cwd)
    recipe = recipe_file(tmp_path, tiny_bert_dir, "")
    before = snapshot(cwd)
    extra = ["--overwrite"] if command == "finetune" else []
    result = invoke_cli(command, str(recipe), *extra)
    assert_clear_error(result, str(recipe), "train.output_dir", "working directory")
    assert_nothing_lost(before, snapshot(cwd), cwd)


@pytest.mark.hostile("clear_error")
def test_finetune_overwrite_of_its_own_data_folder(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """output_dir = the recipe's data folder, even one that also holds an old run record."""
    data = tmp_path / "data"
    shutil.copytree(SMS, data)
    (data / "peftkit_run.json").write_text('{"status": "completed", "recipe": {}}\n')
    recipe = recipe_file(tmp_path, tiny_bert_dir, str(data), data=data)
    before = snapshot(data)
    result = invoke_cli("finetune", str(recipe), "--overwrite")
    assert_clear_error(result, "train.output_dir", str(data), "an input of this command")
    assert_nothing_lost(before, snapshot(data), data)


@pytest.mark.hostile("clear_error")
@pytest.mark.parametrize("where", [".", ".."])
@pytest.mark.parametrize("command", ["finetune", "cv", "sweep"])
def test_overwrite_of_the_working_directory_or_above(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, where: str
) -> None:
    """Even when the folder holds a peftkit record (a run was once written there)."""
    top = user_folder(tmp_path / "top")
    cwd = user_folder(top / "cwd")
    for folder in (top, cwd):
        (folder / "peftkit_run.json").write_text('{"status": "completed", "recipe": {}}\n')
        (folder / "cv_summary.json").write_text("{}\n")
        (folder / "sweep.json").write_text("{}\n")
    monkeypatch.chdir(cwd)
    recipe = recipe_file(tmp_path, tiny_bert_dir, where)
    before = snapshot(top)
    args = {
        "finetune": ["finetune", str(recipe), "--overwrite"],
        "cv": ["cv", str(recipe), "--folds", "2", "--out", where, "--overwrite"],
        "sweep": ["sweep", str(recipe), "--trials", "1", "--out", where, "--overwrite"],
    }[command]
    result = invoke_cli(*args)
    assert_clear_error(result, "working directory")
    assert_nothing_lost(before, snapshot(top), top)


@pytest.mark.hostile("clear_error")
@pytest.mark.parametrize("command", ["merge", "export"])
@pytest.mark.parametrize("target", ["run", "parent", "cwd"])
def test_merge_and_export_never_replace_their_run_or_the_working_directory(
    small_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, target: str
) -> None:
    cwd = user_folder(tmp_path / "cwd")
    (cwd / "merge_report.json").write_text("{}\n")  # a peftkit marker: the cwd rule still holds
    monkeypatch.chdir(cwd)
    out = {"run": small_run, "parent": small_run.parent, "cwd": Path(".")}[target]
    watched = small_run.parent if target != "cwd" else cwd
    before = snapshot(watched)
    result = invoke_cli(command, str(small_run), "--out", str(out), "--overwrite", "--samples", "4")
    assert_clear_error(result, "--out")
    assert_nothing_lost(before, snapshot(watched), watched)
