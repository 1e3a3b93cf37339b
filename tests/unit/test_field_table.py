"""The shipped table of ``[train]`` / ``[adapter]`` fields (peftkit/recipe/library_fields.json) is the one
the installed transformers and peft give, judges values as their own annotations do, and spares
``validate`` of a recipe-only mistake from importing torch, transformers and peft."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from peftkit.recipe import check_value, field_table
from tests.conftest import REPO

SAMPLES: list[Any] = [1, 0, -3, 1.5, "x", "steps", "epoch", "no", "none", True, None, [1, 2], ["a"], {"a": 1}]


def test_shipped_table_is_the_installed_libraries():
    shipped = json.loads(field_table.TABLE_PATH.read_text(encoding="utf-8"))
    assert shipped["versions"] == field_table.installed_versions(), (
        "library_fields.json was generated with other versions: "
        "run `python -m peftkit.recipe.field_table --write`"
    )
    assert shipped == json.loads(json.dumps(field_table.build_table())), (
        "library_fields.json is stale: run `python -m peftkit.recipe.field_table --write`"
    )


def _live_classes() -> list[Any]:
    import peft
    from transformers import Seq2SeqTrainingArguments, TrainingArguments

    from peftkit.adapters import METHODS

    return [TrainingArguments, Seq2SeqTrainingArguments] + [
        getattr(peft, m.peft_config) for m in METHODS.values()
    ]


def test_rebuilt_annotations_judge_values_as_the_originals():
    """Every field of every forwarded class, every sample value: the same verdict and the same message."""
    compared = 0
    for cls in _live_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name not in hints:
                continue
            rebuilt = field_table.annotation_of(json.loads(json.dumps(field_table.spec_of(hints[f.name]))))
            for value in SAMPLES:
                assert check_value(value, rebuilt) == check_value(value, hints[f.name]), (cls, f.name, value)
                compared += 1
    assert compared > 5000


def test_other_versions_fall_back_to_the_classes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    stale = json.loads(field_table.TABLE_PATH.read_text(encoding="utf-8"))
    stale["versions"] = {"transformers": "0.0.1", "peft": "0.0.1"}
    stale["train"]["TrainingArguments"] = {}  # a table that would refuse every [train] key
    path = tmp_path / "library_fields.json"
    path.write_text(json.dumps(stale), encoding="utf-8")
    monkeypatch.setattr(field_table, "TABLE_PATH", path)
    field_table._table.cache_clear()
    try:
        assert "learning_rate" in field_table.training_fields(None)
    finally:
        field_table._table.cache_clear()


@pytest.mark.parametrize(
    ("tables", "expected"),
    [
        ('[adapter]\nr = "eight"\n[train]\nlerning_rate = 1e-4\n', ["adapter.r", "train.lerning_rate"]),
        ('[adapter]\n[train]\nreport_to = ["wandb"]\n', ["train.report_to", "pip install wandb"]),
    ],
    ids=["typo_and_type", "report_to_not_installed"],
)
def test_validate_of_a_recipe_mistake_imports_no_heavy_library(
    tmp_path: Path, tables: str, expected: list[str]
):
    """Recipe mistakes are found from the table and the installed packages alone: no torch, transformers
    or peft in the process (importing them is most of what validate costs)."""
    (tmp_path / "train.csv").write_text("text,label\nhi,0\nho,1\n", encoding="utf-8")
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[model]\nname_or_path = "m"\n[task]\ntype = "seq_cls"\n[data]\ntrain_file = "train.csv"\n' + tables,
        encoding="utf-8",
    )
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom peftkit.cli import main\n"
        f"result = CliRunner().invoke(main, ['validate', {str(recipe)!r}])\n"
        "print(result.exit_code)\nprint(result.output)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    ).stdout
    lines = out.strip().splitlines()
    assert lines[0] == "2"
    assert all(text in out for text in expected), out
    assert lines[-1] == "[]", out


VALIDATE_AND_REPORT = (
    "import sys\nfrom peftkit.cli import {entry}\n"
    "sys.argv = ['peftkit', 'validate', {recipe!r}]\n"
    "try:\n    {call}\nexcept SystemExit as exc:\n    code = exc.code\n"
    "loaded = sys.modules.get('bitsandbytes')\n"
    "print('exit', code, 'bitsandbytes', 'loaded' if loaded is not None else 'not loaded')\n"
    "import bitsandbytes  # importable afterwards unless the process was the CLI's own\n"
    "print('importable')\n"
)


def _validate_in_subprocess(tmp_path: Path, quantization: str, *, own_process: bool) -> str:
    """``peftkit validate`` on a tiny BERT without weights, as the CLI's own process (``cli.run``) or called
    in-process (click's ``main``, as tests and notebooks do); what it printed about bitsandbytes."""
    from tests.hostile.test_recipes import _recipe, write_models

    models = write_models(tmp_path)
    recipe = tmp_path / "r.toml"
    recipe.write_text(_recipe(models["bare"], models["train"], {}, quantization), encoding="utf-8")
    entry, call = ("run", "run()") if own_process else ("main", "main.main(standalone_mode=True)")
    code = VALIDATE_AND_REPORT.format(entry=entry, recipe=str(recipe), call=f"{call}; code = 0")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )
    return result.stdout + result.stderr


def test_validate_process_leaves_bitsandbytes_unimported(tmp_path: Path) -> None:
    """The `peftkit validate` process of a recipe that uses no bitsandbytes never imports it (peft would:
    about 2 s of validate's model checks), and the recipe is still checked against the model and peft."""
    out = _validate_in_subprocess(tmp_path, "", own_process=True)
    assert "exit 0 bitsandbytes not loaded" in out, out
    assert "# adapter: lora adapts 4 modules (query, value)" in out, out
    assert "importable" not in out  # the process was validate's own: bitsandbytes stays blocked


def test_validate_in_process_leaves_bitsandbytes_importable(tmp_path: Path) -> None:
    """Called in-process (a test runner, a notebook), validate changes nothing a later QLoRA run needs."""
    out = _validate_in_subprocess(tmp_path, "", own_process=False)
    assert "exit 0 bitsandbytes" in out and "importable" in out, out


def test_validate_of_a_qlora_recipe_checks_with_bitsandbytes(tmp_path: Path) -> None:
    out = _validate_in_subprocess(tmp_path, "[quantization]\nbits = 4\n", own_process=True)
    assert "exit 0 bitsandbytes" in out, out
    assert "importable" in out, out  # not blocked: the recipe uses it
