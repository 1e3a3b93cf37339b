"""Generation metrics against values worked out by hand on small examples."""

from __future__ import annotations

import math

import pytest

from peftkit.metrics.generation import (
    chrf_score,
    decode_token_ids,
    generation_metrics,
    rouge_scores,
    sacrebleu_score,
)


def test_bleu_matches_hand_computed_ngram_precisions() -> None:
    # hypothesis "the cat sat on the mat", reference "the cat sat on a mat" (same length: no brevity penalty)
    # clipped n-gram precisions: 1-grams 5/6, 2-grams 3/5, 3-grams 2/4, 4-grams 1/3
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert sacrebleu_score(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(
        expected, abs=1e-6
    )


def test_bleu_brevity_penalty_and_corpus_pooling() -> None:
    # one exact 4-word match and one empty prediction: precisions all 1 (4/4, 3/3, 2/2, 1/1 over the corpus);
    # hypothesis length 4 vs reference length 8 -> BP = exp(1 - 8/4)
    score = sacrebleu_score(["a b c d", ""], ["a b c d", "e f g h"])
    assert score == pytest.approx(100 * math.exp(1 - 8 / 4), abs=1e-6)


def test_chrf_matches_hand_computed_character_ngrams() -> None:
    # "abc" vs "abd": char 1-grams P=R=2/3, 2-grams P=R=1/2, 3-grams P=R=0; 4..6-grams absent on both sides,
    # so they do not count. Average P = R = 7/18, and F-beta of equal P and R is that value.
    assert chrf_score(["abc"], ["abd"]) == pytest.approx(100 * 7 / 18, abs=1e-6)
    assert chrf_score(["same words"], ["same words"]) == pytest.approx(100.0)


def test_rouge_matches_hand_computed_f_measures() -> None:
    scores = rouge_scores(["the cat sat"], ["the cat ran"])
    # unigrams 2 of 3 on both sides; bigrams "the cat" 1 of 2; LCS "the cat" = 2 of 3
    assert scores["rouge1"] == pytest.approx(100 * 2 / 3)
    assert scores["rouge2"] == pytest.approx(50.0)
    assert scores["rougeL"] == pytest.approx(100 * 2 / 3)


def test_rouge_uses_stemming_and_averages_examples() -> None:
    # Porter stemming: "cats" -> "cat", "running" -> "run"; second example shares nothing
    scores = rouge_scores(["cats running", "alpha"], ["cat run", "beta"])
    assert scores["rouge1"] == pytest.approx(50.0)
    assert scores["rougeL"] == pytest.approx(50.0)


def test_generation_metrics_selects_and_reports_length() -> None:
    out = generation_metrics(["the cat sat on the mat"], ["the cat sat on a mat"], ["chrf", "sacrebleu"])
    assert set(out) == {"chrf", "sacrebleu", "gen_len"}
    assert out["gen_len"] == 6
    assert set(generation_metrics(["a"], ["a"], ["rouge"])) == {"rouge1", "rouge2", "rougeL", "gen_len"}
    assert generation_metrics([], [], ["chrf"]) == {}


def test_generation_metrics_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown generation metric\(s\) \['bleu'\]"):
        generation_metrics(["a"], ["a"], ["bleu"])
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        generation_metrics(["a", "b"], ["a"], ["chrf"])


class _FakeTokenizer:
    """Ids 0 = pad, 1 = eos, 2.. = words; enough to check decode_token_ids' handling of -100 and specials."""

    pad_token_id = 0
    eos_token_id = 1

    def batch_decode(self, rows: list[list[int]], skip_special_tokens: bool, **kwargs: object) -> list[str]:
        assert skip_special_tokens
        words = {2: "hola", 3: "mundo"}
        return [" ".join(words[i] for i in row if i in words) + " " for row in rows]


def test_decode_token_ids_maps_ignore_index_to_pad_and_strips() -> None:
    import numpy as np

    ids = np.array([[2, 3, 1, -100, -100], [3, 1, 0, 0, -100]])
    assert decode_token_ids(ids, _FakeTokenizer()) == ["hola mundo", "mundo"]
    assert decode_token_ids([2, 3], _FakeTokenizer()) == ["hola mundo"]


def test_decode_token_ids_with_a_real_tokenizer(minilm_tokenizer: object) -> None:
    tok = minilm_tokenizer
    ids = tok("hello world")["input_ids"] + [-100, -100]  # [CLS] hello world [SEP] -100 -100
    assert decode_token_ids([ids], tok) == ["hello world"]


@pytest.fixture(scope="module")
def minilm_tokenizer() -> object:
    from transformers import AutoTokenizer

    from tests.conftest import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())
