"""Every shipped recipe loads and validates, opens with the command that runs it, and names offline data (or,
for a Hub dataset, has a test that runs it on a local fixture in the same layout)."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.recipe import load_recipe, recipes_dir
from peftkit.tasks import TASKS

RECIPES = sorted(recipes_dir().glob("*.toml"))
REPO = Path(__file__).resolve().parents[2]
# recipes on a Hub dataset (not reachable offline) → the test that runs each on a local copy of its layout
HUB_RECIPES = {
    "seq_cls_pair_mrpc_lora": "tests/integration/test_mrpc_recipe.py",
}


def test_recipes_are_shipped() -> None:
    assert "seq_cls_lora" in {p.stem for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_validates(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    commands = (f"# peftkit finetune recipes/{path.name}", f"# peftkit sweep recipes/{path.name} --trials 6")
    assert first in commands, "a recipe opens with the command that runs it"
    recipe = load_recipe(path)
    assert recipe.task_name in TASKS
    data = recipe.data
    local = [data.dataset, data.train_file]
    if path.stem in HUB_RECIPES:
        assert not any(p and Path(p).exists() for p in local), "a local recipe needs no HUB_RECIPES entry"
        assert (REPO / HUB_RECIPES[path.stem]).is_file(), "a Hub recipe has a test on a local fixture"
        return
    assert any(p and Path(p).exists() for p in local), "shipped recipes run offline on data in the repo"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_passes_peftkit_validate(path: Path) -> None:
    """``peftkit validate`` builds the recipe's TrainingArguments, peft config and meta-device model, and says
    what its target patterns matched: every shipped recipe passes, and each pattern matches something."""
    import re

    from tests.conftest import invoke_cli

    result = invoke_cli("validate", str(path))
    assert result.exit_code == 0, result.output
    matched = re.search(r"^# adapter\.target_modules: (.*)$", result.output, re.MULTILINE)
    assert matched, result.output
    counts = [int(n) for n in re.findall(r"matched (\d+)", matched.group(1))]
    assert counts and all(n > 0 for n in counts), matched.group(0)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipes_list_says_what_each_recipe_does(path: Path) -> None:
    from peftkit.recipe import recipe_summary

    task, summary = recipe_summary(path)
    assert task == load_recipe(path).task_name
    assert summary and not summary.startswith("peftkit ") and len(summary) <= 80, summary
    assert summary.split()[0] in path.read_text().splitlines()[2], "the first words of the description"


def test_commands_resolve_a_shipped_recipe_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import invoke_cli

    monkeypatch.chdir(tmp_path)
    validated = invoke_cli("validate", "seq_cls_lora")
    assert validated.exit_code == 0, validated.output
    assert '"type": "seq_cls"' in validated.output
    shipped = recipes_dir() / "seq_cls_lora.toml"
    for command in ("finetune", "plan", "sweep", "cv"):
        extra = ("--trials", "1") if command == "sweep" else ()
        result = invoke_cli(command, "seq_cls_lora.toml", *extra, "--set", "adapter.r=0")
        assert result.exit_code == 2, result.output
        assert f"{shipped}: adapter.r:" in result.output, result.output  # the shipped file was loaded
    # a file of that name in the working directory comes first
    (tmp_path / "seq_cls_lora.toml").write_text(shipped.read_text().replace("r = 8", "r = 0"))
    mine = invoke_cli("validate", "seq_cls_lora.toml")
    assert mine.exit_code == 2 and "seq_cls_lora.toml: adapter.r:" in mine.output
    assert str(shipped) not in mine.output
    near = invoke_cli("validate", "seq_cls_lor")
    assert near.exit_code == 2 and "did you mean 'seq_cls_lora'" in near.output
