"""[task] keys of every task, each shown by its effect on a run trained with ``peftkit.finetune``, or on
``peftkit evaluate`` / ``peftkit predict`` of a run whose stored [task] section has the key changed (the
adapter is the same, so any difference comes from the key)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FIXTURES, REPO
from tests.integration.key_effects_common import (
    count_forward_batches,
    evaluate_metrics,
    finetune_raw,
    predict_records,
    quick_train,
    read_json,
    read_jsonl,
    steps_trained,
    train_metrics,
    with_task,
    write_csv,
)

NER_DATA = REPO / "data" / "ner_fixture"
QA_DATA = REPO / "data" / "qa_fixture" / "v2"
SEQ2SEQ_DATA = FIXTURES / "seq2seq"

# --------------------------------------------------------------------------------------------------
# seq_cls


def seq_cls_raw(model: Path, **task: Any) -> dict[str, Any]:
    return {
        "model": {"name_or_path": str(model)},
        "task": {"type": "seq_cls", "max_length": 32, "label_list": ["spam", "ham"], **task},
        "data": {"train_file": "train.csv", "validation_file": "validation.csv"},
        "adapter": {"r": 4},
        "train": quick_train(),
    }


@pytest.fixture(scope="module")
def seq_cls_run(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("keys-seq-cls")
    write_csv(work / "train.csv", 24)
    write_csv(work / "validation.csv", 8, offset=1)
    return finetune_raw(seq_cls_raw(tiny_bert_dir), work)


def test_seq_cls_type_and_label_list_fix_the_head_and_its_label_order(seq_cls_run: Path) -> None:
    """task.type picks the task (labels.json, the classification head); label_list fixes the id order
    (sorted order, the default, would put 'ham' first)."""
    assert read_json(seq_cls_run / "labels.json") == {"labels": ["spam", "ham"], "task": "seq_cls"}
    assert read_json(seq_cls_run / "config.json")["id2label"] == {"0": "spam", "1": "ham"}
    assert read_json(seq_cls_run / "adapter_config.json")["task_type"] == "SEQ_CLS"


def test_seq_cls_class_weights_change_the_training_loss(seq_cls_run: Path, tiny_bert_dir: Path) -> None:
    """The same run with class_weights: same data, seed and steps, another (weighted) training loss."""
    raw = seq_cls_raw(tiny_bert_dir, class_weights=[1.0, 8.0])
    weighted = finetune_raw(raw, seq_cls_run.parent, "weighted")
    # seeded runs on one CPU: without the key, the same loss exactly
    assert abs(train_metrics(weighted)["train_loss"] - train_metrics(seq_cls_run)["train_loss"]) > 1e-6


def test_seq_cls_max_length_and_predict_batch_size_at_predict(
    seq_cls_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_length truncates what the model reads (long texts score differently when cut to 8 tokens);
    predict_batch_size is how many records each forward pass of ``peftkit predict`` takes."""
    from transformers import BertForSequenceClassification

    records = [
        {"text": f"win free prize cash claim now see you at home for dinner later {i}"} for i in range(5)
    ]
    full = predict_records(seq_cls_run, records, tmp_path / "full")
    short_run = with_task(seq_cls_run, tmp_path / "short", max_length=8, predict_batch_size=2)
    sizes = count_forward_batches(monkeypatch, BertForSequenceClassification)
    short = predict_records(short_run, records, tmp_path / "short-out")
    assert sizes == [2, 2, 1]
    assert [r["score"] for r in short] != pytest.approx([r["score"] for r in full], abs=1e-6)


# --------------------------------------------------------------------------------------------------
# token_cls


NER_LABELS = ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def ner_with_integer_tags(folder: Path) -> Path:
    """The NER fixture as JSON lines whose tags are ids into NER_LABELS (so label_list names them)."""
    from peftkit.conll import read_conll

    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        rows = read_conll(NER_DATA / f"{split}.conll")
        lines = [
            json.dumps({"tokens": r["tokens"], "tags": [NER_LABELS.index(t) for t in r["tags"]]})
            for r in rows
        ]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def token_cls_raw(model: Path, data: Path, **task: Any) -> dict[str, Any]:
    return {
        "model": {"name_or_path": str(model)},
        "task": {"type": "token_cls", "max_length": 16, "stride": 4, "label_list": NER_LABELS, **task},
        "data": {"dataset": str(data)},
        "adapter": {"r": 4, "target_modules": ["query", "value"]},
        "train": quick_train(),
    }


@pytest.fixture(scope="module")
def token_cls_runs(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("keys-token-cls")
    data = ner_with_integer_tags(work / "data")
    return {
        name: finetune_raw(token_cls_raw(tiny_bert_dir, data, **task), work, name)
        for name, task in (
            ("plain", {}),
            ("all-tokens", {"label_all_tokens": True}),
            ("weighted", {"class_weights": [0.2, *[3.0] * 8]}),
        )
    }


def test_token_cls_type_and_label_list_name_integer_tags(token_cls_runs: dict[str, Path]) -> None:
    run = token_cls_runs["plain"]
    assert read_json(run / "labels.json") == {"labels": NER_LABELS, "task": "token_cls"}
    predictions = read_jsonl(run / "predictions_validation.jsonl")
    assert predictions[0]["reference"][:2] == ["B-PER", "I-PER"]  # ids named by label_list
    assert all(tag in NER_LABELS for p in predictions for tag in p["prediction"])


def test_token_cls_label_all_tokens_and_class_weights_change_the_training_loss(
    token_cls_runs: dict[str, Path],
) -> None:
    """Same data, seed and steps: labelling continuation sub-tokens, or weighting the tags, trains on
    another loss."""
    plain = train_metrics(token_cls_runs["plain"])["train_loss"]
    for name in ("all-tokens", "weighted"):  # seeded runs on one CPU: without the key, the same loss exactly
        assert abs(train_metrics(token_cls_runs[name])["train_loss"] - plain) > 1e-6, name


def test_token_cls_long_inputs_stride_and_predict_batch_size_at_predict(
    token_cls_runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """long_inputs = "window" splits long sentences into windows (more rows per forward pass) and a larger
    stride makes more of them; predict_batch_size caps the windows per forward pass; max_length bounds
    every window."""
    from transformers import BertForTokenClassification

    run = token_cls_runs["plain"]
    words = (
        "Angela Merkel met Emmanuel Macron in Paris on Tuesday with the United Nations team " * 2
    ).split()
    records = [{"tokens": words}] * 3
    sizes = count_forward_batches(monkeypatch, BertForTokenClassification)
    rows = {}
    for name, task in (
        ("truncate", {}),
        ("window-1", {"long_inputs": "window", "stride": 1}),
        ("window-7", {"long_inputs": "window", "stride": 7}),
    ):
        sizes.clear()
        out = predict_records(with_task(run, tmp_path / name, **task), records, tmp_path / f"{name}-out")
        assert all(len(r["prediction"]) == len(words) for r in out)
        rows[name] = sum(sizes)
    assert rows["truncate"] == 3 < rows["window-1"] < rows["window-7"]
    sizes.clear()
    wider = with_task(run, tmp_path / "wider", long_inputs="window", stride=1, max_length=32)
    predict_records(wider, records, tmp_path / "wider-out")
    assert 3 <= sum(sizes) < rows["window-1"]  # longer windows: fewer of them
    sizes.clear()
    predict_records(with_task(run, tmp_path / "batched", predict_batch_size=2), records, tmp_path / "b-out")
    assert sizes == [2, 1]


def test_token_cls_scheme_none_scores_tags_not_entities(
    token_cls_runs: dict[str, Path], tmp_path: Path
) -> None:
    """scheme = "none": per-tag accuracy and macro F1 instead of entity precision/recall."""
    run = token_cls_runs["plain"]
    entities = evaluate_metrics(run)
    tags = evaluate_metrics(with_task(run, tmp_path / "none", scheme="none"))
    assert "precision" in entities and "recall" in entities
    assert "precision" not in tags and {"accuracy", "f1"} <= set(tags)


# --------------------------------------------------------------------------------------------------
# qa


@pytest.fixture(scope="module")
def qa_run(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("keys-qa")
    raw = {
        "model": {"name_or_path": str(tiny_bert_dir)},
        "task": {"type": "qa", "max_length": 64, "doc_stride": 16, "version_2_with_negative": True},
        "data": {"dataset": str(QA_DATA)},
        "adapter": {"r": 4, "target_modules": ["query", "value"]},
        "train": quick_train(max_steps=3, learning_rate=1e-3),
    }
    return finetune_raw(raw, work)


def qa_records() -> list[dict[str, Any]]:
    rows = read_jsonl(QA_DATA / "test.jsonl")
    return [{"question": r["question"], "context": r["context"]} for r in rows]


def test_qa_windows_follow_max_length_doc_stride_and_predict_batch_size(
    qa_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_length and doc_stride decide how many windows a context becomes; predict_batch_size how many
    windows each forward pass takes."""
    from transformers import BertForQuestionAnswering

    sizes = count_forward_batches(monkeypatch, BertForQuestionAnswering)
    windows = {}
    for name, task in (
        ("stored", {}),
        ("wider", {"max_length": 128}),
        ("more-overlap", {"doc_stride": 24}),
        ("batched", {"predict_batch_size": 5}),
    ):
        sizes.clear()
        predict_records(with_task(qa_run, tmp_path / name, **task), qa_records(), tmp_path / f"{name}-out")
        windows[name] = (sum(sizes), max(sizes))
    assert windows["wider"][0] < windows["stored"][0] < windows["more-overlap"][0]
    assert windows["batched"] == (windows["stored"][0], 5)


def test_qa_decoding_keys_change_the_answers(qa_run: Path, tmp_path: Path) -> None:
    """null_score_diff_threshold decides when '' wins (v2); max_answer_length bounds the spans; n_best_size
    how many starts and ends are searched."""
    records = qa_records()

    def answers(name: str, **task: Any) -> list[str]:
        out = predict_records(with_task(qa_run, tmp_path / name, **task), records, tmp_path / f"{name}-o")
        return [r["prediction"] for r in out]

    never_null = answers("never-null", null_score_diff_threshold=1e9)
    always_null = answers("always-null", null_score_diff_threshold=-1e9)
    assert all(a == "" for a in always_null) and all(a != "" for a in never_null)
    # v2 off: never '' (the version_2_with_negative switch itself)
    assert all(a != "" for a in answers("v1", version_2_with_negative=False))

    long_spans = answers("long", null_score_diff_threshold=1e9, max_answer_length=30)
    one_token = answers("one-token", null_score_diff_threshold=1e9, max_answer_length=1)
    assert max(len(a.split()) for a in long_spans) > 1
    assert all(len(a.split()) == 1 for a in one_token)
    narrow = answers("narrow", null_score_diff_threshold=1e9, n_best_size=1)
    assert narrow != long_spans


# --------------------------------------------------------------------------------------------------
# seq2seq


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (its tokenizer has a chat template) trained a few steps on the translation fixture."""
    from tests.integration.test_seq2seq_cli import save_tiny

    work = tmp_path_factory.mktemp("keys-seq2seq")
    model = save_tiny("llama", work / "model")
    raw = {
        "model": {"name_or_path": str(model)},
        "task": {
            "type": "seq2seq",
            "max_source_length": 16,
            "max_target_length": 16,
            "max_new_tokens": 8,
            "metrics": ["chrf", "sacrebleu", "rouge"],
        },
        "data": {"dataset": str(SEQ2SEQ_DATA), "columns": {"source": "en", "target": "es"}},
        "adapter": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "train": quick_train(learning_rate=1e-3, per_device_eval_batch_size=8),
    }
    return finetune_raw(raw, work)


def test_seq2seq_prompt_keys_change_what_the_model_reads(seq2seq_run: Path, tmp_path: Path) -> None:
    """Each prompt key changes the tokens of the prompt or the target, so the evaluation loss of the same
    adapter on the same split changes."""
    base = evaluate_metrics(seq2seq_run)
    assert {"chrf", "sacrebleu", "rouge1", "rougeL", "gen_len", "loss"} <= set(base)
    for name, task in (
        ("prefix", {"source_prefix": "translate to Spanish: "}),
        ("template", {"prompt_template": "Spanish for: {source}"}),
        ("no-chat", {"use_chat_template": False}),
        ("system", {"system_prompt": "You translate English to Spanish."}),
        ("short-source", {"max_source_length": 2}),
        ("short-target", {"max_target_length": 3}),
    ):
        changed = evaluate_metrics(with_task(seq2seq_run, tmp_path / name, **task))
        assert changed["loss"] != pytest.approx(base["loss"], rel=1e-4), name


def test_seq2seq_generation_keys(seq2seq_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """metrics picks the scores reported; max_new_tokens caps the generated length; num_beams reaches
    generation; predict_batch_size is the batch of each generate call in ``peftkit predict``."""
    from transformers import LlamaForCausalLM

    seen: list[tuple[int, int]] = []
    original = LlamaForCausalLM.generate

    def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        config = kwargs.get("generation_config") or self.generation_config
        seen.append((int(kwargs["input_ids"].shape[0]), int(config.num_beams)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", generate)
    only_chrf = evaluate_metrics(with_task(seq2seq_run, tmp_path / "chrf", metrics=["chrf"]))
    assert "chrf" in only_chrf and not {"sacrebleu", "rouge1", "rougeL"} & set(only_chrf)
    short = evaluate_metrics(with_task(seq2seq_run, tmp_path / "short", max_new_tokens=2))
    assert short["gen_len"] <= 2 < evaluate_metrics(seq2seq_run)["gen_len"]

    seen.clear()
    beams = with_task(seq2seq_run, tmp_path / "beams", num_beams=3, predict_batch_size=3)
    records = [{"source": r["en"]} for r in read_jsonl(SEQ2SEQ_DATA / "test.jsonl")[:7]]
    predict_records(beams, records, tmp_path / "beams-out")
    assert seen == [(3, 3), (3, 3), (1, 3)]
    seen.clear()
    predict_records(seq2seq_run, records, tmp_path / "stored-out")
    assert {b for _, b in seen} == {1} and [n for n, _ in seen] == [7]  # stored: greedy, batch of 16


def test_seq2seq_max_length_is_refused(tmp_path: Path) -> None:
    """seq2seq inherits max_length but limits source and target separately: setting it is refused with
    the keys to use instead (so it cannot silently do nothing)."""
    from peftkit.recipe import RecipeError, recipe_from_dict

    raw = {
        "model": {"name_or_path": "unused"},
        "task": {"type": "seq2seq", "max_length": 64},
        "data": {"dataset": str(SEQ2SEQ_DATA), "columns": {"source": "en", "target": "es"}},
    }
    with pytest.raises(RecipeError, match="max_source_length"):
        recipe_from_dict(raw, base_dir=tmp_path, check_files=False)


def test_every_task_type_runs_its_own_task(
    seq_cls_run: Path, token_cls_runs: dict[str, Path], qa_run: Path, seq2seq_run: Path
) -> None:
    """task.type of each task: the run records it, and each trains its own head."""
    assert read_json(seq_cls_run / "labels.json")["task"] == "seq_cls"
    assert read_json(token_cls_runs["plain"] / "labels.json")["task"] == "token_cls"
    assert read_json(qa_run / "labels.json")["task"] == "qa"
    assert "qa_outputs" in read_json(qa_run / "adapter_config.json")["modules_to_save"]
    assert read_json(seq2seq_run / "labels.json")["task"] == "seq2seq"
    assert read_json(seq2seq_run / "adapter_config.json")["task_type"] == "CAUSAL_LM"
    assert steps_trained(seq2seq_run) == 2
