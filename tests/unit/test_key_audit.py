"""Every recipe key peftkit owns has a test that shows its effect (the mapping in tests/key_effects.py)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.key_effects import KEY_EFFECT_TESTS, owned_keys

REPO = Path(__file__).resolve().parents[2]


def top_level_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return {
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")
    }


def missing_tests(mapping: dict[str, str], repo: Path) -> dict[str, str]:
    """key -> why its node id does not name a test function of the repository."""
    problems: dict[str, str] = {}
    for key, node in mapping.items():
        path, sep, name = node.partition("::")
        if not sep or not name or "::" in name:
            problems[key] = f"{node!r} is not 'path::test_function'"
        elif not (repo / path).is_file():
            problems[key] = f"{path} does not exist"
        elif name not in top_level_tests(repo / path):
            problems[key] = f"{path} has no test function {name}"
    return problems


def test_the_schema_lists_the_tables_peftkit_owns() -> None:
    keys = owned_keys()
    assert len(keys) == len(set(keys))
    prefixes = {key.split(".")[0] for key in keys}
    assert prefixes == {"model", "data", "quantization", "export", "train", "sweep", "task", "adapter"}
    for key in ("data.text_column", "train.learning_rate", "adapter.r"):  # not peftkit's, or not a key
        assert key not in keys
    for key in ("data.columns", "train.max_train_minutes", "task.qa.doc_stride", "sweep.space"):
        assert key in keys


def test_every_owned_key_has_an_effect_test() -> None:
    keys = set(owned_keys())
    untested = sorted(keys - set(KEY_EFFECT_TESTS))
    assert not untested, (
        f"recipe keys without an effect test: {untested}; write a test that shows what each changes "
        "through peftkit's public path and add it to KEY_EFFECT_TESTS in tests/key_effects.py"
    )
    stale = sorted(set(KEY_EFFECT_TESTS) - keys)
    assert not stale, f"tests/key_effects.py lists keys the recipe no longer has: {stale}"


def test_every_listed_test_exists() -> None:
    assert missing_tests(KEY_EFFECT_TESTS, REPO) == {}


def test_the_audit_fails_for_a_missing_key_or_test(tmp_path: Path) -> None:
    """The checks above are not vacuous: a key left out, or a node id without its test, is caught."""
    some_key = next(iter(KEY_EFFECT_TESTS))
    incomplete = {k: v for k, v in KEY_EFFECT_TESTS.items() if k != some_key}
    assert some_key in set(owned_keys()) - set(incomplete)
    (tmp_path / "t.py").write_text(
        "def test_here():\n    pass\n\n\nclass C:\n    def test_inner(self): ...\n"
    )
    problems = missing_tests(
        {
            "a": "t.py::test_here",
            "b": "t.py::test_gone",
            "c": "t.py::test_inner",
            "d": "nope.py::x",
            "e": "t.py",
        },
        tmp_path,
    )
    assert sorted(problems) == ["b", "c", "d", "e"]


def test_the_docs_table_is_generated_from_the_mapping() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("key_tests_table", REPO / "scripts" / "key_tests_table.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert (REPO / "docs" / "recipe-key-tests.md").read_text(encoding="utf-8") == script.render(), (
        "docs/recipe-key-tests.md is out of date: run python scripts/key_tests_table.py"
    )
