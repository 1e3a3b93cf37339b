"""``peftkit predict``'s inputs and outputs through the CLI: id and kept fields echoed, output lines aligned
with input lines (blank lines included), stdin and stdout, --batch-size, --columns, checkpoints and merged
folders as sources, and the input checked before any model loads.

One tiny seq_cls run (trained in-process, seconds) serves every test; commands run through click's runner.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from peftkit.cli import main
from tests.integration.test_cli_seq_cls import write_split


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("predict-io"), tiny_bert_dir)


def train_tiny_run(work: Path, model: Path) -> Path:
    """A finished seq_cls run at WORK/run with a checkpoint per epoch, its data beside it; returns WORK."""
    from peftkit.recipe import recipe_from_dict
    from peftkit.training import finetune

    write_split(work / "train.csv", 32, 0)
    write_split(work / "validation.csv", 8, 1)
    write_split(work / "test.csv", 8, 2)
    recipe = recipe_from_dict(
        {
            "model": {"name_or_path": str(model)},
            "task": {"type": "seq_cls", "max_length": 32},
            "data": {"train_file": "train.csv", "validation_file": "validation.csv", "test_file": "test.csv"},
            "adapter": {"r": 4},
            "train": {
                "num_train_epochs": 2,
                "learning_rate": 1e-2,
                "save_strategy": "epoch",
                "report_to": "none",
                "output_dir": str(work / "run"),
            },
        },
        base_dir=work,
        name="predict-io",
    )
    finetune(recipe)
    return work


def invoke(*args: str, stdin: str | None = None) -> Result:
    result = CliRunner().invoke(main, [str(a) for a in args], input=stdin)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def predict(
    source: Path, input_path: Path | str, output: Path | str, *extra: str, stdin: str | None = None
) -> Result:
    return invoke("predict", source, "--input", input_path, "--output", output, *extra, stdin=stdin)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


TEXTS = ["win free prize cash now", "see you at home for dinner", "claim your cash prize", "dinner later"]


def test_id_and_kept_fields_come_first_in_input_order(trained: Path, tmp_path: Path) -> None:
    records = [{"id": f"m{i}", "text": t, "source": "sms", "n": i} for i, t in enumerate(TEXTS)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = predict(
        trained / "run", tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--keep-columns", "n,text"
    )
    assert result.exit_code == 0, result.output
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == ["m0", "m1", "m2", "m3"]
    assert [list(r)[:4] for r in out] == [["id", "n", "text", "prediction"]] * 4
    assert [r["text"] for r in out] == TEXTS and "source" not in out[0]
    assert all(set(r["scores"]) == {"ham", "spam"} for r in out)


def test_blank_text_lines_get_an_empty_result_in_their_place(trained: Path, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text(f"{TEXTS[0]}\n\n{TEXTS[1]}\n   \n{TEXTS[2]}\n")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:3]))
    result = predict(trained / "run", tmp_path / "in.txt", tmp_path / "txt.jsonl")
    assert result.exit_code == 0, result.output
    assert "wrote 5 predictions" in result.output and "2 blank lines got an empty result" in result.output
    out = read_jsonl(tmp_path / "txt.jsonl")
    assert out[1] == out[3] == {"prediction": None, "skipped": "blank line"}
    assert predict(trained / "run", tmp_path / "in.jsonl", tmp_path / "jsonl.jsonl").exit_code == 0
    assert [out[0], out[2], out[4]] == read_jsonl(tmp_path / "jsonl.jsonl")


def test_stdin_to_stdout(trained: Path, tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS))
    )
    assert predict(trained / "run", tmp_path / "in.jsonl", tmp_path / "file.jsonl").exit_code == 0
    result = predict(trained / "run", "-", "-", stdin=(tmp_path / "in.jsonl").read_text())
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in result.stdout.splitlines()] == read_jsonl(tmp_path / "file.jsonl")
    assert "wrote 4 predictions to stdout" in result.stderr
    assert not (Path.cwd() / "-").exists()
    text = predict(trained / "run", "-", "-", "--input-format", "txt", stdin="\n".join(TEXTS) + "\n")
    assert text.exit_code == 0, text.output
    assert [json.loads(line)["prediction"] for line in text.stdout.splitlines()] == [
        r["prediction"] for r in read_jsonl(tmp_path / "file.jsonl")
    ]


def test_batch_size_sets_records_per_forward_pass(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftkit import predicting

    sizes: list[int] = []
    real = predicting.load_predictor

    def counting(source: Any, **kwargs: Any) -> Any:
        task, ctx, model = real(source, **kwargs)
        model.register_forward_pre_hook(
            lambda _m, _a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True
        )
        return task, ctx, model

    monkeypatch.setattr(predicting, "load_predictor", counting)
    (tmp_path / "in.txt").write_text("\n".join([*TEXTS, "one more"]) + "\n")
    assert (
        predict(trained / "run", tmp_path / "in.txt", tmp_path / "a.jsonl", "--batch-size", "2").exit_code
        == 0
    )
    assert sizes == [2, 2, 1]
    sizes.clear()
    assert predict(trained / "run", tmp_path / "in.txt", tmp_path / "b.jsonl").exit_code == 0
    assert sizes == [5]  # the recipe's predict_batch_size (64)
    a, b = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
    assert [r["prediction"] for r in a] == [r["prediction"] for r in b]
    assert max(abs(x["score"] - y["score"]) for x, y in zip(a, b, strict=True)) < 1e-5


def test_columns_maps_input_fields_onto_the_task(trained: Path, tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("key,message\n" + "".join(f"k{i},{t}\n" for i, t in enumerate(TEXTS)))
    (tmp_path / "plain.txt").write_text("\n".join(TEXTS) + "\n")
    result = predict(
        trained / "run", tmp_path / "in.csv", tmp_path / "out.jsonl", "--columns", "text=message,id=key"
    )
    assert result.exit_code == 0, result.output
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == ["k0", "k1", "k2", "k3"]
    assert predict(trained / "run", tmp_path / "plain.txt", tmp_path / "plain.jsonl").exit_code == 0
    assert [r["prediction"] for r in out] == [r["prediction"] for r in read_jsonl(tmp_path / "plain.jsonl")]


def test_checkpoints_are_sources(trained: Path, tmp_path: Path) -> None:
    run = trained / "run"
    checkpoints = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 2, sorted(p.name for p in run.iterdir())
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n")
    outputs = {}
    for name, args in {
        "first": (checkpoints[0],),
        "last": (checkpoints[-1],),
        "flag": (run, "--checkpoint", checkpoints[0].name),
        "run": (run,),
    }.items():
        result = predict(args[0], tmp_path / "in.txt", tmp_path / f"{name}.jsonl", *args[1:])
        assert result.exit_code == 0, result.output
        outputs[name] = [r["score"] for r in read_jsonl(tmp_path / f"{name}.jsonl")]
    assert outputs["flag"] == outputs["first"]
    # the run's own adapter is the model it kept at the end: one of its checkpoints
    assert outputs["run"] in (
        pytest.approx(outputs["first"], abs=1e-5),
        pytest.approx(outputs["last"], abs=1e-5),
    )
    assert outputs["first"] != pytest.approx(outputs["last"], abs=1e-5)  # another model: other scores
    twice = predict(checkpoints[0], tmp_path / "in.txt", tmp_path / "x.jsonl", "--checkpoint", "last")
    assert twice.exit_code == 2 and "is a checkpoint already; drop --checkpoint last" in twice.stderr


def test_a_merged_folder_is_a_source(trained: Path, tmp_path: Path) -> None:
    from peftkit.merge import merge_run

    merge_run(trained / "run", tmp_path / "merged", samples=8)
    shutil.copy(trained / "test.csv", tmp_path / "in.csv")
    assert predict(trained / "run", tmp_path / "in.csv", tmp_path / "run.jsonl").exit_code == 0
    result = predict(tmp_path / "merged", tmp_path / "in.csv", tmp_path / "merged.jsonl")
    assert result.exit_code == 0, result.output
    adapter, merged = read_jsonl(tmp_path / "run.jsonl"), read_jsonl(tmp_path / "merged.jsonl")
    assert [r["prediction"] for r in merged] == [r["prediction"] for r in adapter]
    assert max(abs(x["score"] - y["score"]) for x, y in zip(adapter, merged, strict=True)) < 1e-4


@pytest.mark.parametrize(
    ("name", "content", "extra", "needles"),
    [
        (
            "in.jsonl",
            '{"text": "a"}\n{"body": "b"}\n{"body": "c"}\n',
            (),
            ["in.jsonl: 2 records (lines 2, 3) without a 'text' field", "--columns text=<your field>"],
        ),
        (
            "in.jsonl",
            '{"text": "a"}\n',
            ("--keep-columns", "lang"),
            ["--keep-columns lang: 1 record (line 1)"],
        ),
        (
            "in.jsonl",
            '{"text": "a"}\n',
            ("--keep-columns", "score"),
            ["--keep-columns score: the result has"],
        ),
        (
            "in.jsonl",
            '{"text": "a"}\n',
            ("--columns", "text"),
            ["--columns 'text': write TASK_FIELD=INPUT_FIELD"],
        ),
        ("in.txt", "\n\n", (), ["in.txt: has no records to predict"]),
        (
            "in.xml",
            "<a/>",
            (),
            ["in.xml: cannot tell the format from the extension '.xml'; use --input-format"],
        ),
    ],
    ids=[
        "missing field",
        "kept field missing",
        "kept field clashes",
        "bad --columns",
        "only blanks",
        "format",
    ],
)
def test_input_is_checked_before_the_model_loads(
    trained: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    content: str,
    extra: tuple[str, ...],
    needles: list[str],
) -> None:
    from peftkit import predicting

    def no_loading(source: Any) -> Any:
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(predicting, "load_predictor", no_loading)
    (tmp_path / name).write_text(content)
    result = predict(trained / "run", tmp_path / name, tmp_path / "out.jsonl", *extra)
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in result.stderr, result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_python_api_takes_the_same_sources_and_options(trained: Path) -> None:
    import peftkit

    records = [{"id": 7, "text": TEXTS[0], "lang": "en"}, {"text": TEXTS[1], "lang": "en"}]
    results = peftkit.predict(
        trained / "run", records, keep_columns=["lang"], batch_size=1, checkpoint="last"
    )
    assert [list(r)[:2] for r in results] == [["id", "lang"], ["lang", "prediction"]]
    assert results[0]["id"] == 7
