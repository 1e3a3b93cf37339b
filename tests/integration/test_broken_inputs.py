"""Broken run directories, broken data and hostile inputs through ``peftkit predict`` and ``evaluate``.

Each damage gets one clear message naming the file and exit code 2, never a traceback. The commands run
in-process through click's runner (one trained run, many damaged copies of it); one case also runs as a
real process to show stderr carries no traceback there either.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from peftkit.cli import main
from tests.conftest import REPO
from tests.integration.test_cli_seq_cls import write_split

Damage = Callable[[Path], Any]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    """A finished run (in-process, one short epoch) with its data next to it."""
    from peftkit.recipe import recipe_from_dict
    from peftkit.training import finetune

    work = tmp_path_factory.mktemp("broken")
    write_split(work / "train.csv", 32, 0)
    write_split(work / "validation.csv", 8, 1)
    write_split(work / "test.csv", 8, 2)
    recipe = recipe_from_dict(
        {
            "model": {"name_or_path": str(tiny_bert_dir)},
            "task": {"type": "seq_cls", "max_length": 32},
            "data": {"train_file": "train.csv", "validation_file": "validation.csv", "test_file": "test.csv"},
            "adapter": {"r": 4},
            "train": {"num_train_epochs": 1, "report_to": "none", "output_dir": str(work / "run")},
        },
        base_dir=work,
        name="broken",
    )
    finetune(recipe)
    return work


def damaged_copy(trained: Path, tmp_path: Path, damage: Damage) -> Path:
    """A copy of the run and its data (the copy's recipe points at the copied data), then damaged."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "run", run_dir)
    for name in ("train.csv", "validation.csv", "test.csv"):
        shutil.copy(trained / name, tmp_path / name)
    meta = json.loads((run_dir / "peftkit_run.json").read_text())
    for key in ("train_file", "validation_file", "test_file"):
        meta["recipe"]["data"][key] = str(tmp_path / Path(meta["recipe"]["data"][key]).name)
    (run_dir / "peftkit_run.json").write_text(json.dumps(meta))
    damage(run_dir)
    return run_dir


def invoke(*args: str) -> tuple[int, str]:
    """Run a peftkit command in-process: (exit code, stderr); any exception but SystemExit fails."""
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stderr


def predict(run_dir: Path, tmp_path: Path, records: str = '{"text": "win cash now"}\n') -> tuple[int, str]:
    (tmp_path / "in.jsonl").write_text(records)
    return invoke(
        "predict", str(run_dir), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o")
    )


def rewrite(name: str, content: str | bytes) -> Damage:
    def damage(run_dir: Path) -> None:
        path = run_dir / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return damage


def remove(*names: str) -> Damage:
    def damage(run_dir: Path) -> None:
        for name in names:
            (run_dir / name).unlink()

    return damage


def cut(name: str, keep: int) -> Damage:
    def damage(run_dir: Path) -> None:
        path = run_dir / name
        path.write_bytes(path.read_bytes()[:keep])

    return damage


def interrupted(run_dir: Path) -> None:
    meta = json.loads((run_dir / "peftkit_run.json").read_text())
    meta.update(status="interrupted", error="stopped by SIGTERM at step 3 of 4", recipe_source="r.toml")
    (run_dir / "peftkit_run.json").write_text(json.dumps(meta))


RUN_DIR_CASES: dict[str, tuple[Damage, str]] = {
    "adapter weights missing": (
        remove("adapter_model.safetensors"),
        "{run}/adapter_model.safetensors: missing; the run directory is incomplete, re-run finetune",
    ),
    "adapter weights truncated": (
        cut("adapter_model.safetensors", 3000),
        "{run}/adapter_model.safetensors: truncated (3000 of {size} bytes); re-run finetune",
    ),
    "adapter weights as a pickle": (
        lambda r: (r / "adapter_model.safetensors").rename(r / "adapter_model.bin"),
        "{run}/adapter_model.bin: refused: adapter weights in pickle format can run arbitrary code when "
        "loaded, and peftkit loads only adapter_model.safetensors. Re-run finetune, or convert a file you "
        "trust with safetensors.torch.save_file",
    ),
    "adapter config missing": (
        remove("adapter_config.json"),
        "{run}/adapter_config.json: missing; the run directory is incomplete, re-run finetune",
    ),
    "adapter config truncated": (
        rewrite("adapter_config.json", '{\n  "peft_type": "LORA",\n  "r": '),
        "{run}/adapter_config.json:3: corrupted JSON (Expecting value); re-run the step that wrote it",
    ),
    "adapter config of an unknown method": (
        rewrite("adapter_config.json", '{"peft_type": "MAGIC"}'),
        "{run}/adapter_config.json: corrupted (unknown peft_type 'MAGIC'); re-run finetune",
    ),
    "run metadata missing": (
        remove("peftkit_run.json"),
        "{run}/peftkit_run.json: not found; is {run} a complete peftkit run directory?",
    ),
    "run metadata truncated": (
        rewrite("peftkit_run.json", '{"status": "completed", "recipe": {"model": '),
        "{run}/peftkit_run.json:1: corrupted JSON (Expecting value); re-run the step that wrote it",
    ),
    "run metadata not an object": (
        rewrite("peftkit_run.json", '"completed"'),
        "{run}/peftkit_run.json: corrupted (expected a JSON object, found str); re-run the step that "
        "wrote it",
    ),
    "run metadata in another encoding": (
        rewrite("peftkit_run.json", '{"status": "completed"}'.encode("utf-16")),
        "{run}/peftkit_run.json: corrupted (not UTF-8 text); re-run the step that wrote it",
    ),
    "run metadata without its recipe": (
        rewrite("peftkit_run.json", '{"status": "completed"}'),
        "{run}/peftkit_run.json: corrupted (no 'recipe' entry); re-run the step that wrote it",
    ),
    "run interrupted": (
        interrupted,  # one epoch of 32 examples in batches of 16: its checkpoint is checkpoint-2
        "{run}: the run is 'interrupted' (stopped by SIGTERM at step 3 of 4), not completed; its last good "
        "checkpoint is {run}/checkpoint-2 (usable in place of the final adapter, e.g. `peftkit merge {run} "
        "--checkpoint checkpoint-2 --out <folder>`). Finish it with `peftkit finetune r.toml --resume`",
    ),
    "labels missing": (
        remove("labels.json"),
        "{run}: integrity check failed (missing: {run}/labels.json;",
    ),
    "labels truncated": (
        rewrite("labels.json", '{"labels": ["ham", '),
        "{run}: integrity check failed (changed since peftkit wrote it: {run}/labels.json;",
    ),
    "labels without the list": (
        rewrite("labels.json", '{"task": "seq_cls"}'),
        "{run}: integrity check failed (changed since peftkit wrote it: {run}/labels.json;",
    ),
    "labels not matching the model config": (
        rewrite("labels.json", '{"labels": ["ham", "spam", "eggs"], "task": "seq_cls"}'),
        "{run}: integrity check failed (changed since peftkit wrote it: {run}/labels.json;",
    ),
    "tokenizer missing": (
        remove("tokenizer.json", "tokenizer_config.json"),
        "{run}: integrity check failed (missing: {run}/tokenizer",
    ),
    "tokenizer truncated": (
        cut("tokenizer.json", 100),
        "{run}: integrity check failed (changed since peftkit wrote it: {run}/tokenizer.json;",
    ),
}


@pytest.mark.parametrize("case", list(RUN_DIR_CASES))
def test_broken_run_directory(case: str, trained: Path, tmp_path: Path) -> None:
    damage, expected = RUN_DIR_CASES[case]
    size = (trained / "run" / "adapter_model.safetensors").stat().st_size
    run_dir = damaged_copy(trained, tmp_path, damage)
    message = "error: " + expected.format(run=run_dir, size=size)
    for code, stderr in (predict(run_dir, tmp_path), invoke("evaluate", str(run_dir))):
        assert code == 2, stderr
        assert message in stderr, stderr
    assert not (tmp_path / "o").exists(), "nothing is written from a broken run"


def edit_data(name: str, content: str | bytes) -> Damage:
    """Replace a data file of the run's recipe (it lives next to the damaged run's copy)."""

    def damage(run_dir: Path) -> None:
        path = run_dir.parent / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return damage


def cut_data(name: str, drop: int) -> Damage:
    def damage(run_dir: Path) -> None:
        path = run_dir.parent / name
        path.write_bytes(path.read_bytes()[:-drop])

    return damage


DATA_CASES: dict[str, tuple[Damage, str]] = {
    "test file cut mid-row": (
        cut_data("test.csv", 6),  # the last row keeps its text but loses its label
        "1 record(s) cannot be used:\n  {data}/test.csv:9: no 'label' field (a missing or null value); every "
        "record needs one",
    ),
    "a test label the run never saw": (
        edit_data("test.csv", "text,label\nwin cash,spam\nhello,eggs\n"),
        "{data}/test.csv: test split, record 1: label 'eggs' does not occur in the train split; known "
        "labels: ['ham', 'spam']. Fix the data or list every label in [task] label_list",
    ),
    "an unclosed quote": (
        edit_data("test.csv", 'text,label\n"win cash,spam\nhello,ham\n'),
        "{data}/test.csv: cannot be read as csv (ParserError: ",
    ),
    "test file in UTF-16": (
        edit_data("test.csv", "text,label\nhello,ham\n".encode("utf-16")),
        "{data}/test.csv:1: not valid UTF-8 (byte 0); re-save the file as UTF-8",
    ),
    "an empty test split": (
        edit_data("test.csv", "text,label\n"),
        "{data}/test.csv: has no examples; fill it or remove it from the recipe",
    ),
    "the label column gone": (  # a test split without labels is predicted at finetune, never scored
        edit_data("test.csv", "text\nhello\n"),
        "{data}/test.csv: the test split has no labels (label): there is nothing to score it against",
    ),
    "the training data changed its labels": (
        edit_data("train.csv", "text,label\na,ham\nb,spam\nc,eggs\n"),
        "{data}/train.csv: the data's labels ['eggs', 'ham', 'spam'] differ from the run's ['ham', 'spam'] "
        "({data}/run/labels.json): the data changed since training; evaluate on the data the run was "
        "trained on",
    ),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_broken_data_through_evaluate(case: str, trained: Path, tmp_path: Path) -> None:
    damage, expected = DATA_CASES[case]
    run_dir = damaged_copy(trained, tmp_path, damage)
    code, stderr = invoke("evaluate", str(run_dir), "--split", "test")
    assert code == 2, stderr
    assert "error: " + expected.format(data=tmp_path) in stderr, stderr


PREDICT_INPUT_CASES: dict[str, tuple[str, bytes, str]] = {
    "input in UTF-16": ("in.jsonl", '{"text": "hi"}\n'.encode("utf-16"), "{p}:1: not valid UTF-8 (byte 0)"),
    "input truncated": (
        "in.jsonl",
        b'{"text": "a"}\n{"text": "b',
        "{p}:2: invalid JSON (Unterminated string starting at); one JSON object per line",
    ),
    "input JSON not a list": ("in.json", b'{"text": "a"}', "{p}: expected a JSON list of objects"),
    "input missing": ("absent.jsonl", b"", "{p}: file not found"),
}


@pytest.mark.parametrize("case", list(PREDICT_INPUT_CASES))
def test_broken_predict_input(case: str, trained: Path, tmp_path: Path) -> None:
    name, content, expected = PREDICT_INPUT_CASES[case]
    path = tmp_path / name
    if name != "absent.jsonl":
        path.write_bytes(content)
    code, stderr = invoke(
        "predict", str(trained / "run"), "--input", str(path), "--output", str(tmp_path / "o")
    )
    assert code == 2 and "error: " + expected.format(p=path) in stderr, stderr


def test_a_real_process_prints_no_traceback(trained: Path, tmp_path: Path) -> None:
    run_dir = damaged_copy(trained, tmp_path, cut("adapter_model.safetensors", 3000))
    (tmp_path / "in.jsonl").write_text('{"text": "x"}\n')
    result = subprocess.run(
        [sys.executable, "-m", "peftkit", "predict", str(run_dir), "--input", "in.jsonl", "--output", "o"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": ""},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {run_dir}/adapter_model.safetensors: ")
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------
# Security


def test_trust_remote_code_is_off_unless_set_and_reaches_from_pretrained(
    tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    from peftkit.modeling import load_model, load_model_config, load_tokenizer
    from peftkit.recipe import ModelSection
    from peftkit.tasks import TASKS
    from peftkit.tasks.base import TaskContext

    seen: list[tuple[str, Any]] = []

    def spy(cls: Any, name: str) -> None:
        real = cls.from_pretrained.__func__

        def recording(klass: Any, *args: Any, **kwargs: Any) -> Any:
            seen.append((name, kwargs.get("trust_remote_code", "absent")))
            return real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))

    spy(transformers.AutoConfig, "config")
    spy(transformers.AutoTokenizer, "tokenizer")
    spy(transformers.AutoModelForSequenceClassification, "model")
    task = TASKS["seq_cls"]
    for section, expected in (
        (ModelSection(name_or_path=str(tiny_bert_dir)), False),
        (ModelSection(name_or_path=str(tiny_bert_dir), trust_remote_code=True), True),
    ):
        seen.clear()
        config = load_model_config(section)
        tokenizer = load_tokenizer(section)
        ctx = TaskContext(
            cfg=task.config_class(), tokenizer=tokenizer, labels=("a", "b"), model_config=config
        )
        load_model(section, task, ctx)
        assert seen and {name for name, _ in seen} == {"config", "tokenizer", "model"}
        assert all(value is expected for _, value in seen), seen


def test_recipes_are_data_never_code(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """Strings that look like code stay strings (or are refused); nothing runs. No eval/exec in peftkit."""
    from peftkit.recipe import RecipeError, load_recipe

    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path('{marker}').touch()"
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\n")
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[model]\nname_or_path = "{tiny_bert_dir}"\n[task]\ntype = "seq_cls"\n'
        f'[data]\ntrain_file = "train.csv"\ncolumns = {{text = "{payload}"}}\n[train]\noptim = "{payload}"\n'
    )
    with pytest.raises(RecipeError, match=r"train\.optim"):
        load_recipe(recipe, [f"train.run_name={payload}", f"adapter.r={payload}"])
    loaded = load_recipe(recipe.parent / "r.toml", ["train.optim=adamw_torch"])
    assert loaded.data.columns == {"text": payload}
    assert not marker.exists()
    for path in (REPO / "peftkit").rglob("*.py"):
        calls = [
            node.func.id
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        ]
        assert not {"eval", "exec"} & set(calls), f"{path} calls eval/exec"
