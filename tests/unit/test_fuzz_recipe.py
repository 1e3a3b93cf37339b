"""Hostile recipes: mutated valid recipes get a RecipeError or a valid Recipe, never another exception.

Hypothesis mutates a valid recipe (values of other types, huge and non-finite numbers, unicode, deleted and
unknown keys and tables, deeper nesting, tables replaced by scalars), both as data (``recipe_from_dict``)
and as TOML text (``load_recipe``, including byte-level damage). Bounded and derandomized, so CI runs the
same cases every time; each test prints how many cases it tried.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftkit.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict
from peftkit.recipe.toml_writer import to_toml

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def valid_recipe(model_dir: Path) -> dict[str, Any]:
    return {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "task": {"type": "seq_cls", "max_length": 32, "label_list": ["ham", "spam"]},
        "data": {
            "train_file": "train.csv",
            "validation_file": "train.csv",
            "columns": {"text": "text", "label": "label"},
            "max_train_samples": 100,
        },
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "train": {
            "num_train_epochs": 1,
            "learning_rate": 1e-3,
            "save_strategy": "steps",
            "eval_strategy": "steps",
            "save_steps": 5,
            "eval_steps": 5,
            "resume": "auto",
            "early_stopping_patience": 2,
            "output_dir": "runs/fuzz",
        },
        "export": {"dtype": "float32", "formats": ["safetensors"]},
    }


# Keys worth trying: the recipe's own, forwarded ones with rules attached, and ones that exist elsewhere.
KEYS = [
    "model", "task", "data", "adapter", "quantization", "train", "export", "type", "name_or_path",
    "tokenizer", "gguf_file", "trust_remote_code", "dtype", "method", "r", "alpha", "lora_alpha",
    "target_modules", "modules_to_save", "label_list", "num_labels", "columns", "text", "label",
    "train_file", "dataset", "validation_split", "bits", "quant_type", "learning_rate", "fp16", "bf16",
    "deepspeed", "resume", "output_dir", "load_best_model_at_end", "eval_strategy", "save_strategy",
    "early_stopping_patience", "optim", "seed", "evaluation_strategy", "do_train", "formats",
]  # fmt: skip
SPECIAL_STRINGS = [
    "", " ", "auto", "never", "lora", "prefix_tuning", "seq_cls", "seq2seq", "token_cls", "qa", "epoch",
    "steps", "no", "zero3", "../../etc/passwd", "/", "~", ".", "nope.csv", "pypi:", "pypi:nonexistent_pkg/x",
    "\x00", "\ud800", "🙂" * 40, "ü", "a" * 5000, "1e999", "nan", "inf", "true", "[", "{", '"', "\\",
]  # fmt: skip
SPECIAL_NUMBERS = [0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**100, -(10**100), 1e308, -0.0, 1e-320]

# Edits that keep a table valid on its own, so that cross-table rules get exercised too.
PLAUSIBLE: list[tuple[str, str, Any]] = [
    ("train", "eval_strategy", "no"), ("train", "load_best_model_at_end", False), ("train", "fp16", True),
    ("train", "bf16", True), ("train", "deepspeed", "zero2"), ("train", "resume", "never"),
    ("train", "optim", "adamw_bnb_8bit"), ("train", "save_strategy", "epoch"), ("train", "max_steps", 3),
    ("adapter", "method", "ia3"), ("adapter", "method", "prefix_tuning"), ("adapter", "method", "loha"),
    ("adapter", "r", 0), ("adapter", "lora_dropout", 1.0), ("quantization", "bits", 4),
    ("quantization", "bits", 8), ("model", "gguf_file", "x.gguf"), ("model", "trust_remote_code", True),
    ("data", "dataset", "."), ("data", "validation_split", 0.5), ("task", "type", "token_cls"),
    ("task", "type", "seq2seq"), ("task", "type", "qa"), ("task", "num_labels", 1), ("task", "num_labels", 3),
    ("task", "label_list", ["a", "a"]), ("train", "early_stopping_patience", 0),
    ("export", "formats", ["onnx"]),
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(SPECIAL_NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=16),
    st.sampled_from(SPECIAL_STRINGS),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=3)
    ),
    max_leaves=8,
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=12))


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position in a nested recipe: dict keys and list indexes."""
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        found.append((*prefix, key))
        found += paths(child, (*prefix, key))
    return found


def containers(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if isinstance(node, dict) else []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        found += containers(child, (*prefix, key))
    return found


def at(node: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        node = node[key]
    return node


def mutate(recipe: dict[str, Any], data: st.DataObject) -> tuple[dict[str, Any], list[str]]:
    """One to four random edits of the recipe; returns it with a description of each edit."""
    recipe = copy.deepcopy(recipe)
    done = []
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        edit = data.draw(st.sampled_from(["set", "delete", "add", "wrap", "retype_table", "plausible"]))
        if edit == "plausible":
            table, key, value = data.draw(st.sampled_from(PLAUSIBLE), label="plausible")
            if not isinstance(recipe.get(table), dict):
                recipe[table] = {}
            recipe[table][key] = copy.deepcopy(value)  # later edits must not change PLAUSIBLE itself
            done.append(f"plausible {table}.{key}={value!r}")
            continue
        spots = paths(recipe)
        if edit == "add" or not spots:
            where = data.draw(st.sampled_from(containers(recipe)), label="table")
            key, value = data.draw(keys, label="key"), data.draw(values, label="value")
            at(recipe, where)[key] = value
            done.append(f"add {where}+{key!r}={value!r}")
            continue
        path = data.draw(st.sampled_from(spots), label="path")
        parent, last = at(recipe, path[:-1]), path[-1]
        if edit == "set":
            parent[last] = data.draw(values, label="value")
        elif edit == "delete":
            del parent[last]
        elif edit == "wrap":
            parent[last] = data.draw(st.sampled_from([[parent[last]], {"x": parent[last]}]), label="wrap")
        else:  # a whole table becomes a scalar or a list
            table = data.draw(st.sampled_from(sorted(k for k in recipe if isinstance(k, str))), label="tbl")
            recipe[table] = data.draw(scalars | st.lists(scalars, max_size=2), label="scalar")
            path = (table,)
        done.append(f"{edit} {path}")
    return recipe, done


def outcome(call: Callable[[], Recipe], source: str) -> str:
    """'valid' or 'refused'; any exception other than RecipeError fails the test (with its traceback)."""
    try:
        recipe = call()
    except RecipeError as exc:
        message = str(exc)
        assert message.startswith(f"{source}: the recipe has"), message
        assert exc.problems and all(p.key and p.problem for p in exc.problems)
        return "refused"
    assert isinstance(recipe, Recipe)
    assert recipe.task_name and recipe.adapter["method"]
    return "valid"


@pytest.fixture
def recipe_folder(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()  # recipe validation checks the path exists; it loads no model
    (tmp_path / "train.csv").write_text("text,label\nwin cash,spam\nhello,ham\n")
    return tmp_path


def report(name: str, counts: dict[str, int], capsys: pytest.CaptureFixture[str]) -> None:
    tried = sum(counts.values())
    with capsys.disabled():
        print(f"\n{name}: {tried} cases tried ({counts['valid']} valid, {counts['refused']} refused)")


def test_the_unmutated_recipe_is_valid(recipe_folder: Path) -> None:
    """The fuzz starts from a recipe that loads, both as data and as TOML text."""
    raw = valid_recipe(recipe_folder / "model")
    assert outcome(lambda: recipe_from_dict(raw, base_dir=recipe_folder), "<dict>") == "valid"
    path = recipe_folder / "r.toml"
    path.write_text(to_toml(raw))
    assert outcome(lambda: load_recipe(path), str(path)) == "valid"


def test_mutated_recipe_data(recipe_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = valid_recipe(recipe_folder / "model")
    counts = {"valid": 0, "refused": 0}

    @FUZZ
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        recipe, edits = mutate(base, data)
        data.draw(st.just(edits), label="edits made")  # shown when a case fails
        counts[outcome(lambda: recipe_from_dict(recipe, base_dir=recipe_folder, name="fuzz"), "<dict>")] += 1

    check()
    report("recipe_from_dict fuzz", counts, capsys)
    assert counts["refused"] > 0 and sum(counts.values()) >= 150


def test_mutated_recipe_files(recipe_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = valid_recipe(recipe_folder / "model")
    path = recipe_folder / "fuzz.toml"
    counts = {"valid": 0, "refused": 0}

    @FUZZ
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        recipe, _ = mutate(base, data)
        text = to_toml(recipe).encode("utf-8", "surrogatepass")
        damage = data.draw(st.sampled_from(["none", "truncate", "insert", "bytes"]), label="damage")
        if damage == "truncate":
            text = text[: data.draw(st.integers(0, len(text)), label="cut")]
        elif damage == "insert":
            spot = data.draw(st.integers(0, len(text)), label="spot")
            junk = data.draw(st.sampled_from(["[", "]", "=", '"', "\n[train]\n", "\n[[x]]\n", "{", "#"]))
            text = text[:spot] + junk.encode() + text[spot:]
        elif damage == "bytes":
            spot = data.draw(st.integers(0, len(text)), label="spot")
            text = text[:spot] + data.draw(st.binary(min_size=1, max_size=4), label="bytes") + text[spot:]
        path.write_bytes(text)
        counts[outcome(lambda: load_recipe(path), str(path))] += 1

    check()
    report("load_recipe fuzz", counts, capsys)
    assert counts["refused"] > 0 and sum(counts.values()) >= 150


def test_mutated_overrides(recipe_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--set`` strings from the command line go through the same validation."""
    path = recipe_folder / "ok.toml"
    path.write_text(to_toml(valid_recipe(recipe_folder / "model")))
    counts = {"valid": 0, "refused": 0}
    dotted = st.lists(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), min_size=0, max_size=4)
    plausible = st.sampled_from(
        [f"{t}.{k}={json.dumps(v)}" for t, k, v in PLAUSIBLE]
        + ["train.learning_rate=1e-4", "adapter.r=16", "train.resume=auto", "data.columns.text=text"]
    )
    right = st.one_of(
        st.text(max_size=12), st.sampled_from(["1", "1e999", "[1,", "{a=1}", "true", '"x"', "", "=="])
    )

    @FUZZ
    @given(
        overrides=st.lists(st.tuples(dotted, right), max_size=2),
        good=st.lists(plausible, max_size=3),
        raw=st.lists(st.text(max_size=10), max_size=1),
    )
    def check(overrides: list[tuple[list[str], str]], good: list[str], raw: list[str]) -> None:
        sets = [".".join(keys_) + "=" + value for keys_, value in overrides] + good + raw
        counts[outcome(lambda: load_recipe(path, sets), str(path))] += 1

    check()
    report("--set fuzz", counts, capsys)
    assert counts["refused"] > 0 and sum(counts.values()) >= 150
