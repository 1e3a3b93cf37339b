"""Hostile inputs for extractive QA: answers the user reads back from ``peftkit predict``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, invoke_cli

# words that MiniLM's WordPiece cuts into pieces ("kerosene" is ke ##rose ##ne): a span of an untrained
# model starts or ends inside them more often than not
CONTEXTS = [
    "In 1902 the lighthouse lamp burned kerosene; paraffin replaced it after the Zarathustrian festival.",
    "Photosynthesis in cyanobacteria releases oxygen, unbelievably quickly, through chlorophyll pigments.",
    "The Kirkpatrick expedition catalogued sphagnum, lichens and xerophytes near Ushuaia in 1897.",
]


@pytest.mark.hostile("success")
def test_predicted_answers_are_whole_words(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Issue 19.7: "What fuel did the lamp use in 1902?" was answered "rosene"; every answer is now made
    of whole words of the context (the token span is widened to the words it cuts)."""
    recipe = tmp_path / "qa.toml"
    recipe.write_text(
        f"""
[model]
name_or_path = "{tiny_bert_dir}"

[task]
type = "qa"
max_length = 64
doc_stride = 16

[data]
dataset = "{REPO / "data" / "qa_fixture"}"

[adapter]
method = "lora"
r = 4
alpha = 8
target_modules = ["query", "value"]

[train]
output_dir = "{tmp_path / "run"}"
report_to = []
max_steps = 2
per_device_train_batch_size = 8
""",
        encoding="utf-8",
    )
    result = invoke_cli("finetune", str(recipe))
    assert result.exit_code == 0, result.output[-3000:]
    questions = ["What fuel did the lamp use in 1902?", "What releases oxygen?", "What was catalogued?"]
    records = [{"question": q, "context": c} for q in questions for c in CONTEXTS]
    inputs = tmp_path / "questions.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    output = tmp_path / "answers.jsonl"
    result = invoke_cli("predict", str(tmp_path / "run"), "--input", str(inputs), "--output", str(output))
    assert result.exit_code == 0, result.output[-3000:]
    answers = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert len(answers) == len(records)
    for record, answer in zip(records, answers, strict=True):
        text, start, end = answer["prediction"], answer["start"], answer["end"]
        context = record["context"]
        assert text and text == context[start:end]
        before = context[start - 1] if start else " "
        after = context[end] if end < len(context) else " "
        cut = (before.isalnum() and text[0].isalnum()) or (after.isalnum() and text[-1].isalnum())
        assert not cut, f"{text!r} cuts a word of {context!r}"
