"""README's adapter-method table says exactly which methods each task takes: every cell agrees with
adapters.METHODS and its version limits under the installed versions, and each refusal is a validate-time
error naming the method and task."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from peftkit.adapters import METHODS, PREFIX_TUNING_CACHE_RENAME
from peftkit.errors import RecipeError
from peftkit.recipe import recipe_from_dict
from tests.conftest import REPO

TASK_COLUMNS = ("seq_cls", "token_cls", "qa", "seq2seq")


def readme_table() -> dict[str, dict[str, str]]:
    """method → {task → cell, "merge" → cell} from README.md's "Adapter methods" table."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Adapter methods", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, dict[str, str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.match(r"`(\w+)`", cells[0]) if len(cells) == 7 else None
        if match:
            rows[match.group(1)] = dict(zip((*TASK_COLUMNS, "merge"), cells[2:], strict=True))
    return rows


def expected_cell(method: str, task: str) -> str:
    info = METHODS[method]
    if info.tasks is not None and task not in info.tasks:
        return "refused"
    for limit in info.version_limits:
        if task in limit.tasks and info.version_problem(task):
            return f"refused with transformers {limit.transformers} and peft {limit.peft} (the lock's)"
    return "yes"


def test_readme_table_matches_the_method_table() -> None:
    rows = readme_table()
    assert set(rows) == set(METHODS)
    for method, cells in rows.items():
        for task in TASK_COLUMNS:
            assert cells[task] == expected_cell(method, task), (method, task)
        assert cells["merge"] == ("yes" if METHODS[method].mergeable else "refused"), method


@pytest.mark.parametrize(
    ("method", "task"),
    [(m, t) for m in METHODS for t in TASK_COLUMNS if expected_cell(m, t) != "yes"],
)
def test_each_refused_cell_is_refused_at_validation(tmp_path: Path, method: str, task: str) -> None:
    (tmp_path / "train.jsonl").write_text("{}\n")
    adapter: dict[str, object] = {"method": method}
    if method != "lora" and not METHODS[method].wraps_layers:
        adapter["num_virtual_tokens"] = 4
    raw = {
        "model": {"name_or_path": "prajjwal1/bert-tiny"},
        "task": {"type": task},
        "data": {"train_file": "train.jsonl"},
        "adapter": adapter,
    }
    wording = (
        "does not support the"
        if METHODS[method].tasks and task not in METHODS[method].tasks
        else "cannot train a"
    )
    with pytest.raises(RecipeError, match=rf"adapter\.method: '{method}' {wording} '{task}'"):
        recipe_from_dict(raw, base_dir=tmp_path, name="r")


def test_version_limit_holds_only_for_its_versions() -> None:
    limit = PREFIX_TUNING_CACHE_RENAME
    assert limit.problem("seq_cls", {"transformers": "5.24.0", "peft": "0.21.2"})
    assert limit.problem("seq_cls", {"transformers": "5.23.0", "peft": "0.21.2"}) is None
    assert limit.problem("seq_cls", {"transformers": "5.24.0", "peft": "0.22.0"}) is None
    assert limit.problem("seq2seq", {"transformers": "5.24.0", "peft": "0.21.2"}) is None
    message = limit.problem("seq_cls", {"transformers": "5.24.0", "peft": "0.21.2"})
    assert message is not None and "transformers 5.24.0 and peft 0.21.2" in message


@pytest.mark.skipif(
    not METHODS["prefix_tuning"].version_problem("seq_cls"), reason="the installed versions train it"
)
def test_validate_names_the_versions(tmp_path: Path) -> None:
    from tests.conftest import invoke_cli

    (tmp_path / "train.jsonl").write_text("{}\n")
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[model]\nname_or_path = "prajjwal1/bert-tiny"\n[task]\ntype = "seq_cls"\n'
        '[data]\ntrain_file = "train.jsonl"\n[adapter]\nmethod = "prefix_tuning"\nnum_virtual_tokens = 4\n'
    )
    result = invoke_cli("validate", str(recipe))
    assert result.exit_code == 2
    assert "adapter.method: 'prefix_tuning' cannot train a 'seq_cls' model with transformers" in result.output
    assert "Fix: use method = 'prompt_tuning' or 'p_tuning'" in result.output
    assert "Traceback" not in result.output
