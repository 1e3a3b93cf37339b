"""A run directory loads the way a Hugging Face user loads it (issue 18), and travels.

Tiny runs of every task (the builders of test_merge_tasks.py). A fresh Python process that never imports
peftkit loads each run directory with ``AutoModelFor<Task>.from_pretrained(run_dir)`` (and ``pipeline()``
where transformers 5 has one for the task) and reproduces the run's ``predictions_test.jsonl`` with its label
names: NER entities through ``aggregation_strategy="first"``, QA answers by decoding the start/end logits with
the run's settings, the decoder-only model's generations through the text-generation pipeline and the saved
chat template, which carries the run's system prompt. QA: transformers' loader and peft's generic
``AutoPeftModel`` give the merged model's logits (peft's QA wrapper would drop ``token_type_ids``). A copied
run directory whose base folder is gone still predicts and merges. A planted 1e-3 error in one merged weight
fails the scale-aware merge check.
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
SYSTEM = (
    'Translate to "Spanish".'  # the tiny Llama run's system prompt (quotes: the template must escape them)
)


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
        "seq2seq_llama": _seq2seq_run(work / "seq2seq_llama", "llama", f"system_prompt = {SYSTEM!r}"),
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
def word_groups(words, tags):
    # the pipeline's grouping of word tags (aggregation "first"): a B- tag or another type starts a group;
    # groups of "O" are dropped. Returned as (type, first character, end character) of the joined text.
    groups, position = [], 0
    for word, tag in zip(words, tags):
        bi, kind = (tag[0], tag[2:]) if tag[:2] in ("B-", "I-") else ("I", tag)
        if groups and groups[-1][0] == kind and bi != "B":
            groups[-1][2] = position + len(word)
        else:
            groups.append([kind, position, position + len(word)])
        position += len(word) + 1
    return [g for g in groups if g[0] != "O"]

ner = pipeline("token-classification", model=run, aggregation_strategy="first")
sentences = conll_sentences(spec["token_cls"]["test_file"])
entities = ner([" ".join(words) for words in sentences])
out["token_cls"] = {
    "auto": predictions, "saved": saved(run), "class": type(model).__name__,
    "pipeline_groups": [[[e["entity_group"], e["start"], e["end"]] for e in found] for found in entities],
    "saved_groups": [word_groups(words, tags) for words, tags in zip(sentences, saved(run))],
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
    if not item["encoder_decoder"]:  # the pipeline, given the user turn only: the template adds the system
        pipe = pipeline("text-generation", model=run)
        replies = [pipe([{"role": "user", "content": item["template"].format(source=source)}])
                   for source in item["sources"]]
        out[case]["pipeline"] = [r[0]["generated_text"][-1]["content"].strip() for r in replies]
        out[case]["rendered"] = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)

def qa_answers(model, tokenizer, rows, settings):
    # the run's decoding (its [task] settings), written out with plain numpy: windows of max_length tokens
    # overlapping by doc_stride, the n-best starts and ends of the context, the lowest no-answer score
    import numpy as np
    answers = []
    for row in rows:
        encoded = tokenizer(row["question"].strip(), row["context"], truncation="only_second",
                            max_length=settings["max_length"], stride=settings["doc_stride"],
                            return_overflowing_tokens=True, return_offsets_mapping=True, padding=True,
                            return_tensors="pt")
        offsets = encoded.pop("offset_mapping").tolist()
        encoded.pop("overflow_to_sample_mapping")
        with torch.no_grad():
            output = model(**encoded)
        best, null = None, None
        for window in range(len(encoded["input_ids"])):
            length = int(encoded["attention_mask"][window].sum())
            starts = output.start_logits[window][:length].double().numpy()
            ends = output.end_logits[window][:length].double().numpy()
            cls = encoded["input_ids"][window].tolist().index(tokenizer.cls_token_id)
            null = min(null, starts[cls] + ends[cls]) if null is not None else starts[cls] + ends[cls]
            valid = np.array([s == 1 for s in encoded.sequence_ids(window)[:length]])
            top_starts = np.argsort(np.where(valid, starts, -np.inf))[::-1][:settings["n_best_size"]]
            top_ends = np.argsort(np.where(valid, ends, -np.inf))[::-1][:settings["n_best_size"]]
            top_starts, top_ends = top_starts[valid[top_starts]], top_ends[valid[top_ends]]
            scores = starts[top_starts][:, None] + ends[top_ends][None, :]
            spans = top_ends[None, :] - top_starts[:, None] + 1
            scores = np.where((spans >= 1) & (spans <= settings["max_answer_length"]), scores, -np.inf)
            i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
            if np.isfinite(scores[i, j]) and (best is None or scores[i, j] > best[0]):
                best = (scores[i, j], offsets[window][top_starts[i]][0], offsets[window][top_ends[j]][1])
        if best is None or (settings["version_2_with_negative"]
                            and null - best[0] > settings["null_score_diff_threshold"]):
            answers.append("")
            continue
        context, start, end = row["context"], best[1], best[2]
        while start < end and context[start].isspace():
            start += 1
        while end > start and context[end - 1].isspace():
            end -= 1
        while start > 0 and context[start].isalnum() and context[start - 1].isalnum():
            start -= 1  # whole words, as the run's answers (SQuAD scores whole words)
        while end < len(context) and context[end - 1].isalnum() and context[end].isalnum():
            end += 1
        answers.append(context[start:end])
    return answers

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
auto = AutoModelForQuestionAnswering.from_pretrained(run).eval()
assert "peftkit" not in sys.modules
import os
from peft import AutoPeftModel, AutoPeftModelForQuestionAnswering
# adapter_config.json names a local base relative to the run directory: peft resolves it from the cwd
os.chdir(run)
out["qa"] = {
    "auto_model": float((qa_logits(auto) - reference).abs().max()),
    "auto_peft_model": float((qa_logits(AutoPeftModel.from_pretrained(run)) - reference).abs().max()),
    "auto_peft_qa": float(
        (qa_logits(AutoPeftModelForQuestionAnswering.from_pretrained(run)) - reference).abs().max()
    ),
    "class": type(auto).__name__,
    "answers": qa_answers(auto, tokenizer, item["rows"], item["settings"]),
    "saved": saved(run),
}
assert "peftkit" not in sys.modules, "transformers and peft only"
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def fresh(hf_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("fresh")
    seq2seq = [json.loads(line) for line in (SEQ2SEQ_DATA / "test.jsonl").read_text().splitlines()]
    qa_rows = [json.loads(line) for line in (QA_DATA / "test.jsonl").read_text().splitlines()]
    qa_recipe = json.loads((hf_runs["qa"] / "peftkit_run.json").read_text())["recipe"]["task"]
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
            "questions": [r["question"] for r in qa_rows[:6]],
            "contexts": [r["context"] for r in qa_rows[:6]],
            "rows": qa_rows,
            "settings": qa_recipe,
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
    # the pipeline with the card's aggregation_strategy="first" groups exactly the saved word tags
    assert record["pipeline_groups"] == record["saved_groups"]
    assert any(record["saved_groups"]), "the comparison needs predicted entities"


@pytest.mark.parametrize("case", ["seq2seq_t5", "seq2seq_llama"])
def test_seq2seq_run_reproduces_generations(case: str, fresh: dict[str, Any]) -> None:
    record = fresh[case]
    assert record["auto"] == record["saved"]
    assert record["max_new_tokens"] == 8  # [task] max_new_tokens travels in generation_config.json
    if case == "seq2seq_llama":  # the tiny Llama's tokenizer has a chat template; peftkit prompted through it
        assert case in fresh.get("chat_template_used", [])
        assert record["pipeline"] == record["saved"]  # text-generation pipeline, user turns only
        # the run's system prompt, in the saved template, opens a conversation that has none
        assert record["rendered"].startswith(f"[unused0] {SYSTEM} [unused1][unused0] x [unused1]")


def test_qa_run_equals_merged_model_through_transformers_and_autopeftmodel(fresh: dict[str, Any]) -> None:
    record = fresh["qa"]
    assert record["class"] == "BertForQuestionAnswering"
    assert record["auto_model"] <= 1e-4, record
    assert record["auto_peft_model"] <= 1e-4, record
    # peft's QA wrapper (PeftModelForQuestionAnswering) drops token_type_ids: the documented loaders avoid it
    assert record["auto_peft_qa"] > 1e-4, record
    # the saved answers, decoded from AutoModelForQuestionAnswering(run_dir)'s logits with the run's settings
    assert record["answers"] == record["saved"]
    assert any(record["saved"]) and len(record["saved"]) == 19


def test_adapter_config_lists_each_head_once(seq_cls_run: tuple[Path, Path]) -> None:
    run, tiny = seq_cls_run
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    meta = json.loads((run / "peftkit_run.json").read_text())
    assert meta["base_model"]["relative_to_run"] == os.path.relpath(tiny, run)
    # a local base: no absolute path of this machine in the adapter's config, the folder seen from the run
    assert config["base_model_name_or_path"] == os.path.relpath(tiny, run)


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
        # peft onto a base the user passes (here the moved base folder) still loads the copy
        import torch
        from peft import PeftModel
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        base = AutoModelForSequenceClassification.from_pretrained(
            hidden, config=AutoConfig.from_pretrained(copy)
        )
        model = PeftModel.from_pretrained(base, copy).eval()
        tokenizer = AutoTokenizer.from_pretrained(copy)
        texts = [line.rsplit(",", 1)[0] for line in lines]
        with torch.no_grad():
            ids = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.argmax(-1).tolist()
        assert [model.config.id2label[i] for i in ids] == expected
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
    # its card shows PeftModel onto the base (here the local folder it recorded), and that snippet runs
    from tests.integration.test_cards import run_snippet, usage_snippet

    card = (out / "README.md").read_text()
    assert "PeftModel.from_pretrained(base" in usage_snippet(card) and "pipeline(" not in usage_snippet(card)
    result = run_snippet(out / "README.md", work)
    assert result.returncode == 0, result.stderr[-3000:]
