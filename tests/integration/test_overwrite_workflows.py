"""`peftkit cv --overwrite` and `peftkit sweep --overwrite` replace only a folder a cv or a sweep wrote: a
folder of the user's is refused (exit 2, one message) and left exactly as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO, invoke_cli
from tests.integration.test_workflows import RECIPE


def user_folder(path: Path) -> dict[str, bytes]:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine\n")
    (path / "sub").mkdir()
    (path / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("command", ["cv", "sweep"])
def test_overwrite_refuses_a_folder_peftkit_did_not_write(
    tmp_path: Path, tiny_bert_dir: Path, command: str
) -> None:
    recipe = tmp_path / "sms.toml"
    recipe.write_text(RECIPE.format(model=tiny_bert_dir, data=REPO / "data" / "sms_spam", out=tmp_path / "r"))
    out = tmp_path / "mine"
    before = user_folder(out)
    extra = ["--folds", "2"] if command == "cv" else ["--trials", "1"]
    result = invoke_cli(command, str(recipe), *extra, "--out", str(out), "--overwrite")
    assert result.exit_code == 2, result.output
    assert "was not written by peftkit" in result.output and "Traceback" not in result.output
    after = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
