"""Hostile recipes (issue 19 item 5, issue 20): each passed ``peftkit validate`` and then failed with a
traceback inside transformers, peft or the TOML layer once the model had loaded. Each now ends at
``validate`` (exit 2, one message naming the file and ``table.key``, no traceback) without any model
weights: the recipes' model folder holds only ``config.json`` and the tokenizer, and ``from_pretrained``
of every model class fails the test if it is called. The same recipes through ``peftkit finetune`` (with
weights present) end the same way before training: no run directory is created.

Each case's ``validate`` wall time is printed (run with ``-s`` to see it); it is not asserted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import invoke_cli, save_tiny_bert
from tests.hostile.common import assert_clear_error

DEEP = 3000  # TOML nested this deep ended in a RecursionError inside tomllib


def _recipe(model: Path, train_file: Path, edit: dict[str, dict[str, Any]], raw: str = "") -> str:
    tables: dict[str, dict[str, Any]] = {
        "model": {"name_or_path": str(model)},
        "task": {"type": "seq_cls", "max_length": 32},
        "data": {"train_file": str(train_file)},
        "adapter": {},  # lora on peft's default BERT targets (query, value)
        "train": {"output_dir": "out", "max_steps": 1},
    }
    for table, keys in edit.items():
        tables.setdefault(table, {}).update(keys)
    lines = []
    for table, keys in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {_toml(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n" + raw


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return value
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


# (case id, recipe edits, raw TOML appended, --set overrides, what the message names besides the file)
CASES: list[tuple[str, dict[str, dict[str, Any]], str, list[str], list[str]]] = [
    ("learning_rate_negative", {"train": {"learning_rate": -1}}, "", [], ["train.learning_rate", "positive"]),
    ("learning_rate_nan", {"train": {"learning_rate": "nan"}}, "", [], ["train.learning_rate", "finite"]),
    ("learning_rate_inf", {"train": {"learning_rate": "inf"}}, "", [], ["train.learning_rate", "finite"]),
    ("train_batch_size_0", {"train": {"per_device_train_batch_size": 0}}, "", [],
     ["train.per_device_train_batch_size", "at least 1"]),
    ("eval_batch_size_negative", {"train": {"per_device_eval_batch_size": -1}}, "", [],
     ["train.per_device_eval_batch_size", "at least 1"]),
    ("gradient_accumulation_0", {"train": {"gradient_accumulation_steps": 0}}, "", [],
     ["train.gradient_accumulation_steps"]),
    ("warmup_steps_negative", {"train": {"warmup_steps": -5}}, "", [], ["train.warmup_steps"]),
    ("logging_steps_0", {"train": {"logging_steps": 0}}, "", [], ["train.logging_steps"]),
    ("seed_negative", {"train": {"seed": -1}}, "", [], ["train.seed"]),
    ("data_seed_negative", {"data": {"seed": -1}}, "", [], ["data.seed"]),
    ("dataloader_workers_negative", {"train": {"dataloader_num_workers": -1}}, "", [],
     ["train.dataloader_num_workers"]),
    ("save_steps_not_multiple_of_eval_steps",
     {"train": {"eval_strategy": "steps", "save_strategy": "steps", "eval_steps": 3, "save_steps": 5}},
     "", [], ["train.save_steps", "multiple of eval_steps"]),
    ("metric_not_produced", {"train": {"metric_for_best_model": "bleu"}}, "", [],
     ["train.metric_for_best_model", "f1_macro"]),
    ("target_modules_llama_names_on_bert", {"adapter": {"target_modules": ["q_proj", "v_proj"]}}, "", [],
     ["adapter.target_modules", "match no module", "query"]),
    ("target_modules_empty", {"adapter": {"target_modules": []}}, "", [],
     ["adapter.target_modules", "empty"]),
    ("target_modules_comma_string", {"adapter": {"target_modules": "query,value"}}, "", [],
     ["adapter.target_modules", "['query', 'value']"]),
    ("layers_to_transform_out_of_range", {"adapter": {"layers_to_transform": [99]}}, "", [],
     ["adapter.layers_to_transform", "2 layers"]),
    ("loha_rank_0", {"adapter": {"method": "loha", "r": 0}}, "", [], ["adapter.r", "at least 1"]),
    ("flash_attention_not_installed", {"model": {"attn_implementation": "flash_attention_2"}}, "", [],
     ["model.attn_implementation", "pip install flash-attn"]),
    ("max_length_past_positions", {"task": {"max_length": 1024}}, "", [],
     ["task.max_length", "512 positions"]),
    ("set_list_not_toml", {}, "", ["adapter.target_modules=[query"],
     ["--set adapter.target_modules", "not a TOML value"]),
    ("set_list_unquoted", {}, "", ["adapter.target_modules=[query, value]"],
     ["--set adapter.target_modules", "not a TOML value"]),
    ("toml_nested_deep", {}, "[export]\nx = " + "[" * DEEP + "]" * DEEP + "\n", [],
     ["line ", f"nested {DEEP} levels deep"]),
    ("set_nested_deep", {}, "", ["train.x=" + "[" * DEEP + "]" * DEEP],
     ["--set train.x", f"nested {DEEP} levels deep"]),
    ("prefix_tuning_on_bert_classifier", {"adapter": {"method": "prefix_tuning", "num_virtual_tokens": 4}},
     "", [], ["adapter.method", "prefix_tuning"]),
    ("report_to_wandb_not_installed", {"train": {"report_to": ["wandb"]}}, "", [],
     ["train.report_to", "pip install wandb"]),
    ("report_to_mlflow_not_installed", {"train": {"report_to": ["mlflow"]}}, "", [],
     ["train.report_to", "pip install mlflow"]),
]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT without weights (config + tokenizer only) and the same with weights, and training data."""
    return write_models(tmp_path_factory.mktemp("hostile-recipes"))


def write_models(root: Path) -> dict[str, Path]:
    """The cases' inputs in ``root`` (also used by scripts/bench_validate.py)."""
    full = save_tiny_bert(root / "bert")
    bare = root / "bert-no-weights"
    bare.mkdir()
    for path in full.iterdir():
        if path.suffix != ".safetensors":
            (bare / path.name).write_bytes(path.read_bytes())
    train = root / "train.jsonl"
    train.write_text("".join(f'{{"text": "word {i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(8)))
    return {"bare": bare, "full": full, "train": train}


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any model's weights are loaded."""
    from transformers import PreTrainedModel

    def refuse(cls: Any, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{cls.__name__}.from_pretrained called: weights were loaded")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


def _write(folder: Path, model: Path, train: Path, case: tuple[Any, ...]) -> tuple[Path, list[str]]:
    name, edit, raw, sets, _ = case
    recipe = folder / f"{name}.toml"
    recipe.write_text(_recipe(model, train, edit, raw))
    return recipe, [arg for value in sets for arg in ("--set", value)]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
@pytest.mark.hostile("clear_error")
def test_validate_refuses_without_weights(
    case: tuple[Any, ...], models: dict[str, Path], tmp_path: Path, no_weights: None
) -> None:
    recipe, sets = _write(tmp_path, models["bare"], models["train"], case)
    started = time.perf_counter()
    result = invoke_cli("validate", str(recipe), *sets)
    print(f"\nvalidate {case[0]}: {time.perf_counter() - started:.2f} s")
    assert_clear_error(result, f"{recipe}: ", *case[4])
    assert result.output.count(f"{recipe}: ") == 2, result.output  # the header and one problem


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
@pytest.mark.hostile("clear_error")
def test_finetune_refuses_before_training(
    case: tuple[Any, ...], models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe, sets = _write(tmp_path, models["full"], models["train"], case)
    monkeypatch.chdir(tmp_path)
    result = invoke_cli("finetune", str(recipe), *sets)
    assert_clear_error(result, f"{recipe}: ", *case[4])
    assert not (tmp_path / "out").exists(), "a run directory was started"


def test_validate_says_what_each_pattern_matched(
    models: dict[str, Path], tmp_path: Path, no_weights: None
) -> None:
    recipe, _ = _write(tmp_path, models["bare"], models["train"], ("ok", {}, "", [], []))
    result = invoke_cli("validate", str(recipe), "--set", 'adapter.target_modules=["query", "value", "key"]')
    assert result.exit_code == 0, result.output
    assert "# adapter.target_modules: 'query' matched 2, 'value' matched 2, 'key' matched 2" in result.output
    assert "# adapter: lora adapts 6 modules (key, query, value)" in result.output
