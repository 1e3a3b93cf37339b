"""[data] keys, each shown by what it changes in a run directory trained with ``peftkit.finetune``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.key_effects_common import (
    finetune_raw,
    quick_train,
    read_json,
    read_jsonl,
    train_metrics,
    write_csv,
)


def seq_cls_raw(model: Path, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {"name_or_path": str(model)},
        "task": {"type": "seq_cls", "max_length": 32},
        "data": data,
        "adapter": {"r": 4},
        "train": quick_train(),
    }


def test_split_sampling_format_and_seed_keys(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """format (a CSV with a non-CSV extension), validation_split, max_*_samples and seed show in the row
    counts and content fingerprints that peftkit_run.json records per split."""
    # 40 training rows in a file whose extension says nothing: only format = "csv" makes it readable
    write_csv(tmp_path / "train.data", 40, text="sms", label="y")
    write_csv(tmp_path / "test.csv", 12, offset=2, text="sms", label="y")
    data = {
        "train_file": "train.data",
        "test_file": "test.csv",
        "format": "csv",
        "columns": {"text": "sms", "label": "y"},
        "validation_split": 0.25,  # 10 of 40 held out
        "max_train_samples": 20,  # of the 30 left
        "max_test_samples": 4,
        "seed": 7,
    }
    first = finetune_raw(seq_cls_raw(tiny_bert_dir, data), tmp_path, "first")
    rows = {split: info["rows"] for split, info in read_json(first / "peftkit_run.json")["data"].items()}
    assert rows == {"train": 20, "validation": 10, "test": 4}
    assert len(read_jsonl(first / "predictions_validation.jsonl")) == 10
    assert len(read_jsonl(first / "predictions_test.jsonl")) == 4

    # the same recipe with another seed and an evaluation cap: the held-out rows (and the sampled training
    # rows) change with the seed; max_eval_samples caps validation
    second = finetune_raw(
        seq_cls_raw(tiny_bert_dir, {**data, "seed": 8, "max_eval_samples": 3}), tmp_path, "second"
    )
    meta_first = read_json(first / "peftkit_run.json")["data"]
    meta_second = read_json(second / "peftkit_run.json")["data"]
    assert {split: info["rows"] for split, info in meta_second.items()} == {
        "train": 20,
        "validation": 3,
        "test": 4,
    }
    assert meta_second["train"]["fingerprint"] != meta_first["train"]["fingerprint"]
    assert meta_second["test"]["fingerprint"] == meta_first["test"]["fingerprint"]  # the seed only splits

    # format: without it the extension decides, and .data is not a known one
    from peftkit.errors import PeftkitError

    with pytest.raises(PeftkitError, match=r"train\.data"):
        finetune_raw(seq_cls_raw(tiny_bert_dir, {**data, "format": "auto"}), tmp_path, "auto")


def write_three_column_conll(path: Path, sentences: int) -> Path:
    """word, a chunk tag and an NER tag per line; each word is one token, each tag three ("b", "-", "np")."""
    blocks = []
    for i in range(sentences):
        words = ["the", "berlin", "sat", "merkel"][: 2 + i % 3]
        chunk = ["B-NP", "I-NP", "B-VP", "B-NP"]
        ner = ["O", "B-LOC", "O", "B-PER"]
        blocks.append("\n".join(f"{w} {chunk[j]} {ner[j]}" for j, w in enumerate(words)))
    path.write_text("-DOCSTART- X O\n\n" + "\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


def token_cls_raw(model: Path, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {"name_or_path": str(model)},
        "task": {"type": "token_cls", "max_length": 32},
        "data": data,
        "adapter": {"r": 4, "target_modules": ["query", "value"]},
        "train": quick_train(max_steps=1),
    }


def test_conll_columns_pick_the_words_and_the_tags(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """conll_tag_column picks the tag set (labels.json); conll_word_column picks what is tokenized (the
    tokens trained on, in total_flos). A .txt file is read as CoNLL only with format = "conll"."""
    for split, n in (("train", 12), ("validation", 4)):
        write_three_column_conll(tmp_path / f"{split}.txt", n)
    files = {"train_file": "train.txt", "validation_file": "validation.txt", "format": "conll"}
    ner = finetune_raw(token_cls_raw(tiny_bert_dir, files), tmp_path, "ner")  # tag column -1: NER
    chunks = finetune_raw(token_cls_raw(tiny_bert_dir, {**files, "conll_tag_column": 1}), tmp_path, "chunks")
    assert read_json(ner / "labels.json")["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert read_json(chunks / "labels.json")["labels"] == ["O", "B-NP", "I-NP", "B-VP", "I-VP"]
    # validation_file: its 4 sentences are the validation split (not a share held out of train)
    references = [p["reference"] for p in read_jsonl(chunks / "predictions_validation.jsonl")]
    assert len(references) == 4 and references[0] == ["B-NP", "I-NP"]

    # words from the chunk column (tags of three tokens) instead of one-token words: more tokens trained on
    tags_as_words = finetune_raw(
        token_cls_raw(tiny_bert_dir, {**files, "conll_word_column": 1}), tmp_path, "tags-as-words"
    )
    assert train_metrics(tags_as_words)["total_flos"] > train_metrics(ner)["total_flos"]


def test_num_proc_tokenizes_in_that_many_processes(
    tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """num_proc reaches ``Dataset.map`` for every split's tokenization."""
    from datasets import Dataset

    seen: list[Any] = []
    original = Dataset.map

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        if str(kwargs.get("desc", "")).startswith("Tokenizing"):
            seen.append(kwargs.get("num_proc"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Dataset, "map", spy)
    write_csv(tmp_path / "train.csv", 24)
    write_csv(tmp_path / "validation.csv", 8, offset=1)
    files = {"train_file": "train.csv", "validation_file": "validation.csv"}
    finetune_raw(seq_cls_raw(tiny_bert_dir, {**files, "num_proc": 2}), tmp_path, "two")
    assert seen == [2, 2]  # train and validation; without the key, None (one process)


def test_config_names_the_hub_dataset_configuration(
    tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.config is the configuration ``load_dataset`` gets for a Hub dataset (offline here: the Hub call
    is answered in-process with a small DatasetDict)."""
    import datasets

    requested: list[tuple[Any, ...]] = []

    def load_dataset(path: str, name: str | None = None, *args: Any, **kwargs: Any) -> Any:
        requested.append((path, name))
        lines = write_csv(tmp_path / "t.csv", 24).read_text().splitlines()[1:]
        rows = [line.rsplit(",", 1) for line in lines]
        return datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_dict(
                    {"text": [r[0] for r in rows], "label": [r[1] for r in rows]}
                )
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    run = finetune_raw(seq_cls_raw(tiny_bert_dir, {"dataset": "someone/sms", "config": "en"}), tmp_path)
    assert requested == [("someone/sms", "en")]
    assert read_json(run / "peftkit_run.json")["data"]["train"]["rows"] == 21  # 24 less the 10% held out


def test_splits_pick_rename_and_skip_and_revision_reaches_load_dataset(
    tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.splits picks the Hub dataset's split for validation (by its own name) and skips its test split;
    data.revision is what ``load_dataset`` gets, and the run record keeps it (offline: the Hub call is
    answered in-process with a small DatasetDict in the layout of GLUE MNLI)."""
    import datasets

    requested: list[dict[str, Any]] = []
    lines = write_csv(tmp_path / "t.csv", 40).read_text().splitlines()[1:]
    rows = [line.rsplit(",", 1) for line in lines]

    def split(start: int, stop: int) -> Any:
        part = rows[start:stop]
        return datasets.Dataset.from_dict({"text": [r[0] for r in part], "label": [r[1] for r in part]})

    def load_dataset(path: str, name: str | None = None, *args: Any, **kwargs: Any) -> Any:
        requested.append({"path": path, "name": name, **kwargs})
        return datasets.DatasetDict(
            {
                "train": split(0, 24),
                "validation_matched": split(24, 29),
                "validation_mismatched": split(29, 36),
                "test": split(36, 40),
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = {
        "dataset": "someone/mnli",
        "revision": "0123abcd",
        "splits": {"validation": "validation_mismatched", "test": False},
    }
    run = finetune_raw(seq_cls_raw(tiny_bert_dir, data), tmp_path)
    assert requested == [{"path": "someone/mnli", "name": None, "revision": "0123abcd"}]
    meta = read_json(run / "peftkit_run.json")
    assert meta["recipe"]["data"]["revision"] == "0123abcd"
    assert {name: info["rows"] for name, info in meta["data"].items()} == {"train": 24, "validation": 7}
    assert len(read_jsonl(run / "predictions_validation.jsonl")) == 7
    assert not (run / "predictions_test.jsonl").exists()
    # without [data] splits: the split named "test" is used, and no split is called "validation", so a share
    # of train is held out
    default = finetune_raw(seq_cls_raw(tiny_bert_dir, {"dataset": "someone/mnli"}), tmp_path, "default")
    rows_default = {
        name: info["rows"] for name, info in read_json(default / "peftkit_run.json")["data"].items()
    }
    assert rows_default == {"train": 21, "validation": 3, "test": 4}
    assert requested[-1] == {"path": "someone/mnli", "name": None}
