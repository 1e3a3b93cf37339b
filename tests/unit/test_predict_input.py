"""predict's input layer without a model: records keep their lines, a .txt line fills the task's text field,
fields map and are checked with line numbers (the CLI path is tests/integration/test_predict_io.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.data import parse_records
from peftkit.errors import DataError
from peftkit.predicting import (
    PredictInput,
    PredictSource,
    check_input,
    parse_columns,
    parse_keep,
    task_records,
)
from peftkit.recipe import recipe_from_dict

TASKS = {
    "seq_cls": {"type": "seq_cls"},
    "token_cls": {"type": "token_cls"},
    "qa": {"type": "qa"},
    "seq2seq": {"type": "seq2seq"},
}


def source(task: str, columns: dict[str, str] | None = None) -> PredictSource:
    recipe = recipe_from_dict(
        {
            "model": {"name_or_path": "unused"},
            "task": TASKS[task],
            "data": {"train_file": "train.jsonl", "columns": columns or {}},
        },
        check_files=False,
    )
    return PredictSource(folder=Path("run"), kind="run", recipe=recipe)


def test_blank_lines_keep_their_place() -> None:
    assert parse_records("a\n\nb\n", "in.txt", "txt") == [(1, {"text": "a"}), (2, None), (3, {"text": "b"})]
    assert parse_records('{"x": 1}\n \n', "in.jsonl", "jsonl") == [(1, {"x": 1}), (2, None)]
    assert parse_records('text\n"two\nlines"\n\nb\n', "in.csv", "csv") == [
        (2, {"text": "two\nlines"}),
        (5, {"text": "b"}),
    ]


@pytest.mark.parametrize(
    ("task", "field"), [("seq_cls", "text"), ("token_cls", "text"), ("seq2seq", "source")]
)
def test_a_text_line_fills_the_tasks_text_field(task: str, field: str) -> None:
    given = PredictInput("in.txt", "txt", parse_records("hello\n\n", "in.txt", "txt"))
    assert task_records(source(task), given) == [{field: "hello"}, None]


def test_a_text_input_for_qa_is_refused() -> None:
    given = PredictInput("in.txt", "txt", parse_records("hello\n", "in.txt", "txt"))
    with pytest.raises(DataError, match=r"in.txt: a text input gives one text a line, but qa needs question"):
        task_records(source("qa"), given)


def test_fields_map_by_the_recipe_or_by_columns_and_are_checked_with_lines() -> None:
    given = PredictInput(
        "in.jsonl", "jsonl", parse_records('{"en": "a"}\n{"de": "b"}\n', "in.jsonl", "jsonl")
    )
    mapped = source("seq2seq", {"source": "en", "target": "es"})
    records = task_records(mapped, given)
    assert records == [{"source": "a"}, {"de": "b"}]
    missing = r"in.jsonl: 1 record \(line 2\) without a 'messages' or 'source' field"
    with pytest.raises(DataError, match=missing):
        check_input(mapped, given, records)
    override = parse_columns(["source=de"])
    assert task_records(mapped, given, override) == [{"en": "a"}, {"source": "b"}]


def test_token_cls_takes_tokens_or_text_and_keep_columns_are_checked() -> None:
    given = PredictInput(
        "in.jsonl", "jsonl", parse_records('{"tokens": ["a"]}\n{"text": "b c"}\n', "x", "jsonl")
    )
    check_input(source("token_cls"), given, task_records(source("token_cls"), given))
    with pytest.raises(DataError, match=r"--keep-columns lang: 2 records \(lines 1, 2\)"):
        check_input(source("token_cls"), given, task_records(source("token_cls"), given), ["lang"])
    assert parse_keep(["id,lang", "lang"]) == ["lang"]
    with pytest.raises(DataError, match="--keep-columns prediction: the result has a field of that name"):
        parse_keep(["prediction"])
