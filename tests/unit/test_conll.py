"""read_conll: sentences, columns, -DOCSTART-, and the errors that name file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.conll import read_conll
from peftkit.errors import DataError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ner"
NER_DATA = Path(__file__).resolve().parents[2] / "data" / "ner_fixture"


def test_reads_the_ner_fixture_sentence_by_sentence() -> None:
    records = read_conll(NER_DATA / "train.conll")
    assert len(records) == 40
    assert records[0] == {
        "tokens": ["Angela", "Merkel", "met", "Emmanuel", "Macron", "in", "Paris", "on", "Tuesday", "."],
        "tags": ["B-PER", "I-PER", "O", "B-PER", "I-PER", "O", "B-LOC", "O", "O", "O"],
    }
    assert all(len(r["tokens"]) == len(r["tags"]) for r in records)
    assert not any("-DOCSTART-" in r["tokens"] for r in records)
    assert len(read_conll(NER_DATA / "validation.conll")) == 10
    assert len(read_conll(NER_DATA / "test.conll")) == 10


def test_docstart_blank_runs_tabs_and_a_missing_final_blank_line(tmp_path: Path) -> None:
    path = tmp_path / "x.conll"
    path.write_text(
        "-DOCSTART- -X- O\n\n\nEU\tB-ORG\nrejects O\n\n\n \t \n-DOCSTART- O\nPeter B-PER\nBlackburn I-PER"
    )
    assert read_conll(path, tag_column=-1) == [
        {"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]},
        {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
    ]


def test_word_and_tag_columns_of_a_four_column_file(tmp_path: Path) -> None:
    path = tmp_path / "conll2003.txt"
    path.write_text("EU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B-MISC\n")
    assert read_conll(path) == [{"tokens": ["EU", "rejects", "German"], "tags": ["B-ORG", "O", "B-MISC"]}]
    assert read_conll(path, tag_column=1)[0]["tags"] == ["NNP", "VBZ", "JJ"]
    assert read_conll(path, word_column=1, tag_column=3)[0]["tokens"] == ["NNP", "VBZ", "JJ"]


def test_a_line_with_an_extra_column_names_file_line_and_fix() -> None:
    path = FIXTURES / "malformed.conll"
    with pytest.raises(DataError) as caught:
        read_conll(path)
    message = str(caught.value)
    assert f"{path}:6: malformed line 'New York B-LOC': 3 columns, but line 3 has 2" in message
    assert "no spaces inside a word" in message


def test_a_line_without_its_tag_names_file_line_and_fix() -> None:
    path = FIXTURES / "missing_tag.conll"
    with pytest.raises(DataError) as caught:
        read_conll(path)
    message = str(caught.value)
    assert f"{path}:6: malformed line 'York': 1 column(s)" in message
    assert "needs at least 2" in message and "`WORD ... TAG`" in message


def test_a_tag_column_beyond_the_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "two.conll"
    path.write_text("EU B-ORG\n")
    with pytest.raises(DataError, match=r"two\.conll:1: .*tag from column 3, which needs at least 4"):
        read_conll(path, tag_column=3)


def test_empty_missing_and_non_utf8_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.conll"
    empty.write_text("-DOCSTART- O\n\n")
    with pytest.raises(DataError, match=r"empty\.conll: no sentences found"):
        read_conll(empty)
    with pytest.raises(DataError, match=r"nowhere\.conll: CoNLL file not found"):
        read_conll(tmp_path / "nowhere.conll")
    latin = tmp_path / "latin.conll"
    latin.write_bytes("Paris B-LOC\n\nZ\u00fcrich B-LOC\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.conll:3: not valid UTF-8"):
        read_conll(latin)
