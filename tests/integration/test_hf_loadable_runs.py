"""A run directory loads the way a Hugging Face user loads it (issue 18), and travels.

Tiny runs of every task (the builders of test_merge_tasks.py). A fresh Python process that never imports
peftkit loads each run directory with ``AutoModelFor<Task>.from_pretrained(run_dir)`` (and ``pipeline()``
where transformers 5 has one for the task) and reproduces the run's ``predictions_test.jsonl`` with its label
names. QA: transformers' loader and peft's generic ``AutoPeftModel`` give the merged model's logits (peft's QA
wrapper would drop ``token_type_ids``). A copied run directory whose base folder is gone still predicts and
merges. A planted 1e-3 error in one merged weight fails the scale-aware merge check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import invoke_cli, save_tiny_bert
from tests.integration.test_merge_tasks import (
    NER_DATA,
    QA_DATA,
    SEQ2SEQ_DATA,
    _qa_run,
    _seq2seq_run,
    _token_cls_run,
    train_seq_cls,
)

CASES = ("seq_cls", "token_cls", "qa", "seq2seq_t5", "seq2seq_llama")


@pytest.fixture(scope="module")
def seq_cls_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run directory, its base folder): a tiny BERT of this module's own, so a test may hide it."""
    work = tmp_path_factory.mktemp("seq-cls")
    tiny = save_tiny_bert(work / "tiny-bert")
    return train_seq_cls(work / "seq_cls", tiny), tiny


@pytest.fixture(scope="module")
def hf_runs(seq_cls_run: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """case → run directory; "qa_merged" → the QA run merged."""
    from peftkit.merge import merge_run

    work = tmp_path_factory.mktemp("hf-runs")
    tiny = seq_cls_run[1]
    out = {
        "seq_cls": seq_cls_run[0],
        "token_cls": _token_cls_run(work / "token_cls", tiny),
        "qa": _qa_run(work / "qa", tiny),
        "seq2seq_t5": _seq2seq_run(work / "seq2seq_t5", "t5"),
        "seq2seq_llama": _seq2seq_run(work / "seq2seq_llama", "llama"),
    }
    out["qa_merged"] = merge_run(out["qa"], work / "qa-merged").out_dir
    return out


# The fresh process: transformers (and peft for the QA comparison), never peftkit.
FRESH_SCRIPT = r"""
import json, sys
import torch
from transformers import (AutoModelForCausalLM, AutoModelForQuestionAnswering, AutoModelForSeq2SeqLM,
                          AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer,
                          pipeline)

spec = json.load(open(sys.argv[1]))
out = {}

def saved(run):
    return [json.loads(line)["prediction"] for line in open(run + "/predictions_test.jsonl")]

def conll_sentences(path):
    sentences, words = [], []
    for line in open(path):
        line = line.strip()
        if not line or line.startswith("-DOCSTART-"):
            if words:
                sentences.append(words)
            words = []
            continue
        words.append(line.split()[0])
    if words:
        sentences.append(words)
    return sentences

run = spec["seq_cls"]["run"]
model = AutoModelForSequenceClassification.from_pretrained(run).eval()
tokenizer = AutoTokenizer.from_pretrained(run)
texts = spec["seq_cls"]["texts"]
with torch.no_grad():
    logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
out["seq_cls"] = {
    "auto": [model.config.id2label[i] for i in logits.argmax(-1).tolist()],
    "pipeline": [r["label"] for r in pipeline("text-classification", model=run)(texts)],
    "saved": saved(run), "class": type(model).__name__, "adapter_loaded": model._hf_peft_config_loaded,
    "model_max_length": tokenizer.model_max_length,
}

run = spec["token_cls"]["run"]
model = AutoModelForTokenClassification.from_pretrained(run).eval()
tokenizer = AutoTokenizer.from_pretrained(run)
predictions = []
for words in conll_sentences(spec["token_cls"]["test_file"]):
    encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        ids = model(**encoded).logits[0].argmax(-1).tolist()
    tags, seen = ["O"] * len(words), set()
    for position, word in enumerate(encoded.word_ids()):
        if word is not None and word not in seen:
            seen.add(word)
            tags[word] = model.config.id2label[ids[position]]
    predictions.append(tags)
ner = pipeline("token-classification", model=run)
out["token_cls"] = {
    "auto": predictions, "saved": saved(run), "class": type(model).__name__,
    "pipeline_labels": sorted({e["entity"] for r in ner(["Jane Austen wrote Pride and Prejudice in 1813 ."])
                               for e in r}),
    "id2label": model.config.id2label,
}

for case, cls in (("seq2seq_t5", AutoModelForSeq2SeqLM), ("seq2seq_llama", AutoModelForCausalLM)):
    item = spec[case]
    run = item["run"]
    model = cls.from_pretrained(run).eval()
    tokenizer = AutoTokenizer.from_pretrained(run)
    generated = []
    for source in item["sources"]:
        prompt = (item["prefix"] + source if item["encoder_decoder"]
                  else item["template"].format(source=source))
        if not item["encoder_decoder"] and tokenizer.chat_template:  # the run's chat format travels with it
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out.setdefault("chat_template_used", []).append(case)
        else:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            closers = {tokenizer.eos_token_id, tokenizer.sep_token_id}
            if not item["encoder_decoder"] and ids[0, -1].item() in closers:
                ids = ids[:, :-1]  # a prompt does not end as if the answer were over (peftkit's rule)
        with torch.no_grad():
            # max_new_tokens, greedy decoding and stop ids from the run's generation_config.json
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids))
        if not item["encoder_decoder"]:
            output = output[:, ids.shape[1]:]
        generated.append(tokenizer.decode(output[0], skip_special_tokens=True).strip())
    out[case] = {"auto": generated, "saved": [s.strip() for s in saved(run)], "class": type(model).__name__,
                 "max_new_tokens": model.generation_config.max_new_tokens}

item = spec["qa"]
run, merged = item["run"], item["merged"]
tokenizer = AutoTokenizer.from_pretrained(run)
encoded = tokenizer(item["questions"], item["contexts"], padding=True, truncation="only_second",
                    max_length=64, return_tensors="pt")
assert bool(encoded["token_type_ids"].any()), "the comparison needs real segment ids"
def qa_logits(model):
    with torch.no_grad():
        result = model.eval()(**encoded)
    return torch.cat([result.start_logits, result.end_logits], dim=-1)
reference = qa_logits(AutoModelForQuestionAnswering.from_pretrained(merged))
auto = AutoModelForQuestionAnswering.from_pretrained(run)
assert "peftkit" not in sys.modules
from peft import AutoPeftModel, AutoPeftModelForQuestionAnswering
out["qa"] = {
    "auto_model": float((qa_logits(auto) - reference).abs().max()),
    "auto_peft_model": float((qa_logits(AutoPeftModel.from_pretrained(run)) - reference).abs().max()),
    "auto_peft_qa": float(
        (qa_logits(AutoPeftModelForQuestionAnswering.from_pretrained(run)) - reference).abs().max()
    ),
    "class": type(auto).__name__,
}
assert "peftkit" not in sys.modules, "transformers and peft only"
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def fresh(hf_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("fresh")
    seq2seq = [json.loads(line) for line in (SEQ2SEQ_DATA / "test.jsonl").read_text().splitlines()]
    qa_rows = [json.loads(line) for line in (QA_DATA / "test.jsonl").read_text().splitlines()[:6]]
    seq_cls_lines = (hf_runs["seq_cls"].parent / "test.csv").read_text().splitlines()[1:]
    spec = {
        "seq_cls": {
            "run": str(hf_runs["seq_cls"]),
            "texts": [line.rsplit(",", 1)[0] for line in seq_cls_lines],
        },
        "token_cls": {"run": str(hf_runs["token_cls"]), "test_file": str(NER_DATA / "test.conll")},
        "seq2seq_t5": {
            "run": str(hf_runs["seq2seq_t5"]),
            "sources": [r["en"] for r in seq2seq],
            "encoder_decoder": True,
            "prefix": "translate English to Spanish: ",
        },
        "seq2seq_llama": {
            "run": str(hf_runs["seq2seq_llama"]),
            "sources": [r["en"] for r in seq2seq],
            "encoder_decoder": False,
            "template": "Spanish: {source}",
        },
        "qa": {
            "run": str(hf_runs["qa"]),
            "merged": str(hf_runs["qa_merged"]),
            "questions": [r["question"] for r in qa_rows],
            "contexts": [r["context"] for r in qa_rows],
        },
    }
    (work / "spec.json").write_text(json.dumps(spec))
    (work / "fresh.py").write_text(FRESH_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # peftkit is not importable there
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(work / "fresh.py"), str(work / "spec.json"), str(work / "out.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=work,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((work / "out.json").read_text())


def test_seq_cls_run_loads_in_auto_class_and_pipeline_with_labels(fresh: dict[str, Any]) -> None:
    record = fresh["seq_cls"]
    assert record["class"] == "BertForSequenceClassification" and record["adapter_loaded"]
    assert record["auto"] == record["saved"] and record["pipeline"] == record["saved"]
    assert set(record["saved"]) <= {"ham", "spam"}
    assert record["model_max_length"] == 32  # [task] max_length: pipeline(truncation=True) cuts there too


def test_token_cls_run_reproduces_word_tags(fresh: dict[str, Any]) -> None:
    record = fresh["token_cls"]
    assert record["class"] == "BertForTokenClassification"
    assert record["auto"] == record["saved"]
    assert set(record["id2label"].values()) >= {"O", "B-PER"}  # the run's tag names, not LABEL_<n>
    assert all(not label.startswith("LABEL_") for label in record["pipeline_labels"])


@pytest.mark.parametrize("case", ["seq2seq_t5", "seq2seq_llama"])
def test_seq2seq_run_reproduces_generations(case: str, fresh: dict[str, Any]) -> None:
    record = fresh[case]
    assert record["auto"] == record["saved"]
    assert record["max_new_tokens"] == 8  # [task] max_new_tokens travels in generation_config.json
    if case == "seq2seq_llama":  # the tiny Llama's tokenizer has a chat template; peftkit prompted through it
        assert case in fresh.get("chat_template_used", [])


def test_qa_run_equals_merged_model_through_transformers_and_autopeftmodel(fresh: dict[str, Any]) -> None:
    record = fresh["qa"]
    assert record["class"] == "BertForQuestionAnswering"
    assert record["auto_model"] <= 1e-4, record
    assert record["auto_peft_model"] <= 1e-4, record
    # peft's QA wrapper (PeftModelForQuestionAnswering) drops token_type_ids: the documented loaders avoid it
    assert record["auto_peft_qa"] > 1e-4, record


def test_adapter_config_lists_each_head_once(seq_cls_run: tuple[Path, Path]) -> None:
    run, tiny = seq_cls_run
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    meta = json.loads((run / "peftkit_run.json").read_text())
    assert meta["base_model"]["relative_to_run"] == os.path.relpath(tiny, run)


def test_a_copied_run_with_its_base_gone_still_predicts_and_merges(
    seq_cls_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """The base folder the run recorded is renamed away: the copy loads the base weights saved in it."""
    source, tiny = seq_cls_run
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(source, copy)
    records = tmp_path / "texts.txt"
    lines = (source.parent / "test.csv").read_text().splitlines()[1:]
    records.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    expected = [
        json.loads(line)["prediction"]
        for line in (source / "predictions_test.jsonl").read_text().splitlines()
    ]
    hidden = tiny.with_name(tiny.name + "-hidden")
    tiny.rename(hidden)
    try:
        result = invoke_cli(
            "predict", str(copy), "--input", str(records), "--output", str(tmp_path / "p.jsonl")
        )
        assert result.exit_code == 0, result.output
        got = [json.loads(line)["prediction"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
        assert got == expected
        merged = invoke_cli("merge", str(copy), "--out", str(tmp_path / "merged"))
        assert merged.exit_code == 0, merged.output
        assert json.loads((tmp_path / "merged" / "merge_report.json").read_text())["status"] == "passed"
    finally:
        hidden.rename(tiny)


def test_planted_weight_error_fails_the_merge_check(
    seq_cls_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1e-3 added to one weight of the merged model (before it is saved) is caught by the default limit."""
    import importlib

    import torch

    from peftkit.errors import MergeVerificationError

    merge_module = importlib.import_module("peftkit.merge")  # `peftkit.merge` the attribute is the function

    original = merge_module.drop_gguf_marker

    def plant(model: Any) -> None:
        original(model)
        with torch.no_grad():
            model.get_submodule("classifier").bias[0] += 1e-3

    monkeypatch.setattr(merge_module, "drop_gguf_marker", plant)
    with pytest.raises(MergeVerificationError, match="does not reproduce the adapter model"):
        merge_module.merge_run(seq_cls_run[0], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_without_base_weights_the_run_holds_the_adapter_only(seq_cls_run: tuple[Path, Path]) -> None:
    """``[train] save_base_weights = false``: no copy of the base in the run (adapter-sized, as for a large
    base), and the run still predicts through peftkit."""
    from peftkit import api
    from peftkit.recipe import load_recipe
    from peftkit.training import finetune

    run, _ = seq_cls_run
    work = run.parent
    text = (work / f"{run.name}.toml").read_text()
    text = text.replace("[train]\n", "[train]\nsave_base_weights = false\n", 1)
    text = text.replace(f'output_dir = "{run}"', f'output_dir = "{work / "adapter-only"}"')
    recipe = work / "adapter-only.toml"
    recipe.write_text(text)
    out = finetune(load_recipe(recipe)).run_dir
    assert (run / "model.safetensors").is_file()
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert api.predict(out, [{"text": "free prize now"}])[0]["prediction"] in ("ham", "spam")
