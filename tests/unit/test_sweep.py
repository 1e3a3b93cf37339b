"""The [sweep] table: validation messages, the search space, and the best recipe written as TOML."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from peftkit.recipe import RecipeError, recipe_from_dict
from peftkit.recipe.sweep_table import flatten_space, parse_sweep_table
from peftkit.recipe.toml_writer import to_toml, toml_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def recipe_data(tmp_path: Path, sweep: Any) -> dict[str, Any]:
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\n")
    return {
        "model": {"name_or_path": "bert-base-uncased"},
        "task": {"type": "seq_cls"},
        "data": {"train_file": "train.csv"},
        "adapter": {"r": 8},
        "sweep": sweep,
    }


def problems_of(tmp_path: Path, sweep: Any) -> str:
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict(recipe_data(tmp_path, sweep), base_dir=tmp_path, source="r.toml")
    return str(caught.value)


def test_a_valid_sweep_loads_and_finetune_keeps_it_aside(tmp_path: Path) -> None:
    sweep = {
        "metric": "f1_macro",
        "space": {
            "train.learning_rate": {"log_uniform": [1e-5, 1e-3]},
            "adapter.r": {"choice": [4, 8, 16]},
            "adapter.lora_dropout": {"uniform": [0.0, 0.2]},
            "train.num_train_epochs": {"int": [1, 3]},
        },
    }
    recipe = recipe_from_dict(recipe_data(tmp_path, sweep), base_dir=tmp_path)
    assert recipe.sweep == sweep
    assert recipe.adapter["r"] == 8  # the base values are the recipe's own
    spec, problems = parse_sweep_table(recipe.sweep)
    assert not problems and spec is not None
    assert [p.kind for p in spec.parameters] == ["log_uniform", "choice", "uniform", "int"]


def test_unknown_parameter_path_gets_did_you_mean(tmp_path: Path) -> None:
    text = problems_of(tmp_path, {"space": {"adapter.rnk": {"choice": [4, 8]}}})
    assert 'sweep.space."adapter.rnk"' in text and "did you mean 'rank'?" in text
    text = problems_of(tmp_path, {"space": {"train.learning_rat": {"uniform": [1e-5, 1e-3]}}})
    assert "did you mean 'learning_rate'?" in text
    text = problems_of(tmp_path, {"space": {"trian.learning_rate": {"uniform": [1e-5, 1e-3]}}})
    assert "did you mean 'train'?" in text


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"log_uniform": [0, 1e-3]}, "bad log_uniform range"),
        ({"uniform": [1e-3, 1e-5]}, "bad uniform range"),
        ({"int": [1.5, 3]}, "bad int range"),
        ({"choice": []}, "bad choice list"),
        ({"uniformm": [0, 1]}, "did you mean 'uniform'?"),
        ({"uniform": [0, 1], "choice": [1]}, "expected one distribution"),
        (3e-4, "expected one distribution"),
    ],
)
def test_bad_distributions_are_named(tmp_path: Path, spec: Any, message: str) -> None:
    text = problems_of(tmp_path, {"space": {"train.learning_rate": spec}})
    assert message in text and 'sweep.space."train.learning_rate"' in text


def test_values_the_sweep_can_draw_are_validated_like_overrides(tmp_path: Path) -> None:
    text = problems_of(tmp_path, {"space": {"adapter.r": {"choice": [0, 8]}}})
    assert "with value 0: adapter.r: must be at least 1" in text
    text = problems_of(tmp_path, {"space": {"train.num_train_epochs": {"choice": ["two"]}}})
    assert "train.num_train_epochs" in text and "expected" in text


def test_table_level_mistakes_are_all_reported(tmp_path: Path) -> None:
    text = problems_of(
        tmp_path,
        {"sampler": "tpee", "pruner": 3, "metrik": "f1", "space": {"train.output_dir": {"choice": ["a"]}}},
    )
    assert "sweep.sampler" in text and "did you mean 'tpe'?" in text
    assert "sweep.pruner: expected str" in text
    assert "sweep.metrik: unknown key" in text and "did you mean 'metric'?" in text
    assert "cannot be swept" in text
    assert "the recipe has 4 problems" in text
    assert "sweep.space: missing" in problems_of(tmp_path, {"metric": "f1_macro"})


def test_unquoted_dotted_keys_are_flattened() -> None:
    space = tomllib.loads(
        '[space]\ntrain.learning_rate = {uniform = [0.1, 0.2]}\n"adapter.r" = {choice = [4]}'
    )
    assert flatten_space(space["space"]) == {
        "train.learning_rate": {"uniform": [0.1, 0.2]},
        "adapter.r": {"choice": [4]},
    }


def test_toml_writer_round_trips_recipe_data() -> None:
    data = {
        "model": {"name_or_path": "/abs/path with space/mini", "trust_remote_code": False},
        "task": {"type": "seq_cls", "label_list": ["ham", "spam"], "max_length": 64},
        "data": {"columns": {"text": "sms", "label": "y"}, "seed": 7, "unset": None},
        "train": {"learning_rate": 1.2345e-05, "report_to": [], "quote": 'a "b" \\ c\n'},
    }
    parsed = tomllib.loads(to_toml(data))
    data["data"].pop("unset")
    assert parsed == data
    assert toml_value(1e-05) == "1e-05" and tomllib.loads(f"v = {toml_value(1e-05)}")["v"] == 1e-05
