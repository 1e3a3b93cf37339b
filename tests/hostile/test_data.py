"""Hostile data files through ``peftkit finetune``: every bad record is an error naming its file and line.

Each task's input columns (``Task.column_kinds``) are covered: seq_cls single texts and pairs, token_cls,
qa and seq2seq. The data is checked before any model weights load, so each case takes a second or two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import invoke_cli
from tests.hostile.common import assert_clear_error, assert_nothing_lost, snapshot

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TASKS = {
    "seq_cls": 'type = "seq_cls"\nmax_length = 32',
    "token_cls": 'type = "token_cls"\nmax_length = 32',
    "qa": 'type = "qa"\nmax_length = 64\ndoc_stride = 16',
    "seq2seq": 'type = "seq2seq"\nmax_source_length = 32\nmax_target_length = 16',
}


def good(task: str, i: int) -> dict[str, Any]:
    """A valid record of ``task`` (i picks its words and label)."""
    word = ["apple", "river", "stone", "cloud"][i % 4]
    if task == "seq_cls":
        return {"text": f"{word} number {i}", "label": "spam" if i % 2 else "ham"}
    if task == "token_cls":
        return {"tokens": [word, "in", "paris"], "tags": ["O", "O", "B-LOC"]}
    if task == "qa":
        context = f"The {word} is in Paris."
        return {
            "id": f"q{i}",
            "question": f"Where is the {word}?",
            "context": context,
            "answers": {"text": ["Paris"], "answer_start": [context.index("Paris")]},
        }
    return {"source": f"say {word}", "target": f"{word} said"}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def recipe(tmp_path: Path, model: Path, task: str, data: str) -> Path:
    model_keys = f'name_or_path = "{model}"'
    if task == "seq2seq":
        model_keys += f'\ndecoder_name_or_path = "{model}"'
    path = tmp_path / "recipe.toml"
    path.write_text(
        f"""[model]
{model_keys}

[task]
{TASKS[task]}

[data]
{data}

[adapter]
r = 4

[train]
max_steps = 1
eval_strategy = "no"
save_strategy = "no"
load_best_model_at_end = false
report_to = ["none"]
output_dir = "{tmp_path / "run"}"
""",
        encoding="utf-8",
    )
    return path


def finetune_with_bad_record(
    tmp_path: Path, model: Path, task: str, bad: dict[str, Any], at: int = 3, data: str = ""
) -> tuple[Any, Path]:
    """Train on 8 good records of ``task`` with ``bad`` as record ``at`` (line ``at + 1``) of train.jsonl."""
    records = [good(task, i) for i in range(8)]
    records[at] = bad
    train = write_jsonl(tmp_path / "train.jsonl", records)
    write_jsonl(tmp_path / "validation.jsonl", [good(task, i) for i in range(4)])
    files = 'train_file = "train.jsonl"\nvalidation_file = "validation.jsonl"'
    return invoke_cli("finetune", str(recipe(tmp_path, model, task, data or files))), train


CASES = {
    "seq_cls-missing-text": ("seq_cls", {"label": "ham"}, "no 'text' field"),
    "seq_cls-empty-text": ("seq_cls", {"text": "   ", "label": "ham"}, "'text' is empty"),
    "seq_cls-list-label": ("seq_cls", {"text": "apple", "label": ["ham", "spam"]}, "'label' is a list"),
    "seq_cls-missing-label": ("seq_cls", {"text": "apple"}, "no 'label' field"),
    "token_cls-empty-tokens": ("token_cls", {"tokens": [], "tags": []}, "'tokens' is an empty list"),
    "token_cls-tags-not-a-list": ("token_cls", {"tokens": ["a"], "tags": "O"}, "'tags' is a str"),
    "qa-empty-question": ("qa", {**good("qa", 3), "question": ""}, "'question' is empty"),
    "qa-missing-context": (
        "qa",
        {k: v for k, v in good("qa", 3).items() if k != "context"},
        "no 'context' field",
    ),
    "seq2seq-empty-source": ("seq2seq", {"source": "", "target": "x"}, "'source' is empty"),
    "seq2seq-missing-target": ("seq2seq", {"source": "say it"}, "no 'target' field"),
}


@pytest.mark.hostile("clear_error")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_bad_record_is_named_by_file_and_line(case: str, tmp_path: Path, tiny_bert_dir: Path) -> None:
    task, bad, problem = CASES[case]
    result, train = finetune_with_bad_record(tmp_path, tiny_bert_dir, task, bad)
    assert_clear_error(result, f"{train}:4:", problem)
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


@pytest.mark.hostile("clear_error")
def test_a_pair_without_its_second_text_is_named_by_file_and_line(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    """seq_cls pairs: a record without text_pair (mapped from the user's column) names the user's column."""
    records = [{"s1": f"apple {i}", "s2": f"pear {i}", "label": i % 2} for i in range(8)]
    records[5] = {"s1": "apple", "label": 0}
    train = write_jsonl(tmp_path / "train.jsonl", records)
    data = 'train_file = "train.jsonl"\ncolumns = {text = "s1", text_pair = "s2"}'
    result = invoke_cli("finetune", str(recipe(tmp_path, tiny_bert_dir, "seq_cls", data)))
    assert_clear_error(result, f"{train}:6:", "no 's2' (text_pair) field")


@pytest.mark.hostile("clear_error")
def test_csv_lines_count_quoted_line_breaks_and_every_bad_record_is_counted(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    """In a CSV a quoted field spanning lines moves the next records down; of 7 bad records 5 are shown."""
    lines = ["text,label", '"two\nlines",ham'] + [f"word {i},{'spam' if i % 2 else 'ham'}" for i in range(10)]
    for i in (4, 5, 6, 7, 8, 9, 10):  # empty texts on file lines 6..12
        lines[i] = ",ham"
    train = tmp_path / "train.csv"
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = 'train_file = "train.csv"'
    result = invoke_cli("finetune", str(recipe(tmp_path, tiny_bert_dir, "seq_cls", data)))
    assert_clear_error(result, "7 record(s) cannot be used", f"{train}:6:", f"{train}:10:", "and 2 more")
    assert f"{train}:11:" not in result.output


@pytest.mark.hostile("clear_error")
def test_a_one_example_dataset_without_validation_split_is_a_message(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [good("seq_cls", 0)])
    before = snapshot(tmp_path)
    result = invoke_cli(
        "finetune", str(recipe(tmp_path, tiny_bert_dir, "seq_cls", 'train_file = "train.jsonl"'))
    )
    assert_clear_error(result, str(train), "1 example(s): too few to hold out", "validation_file")
    assert_nothing_lost(before, snapshot(tmp_path), tmp_path)


@pytest.mark.hostile("clear_error")
def test_an_unlabelled_validation_split_is_refused_with_the_way_out(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    write_jsonl(tmp_path / "train.jsonl", [good("seq_cls", i) for i in range(8)])
    validation = write_jsonl(tmp_path / "validation.jsonl", [{"text": "apple", "label": None}] * 3)
    data = 'train_file = "train.jsonl"\nvalidation_file = "validation.jsonl"'
    result = invoke_cli("finetune", str(recipe(tmp_path, tiny_bert_dir, "seq_cls", data)))
    assert_clear_error(
        result, str(validation), "validation split has no 'label'", "splits = {validation = false}"
    )


@pytest.mark.hostile("clear_error")
def test_a_label_id_beyond_label_list_is_named(tmp_path: Path, tiny_bert_dir: Path) -> None:
    records = [{"text": f"apple {i}", "label": i % 2} for i in range(8)]
    records[2]["label"] = 5
    write_jsonl(tmp_path / "train.jsonl", records)
    path = recipe(tmp_path, tiny_bert_dir, "seq_cls", 'train_file = "train.jsonl"')
    path.write_text(
        path.read_text().replace('type = "seq_cls"', 'type = "seq_cls"\nlabel_list = ["no", "yes"]'),
        encoding="utf-8",
    )
    assert_clear_error(invoke_cli("finetune", str(path)), "label id 5 is out of range", "label_list")


@pytest.mark.hostile("clear_error")
@pytest.mark.parametrize(
    ("data", "key"),
    [
        ('train_file = "train.jsonl"\nsplits = {train = false}', "data.splits.train"),
        ('train_file = "train.jsonl"\nsplits = {validation = "dev_matched"}', "data.splits.validation"),
        ('train_file = "train.jsonl"\nrevision = "main"', "data.revision"),
        ('train_file = "train.jsonl"\nsplits = {dev = "dev"}', "data.splits.dev"),
    ],
    ids=["skip-train", "rename-with-files", "revision-of-local-files", "unknown-split"],
)
def test_split_and_revision_mistakes_fail_validate(
    tmp_path: Path, tiny_bert_dir: Path, data: str, key: str
) -> None:
    write_jsonl(tmp_path / "train.jsonl", [good("seq_cls", i) for i in range(8)])
    path = recipe(tmp_path, tiny_bert_dir, "seq_cls", data)
    assert_clear_error(invoke_cli("validate", str(path)), str(path.name), key)


@pytest.mark.hostile("clear_error")
def test_a_split_name_the_folder_lacks_is_named(tmp_path: Path, tiny_bert_dir: Path) -> None:
    folder = tmp_path / "glue"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [good("seq_cls", i) for i in range(8)])
    data = f'dataset = "{folder}"\nsplits = {{validation = "validation_matched"}}'
    result = invoke_cli("finetune", str(recipe(tmp_path, tiny_bert_dir, "seq_cls", data)))
    assert_clear_error(result, "data.splits.validation = 'validation_matched'", "no validation_matched.<ext>")


REFERENCES = {"seq_cls": "label", "token_cls": "tags", "qa": "answers", "seq2seq": "target"}


@pytest.mark.hostile("success")
@pytest.mark.parametrize("task", ["token_cls", "qa", "seq2seq"])
def test_a_test_split_without_references_is_predicted_not_scored(
    task: str, tmp_path: Path, tiny_bert_dir: Path
) -> None:
    """Every task: a test file without the reference column trains, saves the adapter, writes the test
    predictions (no references) and no test metrics (seq_cls: tests/integration/test_mrpc_recipe.py)."""
    write_jsonl(tmp_path / "train.jsonl", [good(task, i) for i in range(8)])
    write_jsonl(tmp_path / "validation.jsonl", [good(task, i) for i in range(3)])
    unlabelled = [{k: v for k, v in good(task, i).items() if k != REFERENCES[task]} for i in range(3)]
    write_jsonl(tmp_path / "test.jsonl", unlabelled)
    files = 'train_file = "train.jsonl"\nvalidation_file = "validation.jsonl"\ntest_file = "test.jsonl"'
    result = invoke_cli("finetune", str(recipe(tmp_path, tiny_bert_dir, task, files)))
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    assert (run / "adapter_model.safetensors").is_file()
    predictions = [json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    assert len(predictions) == 3 and all("reference" not in p for p in predictions)
    metrics = json.loads((run / "metrics.json").read_text())
    assert "validation" in metrics and "test" not in metrics
