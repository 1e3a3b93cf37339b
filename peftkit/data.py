"""Datasets from the Hub or local files → a DatasetDict with the task's column names → cached features.

Splits: ``train`` (required), ``validation`` (carved from train, seeded, when absent) and ``test``
(optional, never reshuffled). Tokenization goes through ``Dataset.map`` with a fingerprint built from
the data, the task config, the labels and the tokenizer, so a second run with the same inputs reads
the cached Arrow files instead of tokenizing again.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from peftkit.errors import DataError
from peftkit.recipe import DataSection
from peftkit.tasks.base import Task, TaskContext

logger = logging.getLogger(__name__)

SPLIT_NAMES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}
EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".conll": "conll",
    ".bio": "conll",
    ".iob": "conll",
}


def load_raw_datasets(section: DataSection, task: Task) -> Any:
    """Load, rename columns to the task's names, check every record, split, and limit.

    Returns a ``DatasetDict``. A test split whose reference columns are absent, or null (label -1) in every
    record, is kept without them: it is predicted, not scored (see :func:`is_labelled`).
    """
    from datasets import DatasetDict

    skipped = {split for split, source in section.splits.items() if source is False}
    if section.dataset and not Path(section.dataset).is_dir():
        raw, origin = _load_hub(section)
    else:
        files = _split_files(section)
        raw = DatasetDict({split: _load_file(Path(path), section) for split, path in files.items()})
        origin = dict(files)
    raw = DatasetDict({split: ds for split, ds in raw.items() if split not in skipped})

    if "train" not in raw:
        raise DataError(
            f"{section.dataset}: no train split (found {sorted(raw)}); name the file train.<ext>, "
            'or pick the split with [data] splits = {train = "<split>"}'
        )
    raw = DatasetDict(
        {
            split: _rename_columns(
                ds,
                section.columns,
                task.columns,
                origin[split],
                task.reference_columns if split == "test" else (),
            )
            for split, ds in raw.items()
        }
    )
    for split, ds in raw.items():
        if len(ds) == 0:
            raise DataError(f"{origin[split]}: the {split} split is empty; give it examples or remove it")
    raw = _drop_missing_references(raw, task, origin)
    check_records(raw, task, section, origin)

    if "validation" not in raw:
        raw["train"], raw["validation"] = _hold_out(raw["train"], section, origin["train"])
    limits = {
        "train": section.max_train_samples,
        "validation": section.max_eval_samples,
        "test": section.max_test_samples,
    }
    for split, limit in limits.items():
        if split in raw and limit is not None and limit < len(raw[split]):
            ds = raw[split].shuffle(seed=section.seed) if split == "train" else raw[split]
            raw[split] = ds.select(range(limit))
    return DatasetDict({split: raw[split] for split in ("train", "validation", "test") if split in raw})


def _hold_out(train: Any, section: DataSection, origin: str) -> tuple[Any, Any]:
    """(train, validation): a seeded share of train held out, or a DataError when train is too small."""
    total = len(train)
    held = math.ceil(total * section.validation_split)
    if total - held < 1:
        raise DataError(
            f"{origin}: the train split has {total} example(s): too few to hold out "
            f"data.validation_split = {section.validation_split} of them for validation and train on the "
            "rest; add examples or give a validation split (validation_file = ..., or a validation.<ext> "
            "file in the dataset folder)"
        )
    parts = train.train_test_split(test_size=section.validation_split, seed=section.seed)
    logger.info(
        "no validation split: held out %d of %d training examples (seed %d)",
        len(parts["test"]),
        total,
        section.seed,
    )
    return parts["train"], parts["test"]


def is_labelled(ds: Any, task: Task) -> bool:
    """Whether a split carries the task's references (a test split without them is only predicted); a
    task whose records hold them in one of several columns (seq2seq: ``target``, or the conversation's last
    reply in ``messages``) needs one of them."""
    return any(column in ds.column_names for column in task.reference_columns)


def _no_reference(value: Any) -> bool:
    """null, or -1 (how datasets' ClassLabel and GLUE's test splits write "no label")."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value == -1)


def _drop_missing_references(raw: Any, task: Task, origin: Mapping[str, str]) -> Any:
    """A test split whose references are null (or -1) in every record loses those columns, with a line
    saying it will be predicted, not scored; train and validation need their references."""
    for split in list(raw):
        ds = raw[split]
        present = [c for c in task.reference_columns if c in ds.column_names]
        empty = [c for c in present if all(_no_reference(v) for v in ds[c])]
        if len(empty) < len(present):
            continue  # references in one of the task's reference columns (see is_labelled)
        if split != "test":
            missing = empty or list(task.reference_columns)
            raise DataError(
                f"{origin[split]}: the {split} split has no {', '.join(map(repr, missing))} in any record "
                f"(null or -1 everywhere); {split} needs references. Only a test split may be unlabelled"
                + (
                    "; skip this one with [data] splits = {validation = false} (a share of train is held "
                    "out instead)"
                    if split == "validation"
                    else ""
                )
            )
        raw[split] = ds.remove_columns(empty)
        logger.debug(
            "%s: the test split has no labels (%s): it will be predicted, not scored",
            origin[split],
            ", ".join(task.reference_columns),
        )
    return raw


def _load_hub(section: DataSection) -> tuple[Any, dict[str, str]]:
    """The Hub dataset's splits under peftkit's names (``[data] splits`` picks and renames them)."""
    from datasets import DatasetDict, load_dataset

    kwargs: dict[str, Any] = {"revision": section.revision} if section.revision else {}
    try:
        loaded = load_dataset(section.dataset, section.config, **kwargs)
    except FileNotFoundError as exc:
        raise DataError(
            f"data.dataset {section.dataset!r}: not found ({exc}); check the id or path"
        ) from None
    except ConnectionError as exc:
        raise DataError(
            f"data.dataset {section.dataset!r}: the Hugging Face Hub cannot be reached ({exc}); "
            "use local files (train_file = ...) or a cached dataset"
        ) from None
    except ValueError as exc:
        raise DataError(f"data.dataset {section.dataset!r}: {exc}") from None
    chosen: dict[str, str] = {}
    for split, names in SPLIT_NAMES.items():
        source = _splits(section).get(split)
        if source is False:
            continue
        if isinstance(source, str):
            if source not in loaded:
                raise DataError(
                    f"data.splits.{split} = {source!r}: the dataset {section.dataset!r} has no split "
                    f"{source!r} (it has {sorted(loaded)}); name one of those"
                )
            chosen[split] = source
        else:
            found = next((name for name in names if name in loaded), None)
            if found is not None:
                chosen[split] = found
    raw = DatasetDict({split: loaded[source] for split, source in chosen.items()})
    return raw, {split: f"{section.dataset}[{source}]" for split, source in chosen.items()}


def _splits(section: DataSection) -> Mapping[str, str | bool]:
    """``[data] splits``: peftkit split → the data's split name, or False to skip it."""
    return dict(section.splits.items())


def _split_files(section: DataSection) -> dict[str, str]:
    if section.dataset:
        folder = Path(section.dataset)
        found: dict[str, str] = {}
        for split, aliases in SPLIT_NAMES.items():
            source = _splits(section).get(split)
            if source is False:
                continue
            names = (source,) if isinstance(source, str) else aliases
            for name in names:
                matches = sorted(p for p in folder.glob(f"{name}.*") if p.suffix in EXTENSIONS)
                if matches:
                    found[split] = str(matches[0])
                    break
        for split, source in section.splits.items():
            if isinstance(source, str) and split not in found:
                raise DataError(
                    f"data.splits.{split} = {source!r}: {folder} has no {source}.<ext> file "
                    f"({', '.join(EXTENSIONS)}); name an existing file's stem"
                )
        if "train" not in found:
            raise DataError(
                f"{folder}: no train.<ext> file ({', '.join(EXTENSIONS)}); "
                "name the files train/validation/test or use train_file = ..."
            )
        return found
    files = {"train": section.train_file, "validation": section.validation_file, "test": section.test_file}
    return {split: path for split, path in files.items() if path}


def file_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    try:
        return EXTENSIONS[path.suffix.lower()]
    except KeyError:
        raise DataError(
            f"{path}: cannot tell the format from the extension {path.suffix!r}; "
            f"set [data] format = one of csv, json, parquet, text, conll"
        ) from None


def _load_file(path: Path, section: DataSection) -> Any:
    from datasets import Dataset, load_dataset

    fmt = file_format(path, section.format)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if fmt == "conll":
        from peftkit.conll import read_conll

        rows = read_conll(path, word_column=section.conll_word_column, tag_column=section.conll_tag_column)
        return Dataset.from_list(rows)
    _check_encoding(path)
    _check_not_empty(path, fmt)
    kwargs: dict[str, Any] = {"sep": "\t"} if fmt == "csv" and path.suffix.lower() == ".tsv" else {}
    try:
        return load_dataset(fmt, data_files={"data": str(path)}, split="data", **kwargs)
    except Exception as exc:  # datasets wraps parser errors in many types; the file is what matters
        cause = exc.__cause__ or exc
        raise DataError(f"{path}: cannot be read as {fmt} ({type(cause).__name__}: {cause})") from None


def _check_not_empty(path: Path, fmt: str) -> None:
    if fmt == "parquet":
        return
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    header = 1 if fmt == "csv" else 0
    if len(lines) <= header:
        raise DataError(f"{path}: has no examples; fill it or remove it from the recipe")


def _check_encoding(path: Path) -> None:
    """Reject non-UTF-8 text files up front with the byte offset (datasets' own error is cryptic)."""
    if path.suffix.lower() == ".parquet":
        return
    with path.open("rb") as handle:
        data = handle.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte {exc.start}); re-save the file as UTF-8"
        ) from None


def _rename_columns(
    ds: Any,
    mapping: Mapping[str, str],
    columns: Mapping[str, bool],
    origin: str,
    optional: tuple[str, ...] = (),
) -> Any:
    renames = {
        source: canonical
        for canonical, source in mapping.items()
        if source != canonical and not (canonical in optional and source not in ds.column_names)
    }
    missing = [source for source in renames if source not in ds.column_names]
    if missing:
        raise DataError(
            f"{origin}: [data] columns names {missing} but the data has columns {ds.column_names}; "
            "fix the mapping"
        )
    clashes = [c for c in renames.values() if c in ds.column_names and c not in renames]
    if clashes:
        ds = ds.remove_columns(clashes)
    if renames:
        ds = ds.rename_columns(renames)
    absent = [
        c for c, required in columns.items() if required and c not in ds.column_names and c not in optional
    ]
    if absent:
        example = ", ".join(f"{c} = '<column>'" for c in absent)
        raise DataError(
            f"{origin}: missing column(s) {absent}; the data has {ds.column_names}. "
            f"Map them in the recipe: [data] columns = {{{example}}}"
        )
    return ds


_SHOWN = 5  # problems listed in one error message; the rest are counted


def check_records(raw: Any, task: Task, section: DataSection, origin: Mapping[str, str]) -> None:
    """Every record holds what the task reads from it (``Task.column_kinds``), else one DataError that
    counts the bad records of every split and names the first ones by file and line."""
    from datasets import ClassLabel

    sources = {canonical: source for canonical, source in section.columns.items()}
    problems: list[str] = []
    for split, ds in raw.items():
        locate = _locator(origin[split], section, len(ds))
        for column, kind in task.column_kinds.items():
            if column not in ds.column_names:
                continue
            name = (
                repr(column) if sources.get(column, column) == column else f"{sources[column]!r} ({column})"
            )
            class_label = isinstance(ds.features.get(column), ClassLabel)
            for index, value in enumerate(ds[column]):
                problem = _record_problem(kind, value, name, class_label)
                if problem:
                    problems.append(f"{locate(index)}: {problem}")
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:_SHOWN])
        more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise DataError(
            f"{len(problems)} record(s) cannot be used:\n{shown}{more}\n"
            "Fix or remove these records, or map the right columns with [data] columns = {...}"
        )


def _record_problem(kind: str, value: Any, name: str, class_label: bool) -> str | None:
    """Why one record's ``value`` of a column of this ``kind`` cannot be used (None when it can)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"no {name} field (a missing or null value); every record needs one"
    if kind == "text":
        if not isinstance(value, str):
            return f"{name} is a {type(value).__name__} ({_short(value)}), not a text"
        if not value.strip():
            return f"{name} is empty ({value!r}); every record needs a non-empty text"
    elif kind == "label":
        if isinstance(value, (list, dict)):
            return f"{name} is a {type(value).__name__} ({_short(value)}); a label is one class name or id"
        if class_label and value == -1:
            return f"{name} is -1 (no label); label every record of this split"
    elif kind == "words":
        if not isinstance(value, list) or not all(isinstance(word, str) for word in value):
            return f"{name} is {_short(value)}; it must be a list of words (strings)"
        if not value:
            return f"{name} is an empty list; every record needs at least one word"
    elif kind == "tags":
        if not isinstance(value, list):
            return f"{name} is a {type(value).__name__} ({_short(value)}); it must be a list (a tag per word)"
    elif kind == "id" and (isinstance(value, bool) or not isinstance(value, (str, int))):
        return f"{name} is a {type(value).__name__} ({_short(value)}); an id is a string or an integer"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _locator(origin: str, section: DataSection, rows: int) -> Callable[[int], str]:
    """record index → "file:line" where the file's lines can be matched to its records, else the record."""
    path = Path(origin)
    lines = _record_lines(path, file_format(path, section.format)) if path.is_file() else None
    if lines is not None and len(lines) == rows:
        return lambda index: f"{origin}:{lines[index]}"
    what = "sentence" if path.is_file() and file_format(path, section.format) == "conll" else "record"
    return lambda index: f"{origin} ({what} {index + 1})"


def _record_lines(path: Path, fmt: str) -> list[int] | None:
    """The line each record of a CSV, JSON-lines or text file starts on (None for other formats)."""
    text = path.read_text(encoding="utf-8")
    if fmt == "json":
        if text.lstrip().startswith("["):
            return None  # one JSON list: its records are not lines
        return [number for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if fmt == "text":
        return list(range(1, len(text.splitlines()) + 1))
    if fmt == "csv":
        import csv

        reader = csv.reader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        starts: list[int] = []
        end = 0  # the last line of the previous row (a quoted field may span lines)
        for row in reader:
            if row:
                starts.append(end + 1)
            end = reader.line_num
        return starts[1:]  # the first row is the header
    return None


def data_fingerprints(raw: Any, task: Task | None = None) -> dict[str, dict[str, Any]]:
    """Per split: size and datasets' content fingerprint (stored in peftkit_run.json); with the task, also
    whether the split has references (``labelled``: false for a test split that is predicted, not scored)."""
    return {
        split: {
            "rows": len(ds),
            "fingerprint": ds._fingerprint,
            **({"labelled": is_labelled(ds, task)} if task is not None else {}),
        }
        for split, ds in raw.items()
    }


def tokenize_splits(raw: Any, task: Task, ctx: TaskContext, num_proc: int | None = None) -> dict[str, Any]:
    """Run ``task.preprocess`` over every split, cached by a fingerprint of everything it depends on."""
    # preprocessing may read the model config (seq2seq: the family, the decoder start token) and changes with
    # the task's code (a new peftkit version must not reuse features tokenized the old way)
    model_config = ctx.model_config.to_json_string() if hasattr(ctx.model_config, "to_json_string") else ""
    tokenizer_id = _tokenizer_fingerprint(ctx.tokenizer) + model_config + _source_fingerprint(task.preprocess)
    config = json.dumps(ctx.cfg.model_dump(), sort_keys=True, default=str)
    features: dict[str, Any] = {}
    for split, ds in raw.items():
        train = split == "train"
        key = "|".join(
            [ds._fingerprint, task.name, config, json.dumps(ctx.labels), tokenizer_id, str(train), "v1"]
        )
        fingerprint = hashlib.sha256(key.encode()).hexdigest()[:32]
        mapped = ds.map(
            functools.partial(_preprocess_batch, task.preprocess, ctx, train),
            batched=True,
            remove_columns=ds.column_names,
            new_fingerprint=fingerprint,
            num_proc=num_proc if num_proc and num_proc > 1 else None,
            desc=f"Tokenizing {split}",
        )
        if "input_ids" in mapped.column_names and "length" not in mapped.column_names:
            mapped = mapped.map(
                _add_length,
                batched=True,
                new_fingerprint=hashlib.sha256((fingerprint + "length").encode()).hexdigest()[:32],
                desc=f"Measuring {split}",
            )
        features[split] = mapped
    return features


def _preprocess_batch(
    preprocess: Callable[[dict[str, list[Any]], TaskContext, bool], dict[str, list[Any]]],
    ctx: TaskContext,
    train: bool,
    batch: dict[str, list[Any]],
) -> dict[str, list[Any]]:
    return preprocess(batch, ctx, train)


def _add_length(batch: dict[str, list[Any]]) -> dict[str, list[int]]:
    return {"length": [len(ids) for ids in batch["input_ids"]]}


def _source_fingerprint(function: Callable[..., Any]) -> str:
    """A hash of the source of the module that defines ``function`` ('' when it cannot be read)."""
    module = inspect.getmodule(function)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        source = ""
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # calling a fast tokenizer records its last truncation/padding settings: not part of its identity
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        body = json.dumps(state, sort_keys=True)
    else:
        body = repr(tokenizer)
    extra = json.dumps(
        {
            "side": getattr(tokenizer, "padding_side", None),
            "specials": getattr(tokenizer, "special_tokens_map", {}),
            "chat_template": getattr(tokenizer, "chat_template", None),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256((body + extra).encode()).hexdigest()[:32]


PREDICT_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".txt": "txt"}


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records for ``peftkit predict``: JSONL (an object a line), JSON (a list), CSV, or text lines.

    Blank lines of a JSONL or text file are left out here; :func:`parse_records` keeps their places.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    fmt = PREDICT_FORMATS.get(path.suffix.lower(), "txt")
    records = parse_records(decode_utf8(path.read_bytes(), str(path)), str(path), fmt)
    return [record for _, record in records if record is not None]


def decode_utf8(data: bytes, name: str) -> str:
    """``data`` as text, or the line and byte offset where it stops being UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{name}:{line}: not valid UTF-8 (byte {exc.start}); re-save the file as UTF-8"
        ) from None


def parse_records(text: str, name: str, fmt: str) -> list[tuple[int, dict[str, Any] | None]]:
    """(line number, record) for every record of ``text`` in ``fmt`` (jsonl, json, csv, tsv, txt).

    A blank line of a JSONL or text input is ``(line, None)``: it keeps its place, so that the n-th output
    line answers the n-th input line. A JSON list's line numbers are its element numbers (from 1); a CSV's
    are the line each row starts on (blank rows are no records in CSV).
    """
    if fmt == "jsonl":
        records: list[tuple[int, dict[str, Any] | None]] = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                records.append((number, None))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{name}:{number}: invalid JSON ({exc.msg}); one JSON object per line"
                ) from None
            if not isinstance(record, dict):
                raise DataError(f"{name}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append((number, record))
        return records
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{name}: expected a JSON list of objects")
        return list(enumerate(data, start=1))
    if fmt in ("csv", "tsv"):
        return _parse_csv(text, name, "\t" if fmt == "tsv" else ",")
    return [
        (number, {"text": line} if line.strip() else None) for number, line in enumerate(text.splitlines(), 1)
    ]


def _parse_csv(text: str, name: str, delimiter: str) -> list[tuple[int, dict[str, Any] | None]]:
    """CSV rows as records; a row with more or fewer fields than the header is an error naming its line."""
    import csv

    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return []
    records: list[tuple[int, dict[str, Any] | None]] = []
    start = reader.line_num + 1
    try:
        for row in reader:
            if row and len(row) != len(header):
                raise DataError(
                    f"{name}:{start}: {len(row)} fields, but the header has {len(header)} ({header}); "
                    "quote values that hold the delimiter, and give every row one value per column"
                )
            if row:
                records.append((start, dict(zip(header, row, strict=True))))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{name}:{reader.line_num}: not valid CSV ({exc})") from None
    return records


def rename_records(records: list[dict[str, Any]], mapping: Mapping[str, str]) -> list[dict[str, Any]]:
    """Apply the recipe's column mapping to predict records (keys already canonical are kept)."""
    inverse = {source: canonical for canonical, source in mapping.items()}
    return [{inverse.get(k, k): v for k, v in record.items()} for record in records]
