"""seq2seq through the CLI on tiny random models: finetune → run directory → predict in a fresh process.

Tiny random models cannot translate; these tests check the path (files, metrics, reproducible predictions),
while tests/integration/test_seq2seq_train.py checks that the task learns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FIXTURES, invoke_cli, run_cli

DATA = FIXTURES / "seq2seq"

RECIPE = """
[model]
name_or_path = "{model}"
{model_extra}

[task]
type = "seq2seq"
{task}
max_source_length = 16
max_target_length = 16
max_new_tokens = 8
metrics = ["chrf", "sacrebleu", "rouge"]

[data]
dataset = "{data}"
columns = {{ source = "en", target = "es" }}

[adapter]
r = 4
alpha = 8
target_modules = {targets}

[train]
num_train_epochs = 2
per_device_train_batch_size = 8
per_device_eval_batch_size = 8
learning_rate = 1e-3
logging_steps = 2
output_dir = "{out}"
"""


def save_tiny(kind: str, folder: Path) -> Path:
    """A tiny random T5, Llama or BERT encoder (warm-started as both halves of an encoder-decoder) with
    MiniLM's tokenizer ([SEP] as EOS; a toy chat template for Llama)."""
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    from tests.conftest import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    ids = dict(pad_token_id=0, eos_token_id=tokenizer.sep_token_id)
    if kind == "t5":
        config: Any = T5Config(
            vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            decoder_start_token_id=0, **ids,
        )  # fmt: skip
        model: Any = T5ForConditionalGeneration(config)
    elif kind == "bert2bert":
        config = BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128,
        )  # fmt: skip
        model = BertModel(config)
    else:
        tokenizer.chat_template = (
            "{% for m in messages %}[unused0] {{ m['content'] }} [unused1]{% endfor %}"
            "{% if add_generation_prompt %}[unused2]{% endif %}"
        )
        config = LlamaConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=101,
            **ids,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


VARIANTS = {
    # [model] decoder_name_or_path warm-starts an EncoderDecoderModel from two encoder checkpoints
    "bert2bert": ('source_prefix = "spanish: "', '["query", "value"]'),
    "t5": ('source_prefix = "translate English to Spanish: "', '["q", "v"]'),
    "llama": ('prompt_template = "Spanish: {source}"', '["q_proj", "k_proj", "v_proj", "o_proj"]'),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    kind = request.param
    work = tmp_path_factory.mktemp(f"seq2seq-{kind}")
    model = save_tiny(kind, work / "model")
    task, targets = VARIANTS[kind]
    recipe = work / "recipe.toml"
    extra = f'decoder_name_or_path = "{model}"' if kind == "bert2bert" else ""
    recipe.write_text(
        RECIPE.format(model=model, model_extra=extra, task=task, data=DATA, targets=targets, out=work / "run")
    )
    result = run_cli("finetune", str(recipe), cwd=work, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, work / "run"


def test_run_directory_holds_adapter_metrics_and_predictions(trained: tuple[Path, Path]) -> None:
    _, run = trained
    assert (run / "adapter_model.safetensors").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert {"chrf", "sacrebleu", "rouge1", "rouge2", "rougeL", "gen_len", "loss"} <= set(metrics[split])
    saved = [json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    references = [json.loads(line)["es"] for line in (DATA / "test.jsonl").read_text().splitlines()]
    assert [s["reference"] for s in saved] == references  # scored against the raw texts
    assert all(isinstance(s["prediction"], str) for s in saved)


def test_predict_reproduces_test_predictions_in_a_fresh_process(trained: tuple[Path, Path]) -> None:
    work, run = trained
    records = work / "sources.jsonl"
    lines = (DATA / "test.jsonl").read_text().splitlines()
    records.write_text("".join(json.dumps({"en": json.loads(line)["en"]}) + "\n" for line in lines))
    out = work / "preds.jsonl"
    result = run_cli(
        "predict", str(run), "--input", str(records), "--output", str(out), cwd=work, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    saved = [
        json.loads(line)["prediction"] for line in (run / "predictions_test.jsonl").read_text().splitlines()
    ]
    assert predicted == saved


def test_text_input_is_one_source_a_line(trained: tuple[Path, Path]) -> None:
    """A .txt input gives one source a line (it failed before: its lines became `text`, not `source`)."""
    work, run = trained
    lines = (DATA / "test.jsonl").read_text().splitlines()
    (work / "sources.txt").write_text("".join(json.loads(line)["en"] + "\n" for line in lines))
    result = invoke_cli(
        "predict", str(run), "--input", str(work / "sources.txt"), "--output", str(work / "t.jsonl")
    )
    assert result.exit_code == 0, result.output
    predicted = [json.loads(line)["prediction"] for line in (work / "t.jsonl").read_text().splitlines()]
    saved = [
        json.loads(line)["prediction"] for line in (run / "predictions_test.jsonl").read_text().splitlines()
    ]
    assert predicted == saved


def test_prompt_template_without_placeholder_is_a_clear_recipe_error(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    text = RECIPE.format(
        model="unused", model_extra="", task='prompt_template = "Spanish:"', data=DATA, targets="[]", out="x"
    )
    recipe.write_text(text)
    result = run_cli("validate", str(recipe), cwd=tmp_path, timeout=600)
    assert result.returncode == 2
    assert "prompt_template" in result.stderr and "{source}" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_command_matches_training_metrics(trained: tuple[Path, Path]) -> None:
    work, run = trained
    result = run_cli("evaluate", str(run), "--split", "test", cwd=work, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((run / "metrics.json").read_text())["test"]
    assert f"chrf={saved['chrf']:.4f}" in result.stdout


def test_warm_start_trains_cross_attention_and_reloads_it(trained: tuple[Path, Path]) -> None:
    """For bert2bert the adapter carries the new cross-attention in full; the other variants have none."""
    from safetensors import safe_open

    work, run = trained
    with safe_open(str(run / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    crossattention = [n for n in names if ".crossattention." in n]
    if "decoder_name_or_path" in (work / "recipe.toml").read_text():
        assert any(n.endswith("crossattention.self.query.weight") for n in crossattention), names[:20]
    else:
        assert not crossattention


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[quantization]\nbits = 4\n", "model.decoder_name_or_path: cannot be combined with [quantization]"),
        ("", "model.decoder_name_or_path: warm-starts an encoder-decoder, which the 'seq_cls' task"),
    ],
)
def test_warm_start_refuses_impossible_combinations(tmp_path: Path, extra: str, message: str) -> None:
    text = RECIPE.format(
        model=tmp_path, model_extra=f'decoder_name_or_path = "{tmp_path}"', task="", data=DATA,
        targets='["query"]', out="x",
    )  # fmt: skip
    if not extra:  # the wrong task: a classification recipe with a decoder
        text = text.replace('type = "seq2seq"', 'type = "seq_cls"')
        text = "\n".join(line for line in text.splitlines() if not line.startswith(("max_", "metrics")))
    (tmp_path / "recipe.toml").write_text(text + extra)
    result = run_cli("validate", str(tmp_path / "recipe.toml"), cwd=tmp_path, timeout=600)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr.replace("\n  ", " "), result.stderr
    assert "Traceback" not in result.stderr
