"""Multi-turn chat through the CLI on a tiny random Llama with a hand-written chat template: the corpus
builder → finetune (loss on assistant turns) → evaluate by generating the last reply → a fresh-process
``peftkit predict`` on ``messages`` records reproduces the saved test predictions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, REPO, run_cli

RECIPE = """
[model]
name_or_path = "{model}"

[task]
type = "seq2seq"
chat = true
system_prompt = "Translate."
max_source_length = 96
max_target_length = 16
max_new_tokens = 8
metrics = ["chrf", "sacrebleu"]

[data]
dataset = "{data}"

[adapter]
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj"]

[train]
num_train_epochs = 2
per_device_train_batch_size = 4
per_device_eval_batch_size = 4
learning_rate = 1e-3
logging_steps = 2
output_dir = "{out}"
"""


def save_chat_llama(folder: Path) -> Path:
    """tests/integration/test_seq2seq_cli.py's tiny Llama with a role-aware template whose end-of-turn
    marker is a special token other than EOS (so generation must stop at the template's marker)."""
    from transformers import AutoTokenizer

    from tests.integration.test_seq2seq_cli import save_tiny
    from tests.unit.test_chat import TOY_TEMPLATE

    save_tiny("llama", folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["[unused0]", "[unused1]"], special_tokens=True)
    tokenizer.chat_template = TOY_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("chat")
    data = work / "chat"
    built = subprocess.run(
        [sys.executable, str(REPO / "scripts/build_chat_data.py"), "--source", str(FIXTURES / "seq2seq"),
         "--out", str(data)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    model = save_chat_llama(work / "model")
    recipe = work / "recipe.toml"
    recipe.write_text(RECIPE.format(model=model, data=data, out=work / "run"))
    result = run_cli("finetune", str(recipe), cwd=work, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, work / "run"


def test_chat_run_scores_the_last_reply(trained: tuple[Path, Path]) -> None:
    work, run = trained
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"chrf", "sacrebleu", "loss"} <= set(metrics["test"])
    saved = [json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    conversations = [json.loads(line) for line in (work / "chat/test.jsonl").read_text().splitlines()]
    assert [s["reference"] for s in saved] == [c["messages"][-1]["content"] for c in conversations]


def test_predict_takes_messages_and_reproduces_test_predictions(trained: tuple[Path, Path]) -> None:
    work, run = trained
    lines = (work / "chat/test.jsonl").read_text().splitlines()
    records = work / "conversations.jsonl"
    records.write_text(
        "".join(json.dumps({"messages": json.loads(line)["messages"]}) + "\n" for line in lines)
    )
    out = work / "replies.jsonl"
    result = run_cli(
        "predict", str(run), "--input", str(records), "--output", str(out), cwd=work, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    saved = [
        json.loads(line)["prediction"] for line in (run / "predictions_test.jsonl").read_text().splitlines()
    ]
    assert predicted == saved and len(saved) == len(lines)
