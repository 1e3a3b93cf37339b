"""Hostile ``peftkit predict`` inputs: an output that is the input (by the same path, a link or another
spelling) or a file of the model's folder is refused before anything is written; a ragged CSV row is one
message naming the file and line. Each case checks its folder's files before and after."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.hostile.common import assert_clear_error, assert_nothing_lost, snapshot
from tests.integration.test_predict_io import predict, train_tiny_run

TEXTS = "win free prize cash now\nsee you at home\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("hostile-predict"), tiny_bert_dir)


@pytest.mark.hostile("clear_error")
@pytest.mark.parametrize("spelling", ["same path", "symlink", "relative path", "dot-dot path"])
def test_output_over_the_input_is_refused(
    spelling: str,
    trained: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = tmp_path / "data" / "in.txt"
    source.parent.mkdir()
    source.write_text(TEXTS)
    output: Path | str = source
    if spelling == "symlink":
        output = tmp_path / "link.txt"
        os.symlink(source, output)
    elif spelling == "relative path":
        monkeypatch.chdir(tmp_path / "data")
        output = "in.txt"
    elif spelling == "dot-dot path":
        output = tmp_path / "data" / ".." / "data" / "in.txt"
    before = snapshot(tmp_path / "data")
    result = predict(trained / "run", source, output)
    assert_clear_error(result, "that is the input file", "predict never writes over its input")
    assert_nothing_lost(before, snapshot(tmp_path / "data"), tmp_path / "data")


@pytest.mark.hostile("clear_error")
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "peftkit_run.json", "labels.json"])
@pytest.mark.parametrize("through", ["run", "checkpoint"])
def test_output_over_a_file_of_the_run_is_refused(
    through: str, name: str, trained: Path, tmp_path: Path
) -> None:
    run = trained / "run"
    source = run if through == "run" else sorted(run.glob("checkpoint-*"))[0]
    (tmp_path / "in.txt").write_text(TEXTS)
    before = snapshot(run)
    result = predict(source, tmp_path / "in.txt", run / name)
    assert_clear_error(result, f"--output {run / name}: that is a file of {run}")
    assert_nothing_lost(before, snapshot(run), run)


@pytest.mark.hostile("clear_error")
@pytest.mark.parametrize(
    ("rows", "line", "fields"),
    [
        ("text,label\nwin cash,spam\nhello,ham,extra\n", 3, 3),
        ("text,label\nwin cash\n", 2, 1),
        ('text,label\n"a quoted\nline",ham\nhi,ham,x\n', 4, 3),
    ],
    ids=["too many fields", "too few fields", "after a quoted newline"],
)
def test_a_ragged_csv_row_names_file_and_line(
    rows: str,
    line: int,
    fields: int,
    trained: Path,
    tmp_path: Path,
) -> None:
    (tmp_path / "in.csv").write_text(rows)
    result = predict(trained / "run", tmp_path / "in.csv", tmp_path / "out.jsonl")
    assert_clear_error(result, f"{tmp_path / 'in.csv'}:{line}: {fields} fields, but the header has 2")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.hostile("success")
def test_output_beside_the_input_and_inside_the_run_as_a_new_file(trained: Path, tmp_path: Path) -> None:
    """The documented successes next to the refusals: a new file, even in the run's folder, is written."""
    (tmp_path / "in.txt").write_text(TEXTS)
    before = snapshot(trained / "run")
    new_file = trained / "run" / "my_predictions.jsonl"
    try:
        result = predict(trained / "run", tmp_path / "in.txt", new_file)
        assert result.exit_code == 0, result.output
        assert len(new_file.read_text().splitlines()) == 2
        assert_nothing_lost(before, snapshot(trained / "run"), trained / "run")
    finally:
        new_file.unlink(missing_ok=True)
