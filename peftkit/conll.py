"""Read CoNLL-style column files (one word per line, blank line between sentences) into word/tag records.

This is the format of CoNLL-2003 and of most NER and chunking corpora: whitespace-separated columns, the
word in one column and the tag in another, ``-DOCSTART-`` lines between documents. Every line of a file
must have the same number of columns: a word that contains a space, or a missing tag, would otherwise
shift the columns silently and train on garbage.
"""

from __future__ import annotations

from pathlib import Path

from peftkit.errors import DataError

DOCSTART = "-DOCSTART-"


def _columns_needed(word_column: int, tag_column: int) -> int:
    """The fewest columns a line needs for the word and the tag to be two different columns."""
    if word_column == tag_column:
        raise DataError(
            f"the word and the tag are both read from column {word_column}; set different columns"
        )

    def resolve(column: int, count: int) -> int:
        return column if column >= 0 else count + column

    count = max(
        word_column + 1 if word_column >= 0 else -word_column,
        tag_column + 1 if tag_column >= 0 else -tag_column,
    )
    while resolve(word_column, count) == resolve(tag_column, count):  # e.g. 0 and -1 on a one-column line
        count += 1
    return count


def read_conll(path: Path, word_column: int = 0, tag_column: int = -1) -> list[dict[str, list[str]]]:
    """Return one ``{"tokens": [...], "tags": [...]}`` record per sentence of the CoNLL file at ``path``.

    ``word_column`` and ``tag_column`` are column indices (negative ones count from the end, so the
    default reads the first column as the word and the last one as the tag).
    Raises :class:`DataError` naming ``file:line`` for a line with too few or an inconsistent number of
    columns, and for a file that is missing, not UTF-8, or holds no sentence.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"{path}: CoNLL file not found; check the path in [data] (relative paths resolve "
            "against the recipe's folder)."
        ) from None
    except UnicodeDecodeError as err:
        line_number = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line_number}: not valid UTF-8 ({err.reason}); re-encode the file as UTF-8, "
            "e.g. `iconv -f latin1 -t utf-8`."
        ) from None

    needed_columns = _columns_needed(word_column, tag_column)
    records: list[dict[str, list[str]]] = []
    words: list[str] = []
    tags: list[str] = []
    column_count: int | None = None  # fixed by the first word line
    first_word_line = 0

    def end_sentence() -> None:
        nonlocal words, tags
        if words:
            records.append({"tokens": words, "tags": tags})
        words, tags = [], []

    for line_number, line in enumerate(text.splitlines(), start=1):
        columns = line.split()
        if not columns:
            end_sentence()
            continue
        if columns[0] == DOCSTART:
            end_sentence()
            continue
        if len(columns) < needed_columns:
            raise DataError(
                f"{path}:{line_number}: malformed line {line.strip()!r}: {len(columns)} column(s), but "
                f"the word is read from column {word_column} and the tag from column {tag_column}, which "
                f"needs at least {needed_columns}. Each line must be `WORD ... TAG` separated by whitespace, "
                "with a blank line between sentences; fix the line or set the word/tag columns in [data]."
            )
        if column_count is None:
            column_count, first_word_line = len(columns), line_number
        elif len(columns) != column_count:
            raise DataError(
                f"{path}:{line_number}: malformed line {line.strip()!r}: {len(columns)} columns, but line "
                f"{first_word_line} has {column_count}. A word containing a space or a missing/extra column "
                "shifts the tag column; every word line needs the same columns (no spaces inside a word)."
            )
        words.append(columns[word_column])
        tags.append(columns[tag_column])
    end_sentence()

    if not records:
        raise DataError(
            f"{path}: no sentences found; a CoNLL file has one `WORD ... TAG` line per word and a "
            "blank line between sentences."
        )
    return records
