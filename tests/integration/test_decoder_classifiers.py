"""Classification and tagging on a decoder-only base, through the CLI: a tiny random Llama with SmolLM2's real
byte-level BPE tokenizer, as ``AutoModelForSequenceClassification`` (last-token pooling, a ``score`` head) and
``AutoModelForTokenClassification``.

What is checked: the pad policy (a tokenizer without a pad token gets one, recorded in peftkit_run.json, and
the config's ``pad_token_id`` follows the tokenizer's), pooling on the last real token under right and left
padding (a batch predicts what each record predicts alone), the ``score`` head trained and saved in full, and
the predict / evaluate / merge / export round trips a BERT run has.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, invoke_cli, run_cli, save_tiny_smollm_llama
from tests.integration.test_merge_tasks import write_seq_cls_data

NER_DATA = REPO / "data" / "ner_fixture"

SEQ_CLS_RECIPE = """
[model]
name_or_path = "{model}"

[task]
type = "seq_cls"
max_length = 32

[data]
train_file = "{work}/train.csv"
validation_file = "{work}/validation.csv"
test_file = "{work}/test.csv"

[adapter]
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj"]

[train]
num_train_epochs = 3
per_device_train_batch_size = 8
per_device_eval_batch_size = 5      # batches of mixed lengths: padding on the model's side decides pooling
learning_rate = 2e-2
logging_steps = 2
report_to = []
output_dir = "{out}"
"""

TOKEN_CLS_RECIPE = """
[model]
name_or_path = "{model}"

[task]
type = "token_cls"
max_length = 64

[data]
dataset = "{data}"

[adapter]
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj"]

[train]
num_train_epochs = 2
per_device_train_batch_size = 8
learning_rate = 5e-3
report_to = []
output_dir = "{out}"
"""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def finetune(work: Path, recipe_text: str, **fields: Any) -> Path:
    recipe = work / "recipe.toml"
    recipe.write_text(recipe_text.format(work=work, out=work / "run", **fields))
    result = invoke_cli("finetune", str(recipe))
    assert result.exit_code == 0, result.output
    return work / "run"


@pytest.fixture(scope="module", params=["right", "left"])
def seq_cls_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seq_cls run on a tiny Llama whose tokenizer pads on ``right`` or ``left`` and has no pad token of
    its own, and whose config names another pad id than the one peftkit pads with."""
    work = tmp_path_factory.mktemp(f"llama-seq-cls-{request.param}")
    write_seq_cls_data(work)
    model = save_tiny_smollm_llama(
        work / "model", padding_side=request.param, without_pad_token=True, config_pad_token_id=7
    )
    return finetune(work, SEQ_CLS_RECIPE, model=model)


def test_pad_policy_is_recorded_and_the_config_pads_with_the_tokenizers_token(seq_cls_run: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(seq_cls_run)
    policy = json.loads((seq_cls_run / "peftkit_run.json").read_text())["pad_token"]
    assert policy["from"] == "eos" and policy["token"] == tokenizer.eos_token == tokenizer.pad_token
    assert policy["id"] == tokenizer.pad_token_id and policy["side"] == tokenizer.padding_side
    config = json.loads((seq_cls_run / "config.json").read_text())
    assert config["pad_token_id"] == tokenizer.pad_token_id != 7


def test_a_batch_predicts_what_each_record_predicts_alone(seq_cls_run: Path) -> None:
    """Pooling reads the last real token whichever side pads: texts of 2 to 6 words in one batch of 12 give
    the labels and probabilities each gives alone (a pooled pad position would not)."""
    work = seq_cls_run.parent
    records = work / "mixed.jsonl"
    texts = [line.rsplit(",", 1)[0] for line in (work / "test.csv").read_text().splitlines()[1:]]
    assert len({len(t.split()) for t in texts}) >= 3
    records.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    outputs = {}
    for size in ("12", "1"):
        out = work / f"batch-{size}.jsonl"
        result = invoke_cli(
            "predict", str(seq_cls_run), "--input", str(records), "--output", str(out), "--batch-size", size
        )
        assert result.exit_code == 0, result.output
        outputs[size] = read_jsonl(out)
    batched, alone = outputs["12"], outputs["1"]
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in alone]
    for b, a in zip(batched, alone, strict=True):
        assert b["scores"] == pytest.approx(a["scores"], abs=1e-5)
    assert len({r["prediction"] for r in alone}) == 2, "the tiny run should have learned both classes"


def test_score_head_is_trained_and_saved_in_full(seq_cls_run: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    tensors = load_file(seq_cls_run / "adapter_model.safetensors")
    heads = {name: t for name, t in tensors.items() if ".score." in name}
    assert list(heads) == ["base_model.model.score.weight"], sorted(tensors)
    assert heads["base_model.model.score.weight"].shape == (2, 64)
    # the head a fresh base gets (seeded like the run) is not what was saved: it trained
    fresh = AutoModelForSequenceClassification.from_pretrained(seq_cls_run.parent / "model", num_labels=2)
    assert not fresh.score.weight.detach().allclose(heads["base_model.model.score.weight"])


def test_fresh_process_predict_evaluate_merge_and_export(seq_cls_run: Path) -> None:
    work = seq_cls_run.parent
    saved = read_jsonl(seq_cls_run / "predictions_test.jsonl")
    result = run_cli(
        "predict", str(seq_cls_run), "--input", str(work / "test.csv"), "--output", str(work / "again.jsonl")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["prediction"] for r in read_jsonl(work / "again.jsonl")] == [r["prediction"] for r in saved]

    metrics = json.loads((seq_cls_run / "metrics.json").read_text())["test"]
    evaluated = invoke_cli("evaluate", str(seq_cls_run), "--split", "test")
    assert evaluated.exit_code == 0, evaluated.output
    assert f"accuracy={metrics['accuracy']:.4f}" in evaluated.output

    merged = invoke_cli("merge", str(seq_cls_run), "--out", str(work / "merged"))
    assert merged.exit_code == 0, merged.output
    report = json.loads((work / "merged" / "merge_report.json").read_text())
    assert report["status"] == "passed" and all(c["passed"] for c in report["verification"]["checks"])
    exported = invoke_cli("export", str(seq_cls_run), "--out", str(work / "bundle"))
    assert exported.exit_code == 0, exported.output

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "merged")
    model = AutoModelForSequenceClassification.from_pretrained(work / "merged").eval()
    texts = [line.rsplit(",", 1)[0] for line in (work / "test.csv").read_text().splitlines()[1:]]
    with torch.no_grad():
        logits = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits
    labels = [model.config.id2label[int(i)] for i in logits.argmax(-1)]
    assert labels == [r["prediction"] for r in saved]


@pytest.fixture(scope="module")
def token_cls_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("llama-token-cls")
    model = save_tiny_smollm_llama(work / "model")
    return finetune(work, TOKEN_CLS_RECIPE, model=model, data=NER_DATA)


def test_token_cls_on_a_llama_predicts_merges_and_saves_its_head(token_cls_run: Path) -> None:
    from safetensors.torch import load_file

    work = token_cls_run.parent
    tensors = load_file(token_cls_run / "adapter_model.safetensors")
    assert "base_model.model.score.weight" in tensors, sorted(tensors)
    saved = read_jsonl(token_cls_run / "predictions_test.jsonl")
    from peftkit.conll import read_conll

    gold = read_conll(NER_DATA / "test.conll")
    sentences = [{"tokens": r["tokens"]} for r in gold]
    assert len(sentences) == len(saved)
    words, out = work / "words.jsonl", work / "out.jsonl"
    words.write_text("".join(json.dumps(s) + "\n" for s in sentences))
    result = run_cli("predict", str(token_cls_run), "--input", str(words), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["prediction"] for r in read_jsonl(out)] == [r["prediction"] for r in saved]
    merged = invoke_cli("merge", str(token_cls_run), "--out", str(work / "merged"))
    assert merged.exit_code == 0, merged.output
    report = json.loads((work / "merged" / "merge_report.json").read_text())
    assert report["status"] == "passed" and all(c["passed"] for c in report["verification"]["checks"])


def test_words_are_tokenized_as_in_running_text() -> None:
    """A byte-level BPE tokenizer marks a word's leading space in its first piece ("Ġworld"): the words of
    a pre-split sentence get the pieces they have in the sentence as text, so a tagger sees what a causal
    LM was trained on."""
    from peftkit.tasks.token_cls import TokenClsConfig, encode_words
    from tests.conftest import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    words = ["Angela", "Merkel", "visited", "Paris", "in", "2019", "."]
    encoded = encode_words([words], tokenizer, TokenClsConfig(type="token_cls", max_length=64))
    window = encoded.windows[0]
    text = "Angela Merkel visited Paris in 2019 ."
    assert window.inputs["input_ids"] == tokenizer(text)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(window.inputs["input_ids"])
    ids = window.word_ids
    firsts = [pieces[i] for i, w in enumerate(ids) if w is not None and (i == 0 or ids[i - 1] != w)]
    assert len(firsts) == len(words) and all(p.startswith("Ġ") for p in firsts[1:])


def test_bf16_weights_and_bf16_autocast_train_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``[model] dtype = "bfloat16"`` with ``[train] bf16 = true`` on the CPU, through ``peftkit finetune``:
    every training forward of the Llama classifier runs on bfloat16 weights under CPU bf16 autocast, the run
    ends completed with a finite loss, the saved ``score`` head is bfloat16, and ``predict`` gives the saved
    test predictions again. (SmolLM2's step time and memory in bf16 against fp32: docs/memory.md.)"""
    import functools
    import math

    import torch
    import transformers
    from safetensors.torch import load_file

    seen: list[tuple[bool, torch.dtype, torch.dtype]] = []
    original = transformers.LlamaForSequenceClassification.forward

    @functools.wraps(original)  # the Trainer reads the forward's signature to keep the model's columns
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            seen.append(
                (
                    torch.is_autocast_enabled("cpu"),
                    torch.get_autocast_dtype("cpu"),
                    self.model.embed_tokens.weight.dtype,
                )
            )
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.LlamaForSequenceClassification, "forward", forward)
    write_seq_cls_data(tmp_path)
    model = save_tiny_smollm_llama(tmp_path / "model")
    text = SEQ_CLS_RECIPE.replace(
        'name_or_path = "{model}"\n', 'name_or_path = "{model}"\ndtype = "bfloat16"\n'
    )
    text = text.replace("[train]\n", "[train]\nbf16 = true\n")
    assert text.count("bfloat16") == 1 and text.count("bf16 = true") == 1
    run = finetune(tmp_path, text, model=model)

    assert seen and set(seen) == {(True, torch.bfloat16, torch.bfloat16)}, set(seen)
    assert json.loads((run / "peftkit_run.json").read_text())["status"] == "completed"
    assert math.isfinite(json.loads((run / "metrics.json").read_text())["train"]["train_loss"])
    tensors = load_file(run / "adapter_model.safetensors")
    assert tensors["base_model.model.score.weight"].dtype == torch.bfloat16
    saved = read_jsonl(run / "predictions_test.jsonl")
    again = tmp_path / "again.jsonl"
    result = invoke_cli("predict", str(run), "--input", str(tmp_path / "test.csv"), "--output", str(again))
    assert result.exit_code == 0, result.output
    assert [r["prediction"] for r in read_jsonl(again)] == [r["prediction"] for r in saved]
