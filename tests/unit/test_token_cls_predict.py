"""token_cls.predict: entity offsets that slice the input exactly, windows, and agreement with evaluation."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from peftkit.errors import DataError
from peftkit.tasks.base import TaskContext
from peftkit.tasks.token_cls import TokenClsConfig, postprocess, predict, preprocess

LABELS = ("O", "B-LOC", "I-LOC", "B-PER", "I-PER")
TEXT = "  Yesterday, Hans-Peter Müller flew from New York to São Paulo.\u200b Really!\tRÉSUMÉ: «Zürich»…  "


@pytest.fixture(scope="module")
def tokenizer(tiny_bert_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert_dir)


def tiny_tagger(tiny_bert_dir: Path, favour: str | None = None) -> Any:
    """The tiny random BERT with a token-classification head; ``favour`` makes every word that tag."""
    import torch
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_pretrained(
        tiny_bert_dir,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
        dtype=torch.float32,
    )
    if favour is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.zero_()
            model.classifier.bias[LABELS.index(favour)] = 5.0
    return model


def lookup_tagger(tokenizer: Any, tags_by_token: dict[str, str]) -> Any:
    """A stand-in model whose logits depend only on the token: 5.0 for the tag listed for it (else O)."""
    import torch

    table = torch.zeros(tokenizer.vocab_size, len(LABELS))
    table[:, 0] = 5.0
    for token, tag in tags_by_token.items():
        token_id = tokenizer.convert_tokens_to_ids(token)
        table[token_id] = 0.0
        table[token_id, LABELS.index(tag)] = 5.0

    class Lookup(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.nn.Parameter(table, requires_grad=False)

        def forward(self, input_ids: Any, **_: Any) -> Any:
            return SimpleNamespace(logits=self.table[input_ids])

    return Lookup()


LOOKUP = {
    "hans": "B-PER",
    "muller": "I-PER",
    "new": "B-LOC",
    "york": "I-LOC",
    "sao": "B-LOC",
    "paulo": "I-LOC",
}


def ctx_for(tokenizer: Any, **cfg: Any) -> TaskContext:
    return TaskContext(cfg=TokenClsConfig(**cfg), tokenizer=tokenizer, labels=LABELS)


def test_entity_offsets_slice_the_raw_text_exactly(tiny_bert_dir: Path, tokenizer: Any) -> None:
    model = tiny_tagger(tiny_bert_dir, favour="B-PER")  # every visible word becomes a one-word entity
    (result,) = predict(model, ctx_for(tokenizer), [{"text": TEXT}])
    words = result["words"]
    assert "Hans-Peter" in words and "«" in words and "\u200b" in words
    assert len(result["prediction"]) == len(words)
    assert result["prediction"][words.index("\u200b")] == "O"  # no token: the fallback tag
    assert len(result["entities"]) == len(words) - 1
    for entity in result["entities"]:
        assert TEXT[entity["start"] : entity["end"]] == entity["text"]
        assert entity["text"] == " ".join(words[entity["word_start"] : entity["word_end"]])
        assert entity["entity"] == "PER" and 0.0 < entity["score"] <= 1.0


def test_multi_word_entities_their_spans_and_scores(tokenizer: Any) -> None:
    model = lookup_tagger(tokenizer, LOOKUP)
    (result,) = predict(model, ctx_for(tokenizer), [{"text": TEXT}])
    top = math.exp(5.0) / (math.exp(5.0) + len(LABELS) - 1)
    assert [(e["entity"], e["text"]) for e in result["entities"]] == [
        ("PER", "Hans-Peter Müller"),
        ("LOC", "New York"),
        ("LOC", "São Paulo"),
    ]
    for entity in result["entities"]:
        assert entity["start"] == TEXT.index(entity["text"])
        assert entity["end"] == entity["start"] + len(entity["text"])
        assert entity["score"] == pytest.approx(top)


def test_token_records_get_offsets_into_the_words_joined_by_spaces(tokenizer: Any) -> None:
    words = ["Flights", "from", "New", "York", "to", "São", "Paulo"]
    (result,) = predict(lookup_tagger(tokenizer, LOOKUP), ctx_for(tokenizer), [{"tokens": words}])
    assert result["prediction"] == ["O", "O", "B-LOC", "I-LOC", "O", "B-LOC", "I-LOC"]
    joined = " ".join(words)
    assert [(e["start"], e["end"], e["word_start"], e["word_end"]) for e in result["entities"]] == [
        (13, 21, 2, 4),
        (25, 34, 5, 7),
    ]
    assert all(joined[e["start"] : e["end"]] == e["text"] for e in result["entities"])


def test_windows_predict_every_word_like_one_long_input(tokenizer: Any) -> None:
    model = lookup_tagger(tokenizer, LOOKUP)
    records = [{"text": TEXT * 3}, {"text": "Back in New York."}]
    whole = predict(model, ctx_for(tokenizer, max_length=256), records)
    windowed = predict(model, ctx_for(tokenizer, max_length=12, long_inputs="window", stride=4), records)
    assert windowed == whole
    assert len(whole[0]["entities"]) == 9
    truncated = predict(model, ctx_for(tokenizer, max_length=12), records)
    # 10 word pieces fit: [CLS] yesterday , hans - peter muller flew from new york [SEP]
    assert truncated[0]["prediction"][:8] == whole[0]["prediction"][:8]
    assert [e["text"] for e in truncated[0]["entities"]] == ["Hans-Peter Müller", "New York"]
    assert len(truncated[0]["prediction"]) == len(whole[0]["prediction"])
    assert set(truncated[0]["prediction"][8:]) == {"O"}  # cut words: the fallback tag
    assert truncated[1] == whole[1]


def test_predict_agrees_with_evaluation_postprocess(tiny_bert_dir: Path, tokenizer: Any) -> None:
    """A reloaded run reproduces the training run's test predictions: the two paths decode alike."""
    import numpy as np
    import torch

    model = tiny_tagger(tiny_bert_dir)
    with torch.no_grad():
        model.classifier.weight.mul_(50.0)  # spread the random logits so several tags occur
    sentences = [TEXT.split(), ["Back", "in", "New", "York", "."], ["Zürichsee"] * 40]
    ctx = ctx_for(tokenizer, max_length=16, long_inputs="window", stride=4, predict_batch_size=3)
    batch = {"tokens": sentences, "tags": [["O"] * len(words) for words in sentences]}
    features = preprocess(batch, ctx, False)
    collated = ctx.tokenizer.pad({"input_ids": features["input_ids"]}, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=collated["input_ids"], attention_mask=collated["attention_mask"]).logits
    eval_prediction = SimpleNamespace(predictions=np.asarray(logits), label_ids=None)
    predictions, _ = postprocess(batch, features["input_ids"], eval_prediction, ctx)
    predicted = predict(model, ctx, [{"tokens": words} for words in sentences])
    assert [r["prediction"] for r in predicted] == predictions
    assert len({tag for tags in predictions for tag in tags}) > 2


def test_records_without_words_are_refused(tokenizer: Any) -> None:
    model = lookup_tagger(tokenizer, LOOKUP)
    with pytest.raises(
        DataError, match=r"record 1: needs 'tokens' \(a list of words\) or 'text'.*\['sentence'\]"
    ):
        predict(model, ctx_for(tokenizer), [{"text": "ok"}, {"sentence": "Hello"}])
    with pytest.raises(DataError, match=r"record 0: 'tokens' must be a list of words"):
        predict(model, ctx_for(tokenizer), [{"tokens": "New York"}])
