"""Cross-validation folds and the mean ± std summary."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from peftkit.cv import flatten_numbers, fold_indices, summarize


def test_stratified_folds_partition_the_data_and_keep_label_shares() -> None:
    labels = ["spam"] * 12 + ["ham"] * 48
    folds = fold_indices(labels, len(labels), 4, seed=1)
    assert sorted(i for fold in folds for i in fold) == list(range(60))  # each example held out once
    for fold in folds:
        assert len(fold) == 15
        assert sum(labels[i] == "spam" for i in fold) == 3  # 12 spam / 4 folds


def test_plain_folds_without_labels() -> None:
    folds = fold_indices(None, 10, 3, seed=0)
    assert sorted(len(f) for f in folds) == [3, 3, 4]
    assert sorted(i for fold in folds for i in fold) == list(range(10))


def test_summary_is_mean_and_sample_std_of_every_numeric_leaf() -> None:
    folds = [
        {"validation": {"f1": 0.5, "note": "x"}, "wall_time_s": 10, "flag": True, "best_checkpoint": None},
        {"validation": {"f1": 0.7}, "wall_time_s": 14},
        {"validation": {"f1": 0.9}, "wall_time_s": 12},
    ]
    assert flatten_numbers(folds[0]) == {"validation.f1": 0.5, "wall_time_s": 10.0}
    summary = summarize(folds)
    assert set(summary) == {"validation.f1", "wall_time_s"}
    assert summary["validation.f1"]["mean"] == pytest.approx(0.7)
    assert summary["validation.f1"]["std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.9]))
    assert summary["wall_time_s"] == pytest.approx({"mean": 12, "std": 2.0, "min": 10, "max": 14, "n": 3})


def test_a_fold_recipe_reads_its_own_files_not_the_hub_split_names(tmp_path: Path) -> None:
    """[data] splits and revision describe the source dataset (already read): the fold recipe of a Hub
    recipe that sets them is valid and reads only the fold's files."""
    from peftkit.cv import _fold_recipe
    from peftkit.recipe import recipe_from_dict

    recipe = recipe_from_dict(
        {
            "model": {"name_or_path": "someone/model"},
            "task": {"type": "seq_cls"},
            "data": {
                "dataset": "nyu-mll/glue",
                "config": "mnli",
                "revision": "0123abcd",
                "splits": {"validation": "validation_matched", "test": False},
            },
        },
        base_dir=tmp_path,
        check_files=False,
    )
    files = {}
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text('{"text": "a", "label": "x"}\n', encoding="utf-8")
        files[f"{split}_file"] = str(tmp_path / f"{split}.jsonl")
    fold = _fold_recipe(recipe, files, ("x", "y"), tmp_path / "run", 1)
    assert fold.data.splits == {} and fold.data.revision is None and fold.data.dataset is None
    assert fold.data.train_file == files["train_file"]
