"""data.py: file formats, column mapping, automatic validation split, limits, caching, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftkit.data import load_raw_datasets, read_records, tokenize_splits
from peftkit.errors import DataError
from peftkit.recipe import DataSection
from peftkit.tasks.seq_cls import TASK as SEQ_CLS

ROWS = [{"message": f"text number {i}", "category": "spam" if i % 3 == 0 else "ham"} for i in range(40)]


def write_csv(path: Path, rows: list[dict]) -> Path:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_folder_with_split_files_and_column_mapping(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", ROWS[:30])
    write_csv(tmp_path / "dev.csv", ROWS[30:35])
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[35:]))
    section = DataSection(dataset=str(tmp_path), columns={"text": "message", "label": "category"})
    raw = load_raw_datasets(section, SEQ_CLS)
    assert {k: len(v) for k, v in raw.items()} == {"train": 30, "validation": 5, "test": 5}
    assert set(raw["train"].column_names) == {"text", "label"}


def test_automatic_validation_split_is_seeded(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", [{"text": r["message"], "label": r["category"]} for r in ROWS])
    first = load_raw_datasets(DataSection(train_file=str(path), validation_split=0.25, seed=3), SEQ_CLS)
    again = load_raw_datasets(DataSection(train_file=str(path), validation_split=0.25, seed=3), SEQ_CLS)
    other = load_raw_datasets(DataSection(train_file=str(path), validation_split=0.25, seed=4), SEQ_CLS)
    assert len(first["validation"]) == 10 and len(first["train"]) == 30
    assert first["validation"]["text"] == again["validation"]["text"]
    assert first["validation"]["text"] != other["validation"]["text"]
    assert "test" not in first


def test_max_samples(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", [{"text": r["message"], "label": r["category"]} for r in ROWS])
    section = DataSection(
        train_file=str(path), validation_file=str(path), max_train_samples=7, max_eval_samples=4
    )
    raw = load_raw_datasets(section, SEQ_CLS)
    assert len(raw["train"]) == 7 and len(raw["validation"]) == 4
    assert raw["validation"]["text"] == [r["message"] for r in ROWS[:4]]  # eval keeps its order


def test_missing_column_names_file_and_fix(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", ROWS)
    with pytest.raises(DataError) as info:
        load_raw_datasets(DataSection(train_file=str(path)), SEQ_CLS)
    message = str(info.value)
    assert str(path) in message and "missing column(s) ['text', 'label']" in message
    assert "[data] columns = {text = '<column>', label = '<column>'}" in message


def test_wrong_mapping_is_named(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", ROWS)
    with pytest.raises(DataError, match=r"columns names \['msg'\] but the data has columns"):
        load_raw_datasets(
            DataSection(train_file=str(path), columns={"text": "msg", "label": "category"}), SEQ_CLS
        )


def test_broken_files_have_clear_messages(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b", "lab')
    with pytest.raises(DataError, match=rf"{bad}: cannot be read as json"):
        load_raw_datasets(DataSection(train_file=str(bad)), SEQ_CLS)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{latin}:2: not valid UTF-8"):
        load_raw_datasets(DataSection(train_file=str(latin)), SEQ_CLS)
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(DataError, match=rf"{empty}: has no examples"):
        load_raw_datasets(DataSection(train_file=str(empty)), SEQ_CLS)


def test_tokenization_is_cached(tmp_path: Path, tiny_bert_dir: Path) -> None:
    from transformers import AutoTokenizer

    from peftkit.tasks import TASKS
    from peftkit.tasks.base import TaskContext
    from peftkit.tasks.seq_cls import SeqClsConfig

    path = write_csv(tmp_path / "t.csv", [{"text": r["message"], "label": r["category"]} for r in ROWS])
    section = DataSection(train_file=str(path))
    task = TASKS["seq_cls"]
    ctx = TaskContext(SeqClsConfig(), AutoTokenizer.from_pretrained(tiny_bert_dir), ("ham", "spam"))
    first = tokenize_splits(load_raw_datasets(section, SEQ_CLS), task, ctx)
    second = tokenize_splits(load_raw_datasets(section, SEQ_CLS), task, ctx)
    assert first["train"]._fingerprint == second["train"]._fingerprint
    assert first["train"].cache_files and first["train"].cache_files == second["train"].cache_files
    assert first["train"]["length"] == [len(ids) for ids in first["train"]["input_ids"]]
    changed = TaskContext(SeqClsConfig(max_length=9), ctx.tokenizer, ctx.labels)
    third = tokenize_splits(load_raw_datasets(section, SEQ_CLS), task, changed)
    assert third["train"]._fingerprint != first["train"]._fingerprint
    # the task's code and the model config are part of the key: a changed preprocess must not reuse the cache
    from dataclasses import replace

    def edited(batch: dict, ctx: TaskContext, train: bool) -> dict:  # another module's source
        return task.preprocess(batch, ctx, train)

    fourth = tokenize_splits(load_raw_datasets(section, SEQ_CLS), replace(task, preprocess=edited), ctx)
    assert fourth["train"]._fingerprint != first["train"]._fingerprint
    from transformers import BertConfig

    configured = TaskContext(ctx.cfg, ctx.tokenizer, ctx.labels, model_config=BertConfig(hidden_size=64))
    fifth = tokenize_splits(load_raw_datasets(section, SEQ_CLS), task, configured)
    assert fifth["train"]._fingerprint != first["train"]._fingerprint


def test_read_records_formats_and_errors(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n')
    (tmp_path / "b.txt").write_text("one\ntwo\n")
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\nnot json\n')
    assert read_records(tmp_path / "a.jsonl") == [{"text": "x"}, {"text": "y"}]
    assert read_records(tmp_path / "b.txt") == [{"text": "one"}, {"text": "two"}]
    with pytest.raises(DataError, match=r"c.jsonl:2: invalid JSON"):
        read_records(tmp_path / "c.jsonl")
