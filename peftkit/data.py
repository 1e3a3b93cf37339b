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


def load_raw_datasets(section: DataSection, columns: Mapping[str, bool]) -> Any:
    """Load, rename columns to the task's names, split, and limit. Returns a ``DatasetDict``."""
    from datasets import DatasetDict

    if section.dataset and not Path(section.dataset).is_dir():
        raw = _load_hub(section)
        origin = {split: f"{section.dataset}[{split}]" for split in raw}
    else:
        files = _split_files(section)
        raw = DatasetDict({split: _load_file(Path(path), section) for split, path in files.items()})
        origin = dict(files)

    if "train" not in raw:
        raise DataError(f"{section.dataset}: no train split (found {sorted(raw)}); name the file train.<ext>")
    raw = DatasetDict(
        {split: _rename_columns(ds, section.columns, columns, origin[split]) for split, ds in raw.items()}
    )
    for split, ds in raw.items():
        if len(ds) == 0:
            raise DataError(f"{origin[split]}: the {split} split is empty; give it examples or remove it")

    if "validation" not in raw:
        parts = raw["train"].train_test_split(test_size=section.validation_split, seed=section.seed)
        raw["train"], raw["validation"] = parts["train"], parts["test"]
        logger.info(
            "no validation split: held out %d of %d training examples (seed %d)",
            len(parts["test"]),
            len(parts["train"]) + len(parts["test"]),
            section.seed,
        )
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


def _load_hub(section: DataSection) -> Any:
    from datasets import load_dataset

    try:
        return load_dataset(section.dataset, section.config)
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


def _split_files(section: DataSection) -> dict[str, str]:
    if section.dataset:
        folder = Path(section.dataset)
        found: dict[str, str] = {}
        for split, names in SPLIT_NAMES.items():
            for name in names:
                matches = sorted(p for p in folder.glob(f"{name}.*") if p.suffix in EXTENSIONS)
                if matches:
                    found[split] = str(matches[0])
                    break
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


def _rename_columns(ds: Any, mapping: Mapping[str, str], columns: Mapping[str, bool], origin: str) -> Any:
    renames = {source: canonical for canonical, source in mapping.items() if source != canonical}
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
    absent = [c for c, required in columns.items() if required and c not in ds.column_names]
    if absent:
        example = ", ".join(f"{c} = '<column>'" for c in absent)
        raise DataError(
            f"{origin}: missing column(s) {absent}; the data has {ds.column_names}. "
            f"Map them in the recipe: [data] columns = {{{example}}}"
        )
    return ds


def data_fingerprints(raw: Any) -> dict[str, dict[str, Any]]:
    """Per split: size and datasets' content fingerprint (stored in peftkit_run.json)."""
    return {split: {"rows": len(ds), "fingerprint": ds._fingerprint} for split, ds in raw.items()}


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
