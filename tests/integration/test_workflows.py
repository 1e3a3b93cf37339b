"""Experiment workflows end to end on a tiny BERT and a small sample of SMS spam: sweep (and resuming a
killed sweep), cross-validation, errors analysis, and early stopping keeping the best checkpoint."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftkit.recipe import load_recipe
from tests.conftest import REPO, invoke_cli

SMS = REPO / "data" / "sms_spam"
RECIPE = """
[model]
name_or_path = "{model}"

[task]
type = "seq_cls"
max_length = 48

[data]
dataset = "{data}"
max_train_samples = 300
max_eval_samples = 100
max_test_samples = 100

[adapter]
r = 8
alpha = 16
target_modules = ["query", "value"]

[train]
learning_rate = 5e-3
num_train_epochs = 3
per_device_train_batch_size = 16
logging_steps = 5
report_to = []
output_dir = "{out}"

[sweep]
# validation loss: the tiny random BERT predicts only "ham" at most settings, so F1 barely moves
metric = "loss"
sampler = "tpe"
pruner = "none"

[sweep.space]
"train.learning_rate" = {{log_uniform = [1e-3, 5e-2]}}
"adapter.r" = {{choice = [4, 8, 16]}}
"""


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    work = tmp_path_factory.mktemp("workflows")
    path = work / "sms.toml"
    path.write_text(RECIPE.format(model=tiny_bert_dir, data=SMS, out=work / "runs" / "sms"))
    return path


@pytest.fixture(scope="module")
def default_run(recipe_path: Path) -> dict:
    from peftkit.training import finetune

    # the recipe as written ([sweep] ignored), keeping its best checkpoint by validation loss as the
    # sweep's trials do (sweep.metric = "loss"), so that the two are compared alike
    overrides = ["train.metric_for_best_model=loss", "train.greater_is_better=false"]
    return finetune(load_recipe(recipe_path, overrides)).metrics


def test_sweep_beats_or_matches_the_default_recipe(recipe_path: Path, default_run: dict) -> None:
    from peftkit.sweep import run_sweep

    result = run_sweep(recipe_path, 6)
    assert result.ran == 6 and len(result.trials) == 6
    assert all(row["state"] == "complete" for row in result.trials)
    best = result.best
    assert best is not None
    default = default_run["validation"]["loss"]
    print(
        f"default recipe validation loss {default:.4f}; sweep best {best['loss']:.4f} "
        f"(trial {best['trial']}: lr {best['train.learning_rate']:.3g}, r {best['adapter.r']})"
    )
    assert result.direction == "minimize"
    assert best["loss"] <= default  # lower validation loss than the recipe as written
    # each trial is a normal run directory with the trial's values in its resolved recipe
    meta = json.loads((Path(best["run_dir"]) / "peftkit_run.json").read_text())
    assert meta["status"] == "completed"
    assert meta["recipe"]["adapter"]["r"] == best["adapter.r"]
    assert meta["recipe"]["train"]["learning_rate"] == pytest.approx(best["train.learning_rate"])
    metrics = json.loads((Path(best["run_dir"]) / "metrics.json").read_text())
    assert metrics["validation"]["loss"] == best["loss"]
    for name in ("sweep_summary.csv", "sweep_summary.md", "sweep_loss.png", "best_recipe.toml"):
        assert (result.sweep_dir / name).is_file(), name
    assert len((result.sweep_dir / "sweep_summary.csv").read_text().splitlines()) == 7
    # the best recipe is a recipe finetune accepts, with the best values
    best_recipe = load_recipe(result.sweep_dir / "best_recipe.toml")
    assert best_recipe.adapter["r"] == best["adapter.r"]
    assert best_recipe.train["learning_rate"] == pytest.approx(best["train.learning_rate"])
    assert best_recipe.sweep is None and str(best_recipe.output_dir).endswith("sms-best")


def test_killed_sweep_resumes_with_the_remaining_trials_only(recipe_path: Path) -> None:
    from peftkit.sweep import run_sweep

    out = recipe_path.parent / "killed-sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "peftkit", "sweep", str(recipe_path), "--trials", "5", "--out", str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    second = out / "trial-0001" / "metrics.json"
    deadline = time.time() + 300
    while not second.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert second.exists(), "the sweep did not finish 2 trials"
    done_before = {
        d.name: d.joinpath("metrics.json").stat().st_mtime_ns
        for d in out.glob("trial-*")
        if d.joinpath("metrics.json").exists()
    }
    assert len(done_before) < 5, "the sweep finished before it was killed"
    result = run_sweep(recipe_path, 5, out_dir=out)
    assert len(result.trials) == 5 and all(row["state"] == "complete" for row in result.trials)
    assert result.ran == 5 - len(done_before)
    for name, mtime in done_before.items():  # finished trials were not trained again
        assert (out / name / "metrics.json").stat().st_mtime_ns == mtime
    finished_dirs = {Path(row["run_dir"]).name for row in result.trials}
    assert set(done_before) <= finished_dirs
    # a finished sweep asked for the same count runs nothing
    assert run_sweep(recipe_path, 5, out_dir=out).ran == 0


def test_cv_summary_is_the_mean_of_the_fold_metrics(recipe_path: Path) -> None:
    from peftkit.cv import CV_SUMMARY, flatten_numbers, run_cv

    recipe = load_recipe(recipe_path, ["train.num_train_epochs=1"])
    result = run_cv(recipe, 3)
    summary = json.loads((result.cv_dir / CV_SUMMARY).read_text())
    assert summary["stratified"] and len(summary["fold_dirs"]) == 3
    folds = [
        flatten_numbers(json.loads((Path(d) / "metrics.json").read_text())) for d in summary["fold_dirs"]
    ]
    for key in ("validation.f1_macro", "validation.loss", "test.accuracy", "wall_time_s", "trainable_params"):
        values = [fold[key] for fold in folds]
        assert summary["metrics"][key]["mean"] == pytest.approx(sum(values) / 3, abs=1e-12)
    assert set(summary["metrics"]) == set().union(*folds)
    # the folds' validation sets partition the 300 training examples, stratified on the label
    sizes, spam = [], []
    for d in summary["fold_dirs"]:
        rows = [
            json.loads(line) for line in (Path(d).parent / "data" / Path(d).name / "validation.jsonl").open()
        ]
        sizes.append(len(rows))
        spam.append(sum(r["label"] == "spam" for r in rows))
    assert sum(sizes) == 300 and max(spam) - min(spam) <= 1
    # compare reads the folds from the cv folder
    compared = invoke_cli("compare", str(result.cv_dir))
    assert compared.exit_code == 0, compared.output
    assert f"{folds[0]['test.f1_macro']:.4f}" in compared.output
    # a second cv call keeps the finished folds
    mtimes = [(Path(d) / "metrics.json").stat().st_mtime_ns for d in summary["fold_dirs"]]
    run_cv(recipe, 3)
    assert [(Path(d) / "metrics.json").stat().st_mtime_ns for d in summary["fold_dirs"]] == mtimes


def test_errors_are_the_truly_worst_test_examples(recipe_path: Path, default_run: dict) -> None:
    import torch

    from peftkit.runs import load_run

    run_dir = load_recipe(recipe_path).output_dir
    out = run_dir.parent / "worst.jsonl"
    result = invoke_cli("evaluate", str(run_dir), "--errors", "7", "--errors-output", str(out))
    assert result.exit_code == 0, result.output
    written = [json.loads(line) for line in out.open()]
    assert len(written) == 7
    # independent ranking: tokenizer + model forward, softmax, probability of the true class
    loaded = load_run(run_dir)
    rows = list(csv.DictReader((SMS / "test.csv").open()))[:100]
    with torch.no_grad():
        enc = loaded.ctx.tokenizer(
            [r["text"] for r in rows], truncation=True, max_length=48, padding=True, return_tensors="pt"
        )
        probs = loaded.model(**enc).logits.softmax(-1)
    label_id = {name: i for i, name in enumerate(loaded.ctx.labels)}
    keyed = []
    for i, row in enumerate(rows):
        p_true = float(probs[i, label_id[row["label"]]])
        wrong = int(probs[i].argmax()) != label_id[row["label"]]
        keyed.append((not wrong, p_true, i))
    expected = [i for _, _, i in sorted(keyed)[:7]]
    assert [w["index"] for w in written] == expected
    for w in written:
        assert w["text"] == rows[w["index"]]["text"] and w["reference"] == rows[w["index"]]["label"]
        assert w["true_class_probability"] == pytest.approx(
            float(probs[w["index"], label_id[w["reference"]]]), abs=1e-4
        )


def test_early_stopping_keeps_and_saves_the_best_checkpoint(recipe_path: Path) -> None:
    """metric_for_best_model = loss with greater_is_better = true makes the *first* epoch the best one
    (the loss falls while training), so the best checkpoint is not the last; patience 1 stops early."""
    from safetensors.torch import load_file

    from peftkit.training import finetune

    out = recipe_path.parent / "runs" / "early"
    recipe = load_recipe(
        recipe_path,
        [
            f"train.output_dir={json.dumps(str(out))}",
            "train.num_train_epochs=6",
            "train.learning_rate=2e-2",
            "train.early_stopping_patience=1",
            "train.metric_for_best_model=loss",
            "train.greater_is_better=true",
        ],
    )
    metrics = finetune(recipe).metrics
    history = json.loads((out / "log_history.json").read_text())
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    best_step = max(evals, key=lambda e: e[1])[0]
    last_step = evals[-1][0]
    assert best_step < last_step, evals
    steps_per_epoch = evals[0][0]
    assert last_step < 6 * steps_per_epoch  # stopped early
    assert metrics["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    assert metrics["validation"]["loss"] == pytest.approx(dict(evals)[best_step], rel=1e-5)
    saved = load_file(out / "adapter_model.safetensors")
    best = load_file(out / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    last = load_file(out / f"checkpoint-{last_step}" / "adapter_model.safetensors")
    assert all(bool((saved[k] == best[k]).all()) for k in saved)
    assert any(not bool((saved[k] == last[k]).all()) for k in saved)


def test_early_stopping_without_best_model_loading_is_refused(recipe_path: Path) -> None:
    from peftkit.recipe import RecipeError

    with pytest.raises(RecipeError, match="needs load_best_model_at_end = true"):
        load_recipe(recipe_path, ["train.early_stopping_patience=2", "train.load_best_model_at_end=false"])
