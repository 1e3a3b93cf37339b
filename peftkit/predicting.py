"""``peftkit predict``: records in (a file or stdin), one JSON result a line out (a file or stdout).

The rules (docs/predict.md):

- the source is a run directory, one of its ``checkpoint-N`` folders, or a merged model folder
  (``peftkit merge``; an export bundle with its safetensors is one too);
- the input is read and checked (it exists, parses, every record has the fields the task needs) before any
  model weights load, and it is never written over: an output that is the input, or a file of the source
  folder, is refused;
- the n-th output line answers the n-th input record; in a JSONL or text input every line is a record, and a
  blank line gets an empty result (``{"prediction": null, "skipped": "blank line"}``), never a silent drop;
- each result starts with the record's ``id`` when it has one, then the input fields asked for with
  ``--keep-columns``, then the task's own fields.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit import runs
from peftkit.data import PREDICT_FORMATS, decode_utf8, parse_records
from peftkit.errors import DataError, OutputError, RunDirError

STDIO = "-"
STDIN_NAME = "<stdin>"
INPUT_FORMATS = tuple(dict.fromkeys(PREDICT_FORMATS.values()))
BLANK = {"prediction": None, "skipped": "blank line"}
# fields the tasks' results use: an input field kept under one of these names would hide the result's
RESULT_FIELDS = ("id", "prediction", "score", "scores", "words", "entities", "start", "end", "skipped")


# --------------------------------------------------------------------------------------------------
# The source: what to predict with


@dataclass
class PredictSource:
    """A run directory, one of its checkpoints, or a merged folder, before any weights are loaded."""

    folder: Path  # what the user named
    kind: str  # "run", "checkpoint" or "merged model"
    recipe: Any  # the resolved recipe the model was trained with
    run_dir: Path | None = None
    adapter_dir: Path | None = None  # a checkpoint's folder; None for the run's own adapter
    labels: Sequence[str] | None = None  # a merged folder's (a run's are read when it loads)


def is_merged_dir(folder: Path) -> bool:
    """A folder ``peftkit merge`` (or ``export``) wrote: its merge report and the model's config."""
    return (folder / runs.MERGE_REPORT).is_file() and (folder / runs.MODEL_CONFIG).is_file()


def resolve_source(source: str | os.PathLike[str], checkpoint: str | None = None) -> PredictSource:
    """What ``source`` is and the recipe it was trained with, its files checked; loads no weights."""
    from peftkit.merge import MergeError, resolve_adapter

    folder = Path(source)
    if is_merged_dir(folder):
        if checkpoint is not None:
            raise RunDirError(f"{folder} is a merged model: it has no checkpoints; drop --checkpoint")
        return _merged_source(folder)
    if not folder.is_dir():
        runs.check_complete(folder)  # says: no such run directory
    try:
        run_dir, adapter_dir = resolve_adapter(folder, checkpoint)
    except MergeError as exc:
        raise RunDirError(str(exc)) from None
    runs.check_complete(
        run_dir, adapter_dir
    )  # finished (or a checkpoint), adapter files whole: before loading
    kind = "checkpoint" if adapter_dir is not None else "run"
    recipe = runs.load_resolved_recipe(run_dir)
    return PredictSource(folder=folder, kind=kind, recipe=recipe, run_dir=run_dir, adapter_dir=adapter_dir)


def _merged_source(folder: Path) -> PredictSource:
    from peftkit.recipe import recipe_from_dict

    report_path = folder / runs.MERGE_REPORT
    report = runs.read_json_object(report_path, {"recipe": dict})
    labels = report.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise RunDirError(f"{report_path}: corrupted (labels must be a list of names); merge the run again")
    raw = {k: v for k, v in report["recipe"].items() if v is not None}
    recipe = recipe_from_dict(raw, source=str(report_path), base_dir=folder, check_files=False)
    # a received folder's recorded settings do not switch on code execution (issue 19)
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"trust_remote_code": False})})
    return PredictSource(folder=folder, kind="merged model", recipe=recipe, labels=labels)


def load_predictor(source: PredictSource, *, trust_remote_code: bool = False) -> tuple[Any, Any, Any]:
    """(task, ctx, model) in eval mode: a run's (or checkpoint's) adapter on its base, or the merged model.
    ``trust_remote_code``: the user's own ``--trust-remote-code`` (a run's recorded one is not honoured
    alone; a merged folder's is always off)."""
    if source.kind != "merged model":
        assert source.run_dir is not None
        loaded = runs.load_run(source.run_dir, source.adapter_dir, trust_remote_code=trust_remote_code)
        return loaded.task, loaded.ctx, loaded.model
    import torch
    from transformers import AutoConfig

    from peftkit.modeling import load_stack

    folder, recipe = source.folder, source.recipe
    try:
        config = AutoConfig.from_pretrained(str(folder))
        stack = load_stack(
            recipe, source.labels, tokenizer_source=folder, model_config=config, with_model=False
        )
        dtype = recipe.model.dtype
        model = stack.task.model_class(config).from_pretrained(
            str(folder), dtype="auto" if dtype == "auto" else getattr(torch, dtype)
        )
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunDirError(
            f"{folder}: the merged model cannot be loaded ({type(exc).__name__}: {first}); "
            "merge the run again"
        ) from None
    return stack.task, stack.ctx, model.eval()


# --------------------------------------------------------------------------------------------------
# The input: read and checked before the model loads


@dataclass
class PredictInput:
    """The records of one input, each with its line number; a blank line is ``None`` and keeps its place."""

    name: str  # the path, or <stdin>
    fmt: str
    records: list[tuple[int, dict[str, Any] | None]]

    @property
    def blank_lines(self) -> int:
        return sum(record is None for _, record in self.records)


def read_input(
    path: str | os.PathLike[str], fmt: str | None = None, stdin: bytes | None = None
) -> PredictInput:
    """The records of a file, or of ``stdin`` when ``path`` is ``-`` (JSONL unless ``fmt`` says otherwise)."""
    if str(path) == STDIO:
        name, data = STDIN_NAME, stdin if stdin is not None else b""
        fmt = fmt or "jsonl"
    else:
        file = Path(path)
        name = str(file)
        if not file.is_file():
            raise DataError(
                f"{file}: file not found" if not file.is_dir() else f"{file}: a folder, not a file"
            )
        if fmt is None:
            fmt = PREDICT_FORMATS.get(file.suffix.lower())
            if fmt is None:
                raise DataError(
                    f"{file}: cannot tell the format from the extension {file.suffix!r}; "
                    f"use --input-format {' / '.join(INPUT_FORMATS)}"
                )
        data = file.read_bytes()
    if fmt not in INPUT_FORMATS:
        raise DataError(f"--input-format {fmt}: use one of {', '.join(INPUT_FORMATS)}")
    return PredictInput(name=name, fmt=fmt, records=parse_records(decode_utf8(data, name), name, fmt))


def parse_columns(specs: Sequence[str]) -> dict[str, str]:
    """``--columns text=msg,text_pair=reply`` → {task field: input field}."""
    mapping: dict[str, str] = {}
    for spec in specs:
        for item in filter(None, (part.strip() for part in spec.split(","))):
            field, sep, column = (part.strip() for part in item.partition("="))
            if not sep or not field or not column:
                raise DataError(
                    f"--columns {item!r}: write TASK_FIELD=INPUT_FIELD, e.g. --columns text=message"
                )
            mapping[field] = column
    return mapping


def parse_keep(specs: Sequence[str]) -> list[str]:
    """``--keep-columns a,b`` (repeatable) → the input fields to echo, in order, once each."""
    kept = [name.strip() for spec in specs for name in spec.split(",") if name.strip()]
    clashes = [name for name in kept if name in RESULT_FIELDS and name != "id"]
    if clashes:
        raise DataError(
            f"--keep-columns {','.join(clashes)}: the result has a field of that name "
            f"({', '.join(RESULT_FIELDS)}); rename the input field"
        )
    return [name for name in dict.fromkeys(kept) if name != "id"]  # id is echoed anyway


def task_records(
    source: PredictSource, given: PredictInput, columns: Mapping[str, str] | None = None
) -> list[dict[str, Any] | None]:
    """The records with the task's field names (``columns``, else the recipe's [data] columns, map them)."""
    from peftkit.tasks import TASKS

    task = TASKS[source.recipe.task_name]
    if given.fmt == "txt":
        if len(task.predict_requires) != 1:
            needs = " and ".join(group[0] for group in task.predict_requires)
            raise DataError(
                f"{given.name}: a text input gives one text a line, but {task.name} needs {needs} in each "
                "record; use JSONL records"
            )
        field = task.predict_requires[0][-1]
        return [None if r is None else {field: r["text"]} for _, r in given.records]
    mapping = dict(source.recipe.data.columns) if columns is None else dict(columns)
    inverse = {column: field for field, column in mapping.items()}
    return [None if r is None else {inverse.get(k, k): v for k, v in r.items()} for _, r in given.records]


def check_input(
    source: PredictSource,
    given: PredictInput,
    records: Sequence[dict[str, Any] | None],
    keep: Sequence[str] = (),
    columns: Mapping[str, str] | None = None,
) -> None:
    """Every record has a field of each group the task requires, and every ``--keep-columns`` field."""
    from peftkit.tasks import TASKS

    task = TASKS[source.recipe.task_name]
    if not any(record is not None for record in records):
        raise DataError(f"{given.name}: has no records to predict")
    lines = [line for line, _ in given.records]
    problems: list[str] = []
    for group in task.predict_requires:
        missing = [n for n, r in zip(lines, records, strict=True) if r is not None and _lacks(r, group)]
        if missing:
            wanted = " or ".join(repr(name) for name in group)
            first = next(r for r in records if r is not None and _lacks(r, group))
            mapped = columns if columns is not None else source.recipe.data.columns
            how = f" (mapped by {dict(mapped)})" if mapped else ""
            problems.append(
                f"{_count(missing)} without a {wanted} field{how}, e.g. one with the fields "
                f"{sorted(first)}; name the field {wanted} or map yours with --columns "
                f"{group[-1]}=<your field>"
            )
    for name in keep:
        absent = [n for (n, r) in given.records if r is not None and name not in r]
        if absent:
            problems.append(f"--keep-columns {name}: {_count(absent)} without a {name!r} field")
    if problems:
        raise DataError(f"{given.name}: " + "; ".join(problems))


def _lacks(record: Mapping[str, Any], group: Sequence[str]) -> bool:
    return all(record.get(name) is None for name in group)


def _count(lines: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in lines[:5]) + (f" and {len(lines) - 5} more" if len(lines) > 5 else "")
    return (
        f"{len(lines)} record{'s' if len(lines) != 1 else ''} (line{'s' if len(lines) != 1 else ''} {shown})"
    )


# --------------------------------------------------------------------------------------------------
# The output: never over the input


def check_output(output: str | os.PathLike[str], given_input: str | os.PathLike[str], source: Path) -> None:
    """Refuse an output that is the input (also through a link or another spelling) or a source file."""
    if str(output) == STDIO:
        return
    out = Path(output)
    if str(given_input) != STDIO and _same_file(out, Path(given_input)):
        raise OutputError(
            f"--output {out}: that is the input file ({given_input}); predict never writes over its input. "
            "Choose another --output"
        )
    target = out.resolve()
    if target.exists() and source.resolve() in target.parents:
        raise OutputError(
            f"--output {out}: that is a file of {source}, the model predict reads; choose a file outside it"
        )


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


# --------------------------------------------------------------------------------------------------
# Predicting


def predict_records(
    task: Any,
    ctx: Any,
    model: Any,
    records: Sequence[dict[str, Any] | None],
    originals: Sequence[dict[str, Any] | None] | None = None,
    keep: Sequence[str] = (),
    batch_size: int | None = None,
) -> list[dict[str, Any]]:
    """One result per record, in order: ``id`` first (when the record has one), then the ``keep`` fields of
    the original record, then the task's result; a ``None`` record (a blank line) gets :data:`BLANK`."""
    if batch_size is not None:
        ctx = dataclasses.replace(ctx, cfg=ctx.cfg.model_copy(update={"predict_batch_size": batch_size}))
    present = [record for record in records if record is not None]
    predicted = iter(task.predict(model, ctx, present) if present else [])
    originals = originals if originals is not None else records
    results: list[dict[str, Any]] = []
    for record, original in zip(records, originals, strict=True):
        if record is None or original is None:
            results.append(dict(BLANK))
            continue
        result = next(predicted)
        echoed: dict[str, Any] = {"id": record["id"]} if "id" in record else {}
        echoed.update({name: original[name] for name in keep})
        results.append({**echoed, **result})
    return results


def is_stdio(path: str | os.PathLike[str]) -> bool:
    return str(path) == STDIO
