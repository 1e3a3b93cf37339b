"""Multi-turn chat labelling: the loss is on every assistant turn (content and end-of-turn token) and on
nothing else, checked token by token against SmolLM2's real template and a hand-written one."""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

import pytest

from peftkit.errors import DataError, PeftkitError
from peftkit.tasks import chat
from peftkit.tasks.base import TaskContext
from peftkit.tasks.seq2seq import IGNORE_INDEX, Seq2SeqConfig, preprocess
from tests import conftest

CONVERSATION = [
    {"role": "system", "content": "You translate English to Spanish."},
    {"role": "user", "content": "Translate into Spanish: The cat sleeps."},
    {"role": "assistant", "content": "El gato duerme."},
    {"role": "user", "content": "And this one: I like bread."},
    {"role": "assistant", "content": "Me gusta el pan."},
    {"role": "user", "content": "Next: Where is the station?"},
    {"role": "assistant", "content": "¿Dónde está la estación?"},
]

# The hand-written template: role headers and end markers are MiniLM [unused] tokens registered as special.
TOY_TEMPLATE = (
    "{% for m in messages %}[unused0]{{ m['role'] }}: {{ m['content'] }}[unused1] {% endfor %}"
    "{% if add_generation_prompt %}[unused0]assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    return conftest.smollm2_tokenizer()


@pytest.fixture(scope="module")
def toy_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from tests.conftest import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.add_tokens(["[unused0]", "[unused1]"], special_tokens=True)
    tokenizer.chat_template = TOY_TEMPLATE
    return tokenizer


def expected_mask(text: str, offsets: list[tuple[int, int]], turn: re.Pattern[str], end: str) -> list[bool]:
    """Which tokens should carry loss, found independently of peftkit: a regex over the rendered text marks
    each assistant turn's content and the end marker right after it."""
    wanted: list[tuple[int, int]] = []
    for match in turn.finditer(text):
        if match.group("role") == "assistant":
            lo = match.start("content")
            wanted.append((lo, match.end("content") + len(end)))
    return [any(lo <= s < hi for lo, hi in wanted) and e > s for s, e in offsets]


def check_labels(tokenizer: Any, turns: list[dict[str, str]], turn: re.Pattern[str], end: str) -> None:
    encoded = chat.encode(tokenizer, turns)
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    tokens = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert encoded.input_ids == list(tokens["input_ids"])
    mask = expected_mask(text, tokens["offset_mapping"], turn, end)
    for k, (token_id, label) in enumerate(zip(encoded.input_ids, encoded.labels, strict=True)):
        piece = tokenizer.decode([token_id])
        if mask[k]:
            assert label == token_id, f"assistant token {k} {piece!r} carries no loss"
        else:
            assert label == IGNORE_INDEX, f"non-assistant token {k} {piece!r} carries loss"
    learned = tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])
    replies = [t["content"] for t in turns if t["role"] == "assistant"]
    expected = "".join(r + end for r in replies)
    # compared through the tokenizer's own normalisation (MiniLM lower-cases and strips accents)
    expected = tokenizer.decode(tokenizer(expected, add_special_tokens=False)["input_ids"])
    assert learned.replace(" ", "") == expected.replace(" ", "")
    assert sum(mask) == sum(label != IGNORE_INDEX for label in encoded.labels) > 0


SMOL_TURN = re.compile(r"<\|im_start\|>(?P<role>\w+)\n(?P<content>.*?)<\|im_end\|>", re.S)


def test_smollm2_template_loss_on_assistant_turns_only(smollm2_tokenizer: Any) -> None:
    check_labels(smollm2_tokenizer, CONVERSATION, SMOL_TURN, "<|im_end|>")
    # without a system turn the template inserts its own default one: it carries no loss either
    check_labels(smollm2_tokenizer, CONVERSATION[1:], SMOL_TURN, "<|im_end|>")
    assert chat.end_of_turn_id(smollm2_tokenizer) == smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_handwritten_template_loss_on_assistant_turns_only(toy_tokenizer: Any) -> None:
    turn = re.compile(r"\[unused0\](?P<role>\w+): (?P<content>.*?)\[unused1\]", re.S)
    check_labels(toy_tokenizer, CONVERSATION, turn, "[unused1]")
    assert chat.end_of_turn_id(toy_tokenizer) == toy_tokenizer.convert_tokens_to_ids("[unused1]")


def test_a_planted_label_is_caught(toy_tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker fails when a user token is labelled: it can fail."""
    real = chat.encode

    def leaky(tokenizer: Any, turns: list[dict[str, str]]) -> chat.Encoded:
        out = real(tokenizer, turns)
        labels = list(out.labels)
        labels[3] = out.input_ids[3]
        return chat.Encoded(out.input_ids, labels, out.last_turn, 0)

    monkeypatch.setattr(chat, "encode", leaky)
    turn = re.compile(r"\[unused0\](?P<role>\w+): (?P<content>.*?)\[unused1\]", re.S)
    with pytest.raises(AssertionError, match="non-assistant token 3"):
        check_labels(toy_tokenizer, CONVERSATION, turn, "[unused1]")


def context(tokenizer: Any, **task: Any) -> TaskContext:
    from tests.unit.test_seq2seq import llama_config

    cfg = Seq2SeqConfig(chat=True, **task)
    return TaskContext(cfg=cfg, tokenizer=tokenizer, labels=None, model_config=llama_config())


def test_features_train_and_eval(toy_tokenizer: Any) -> None:
    ctx = context(toy_tokenizer, max_source_length=200, max_target_length=20)
    train = preprocess({"messages": [CONVERSATION]}, ctx, train=True)
    encoded = chat.encode(toy_tokenizer, CONVERSATION)
    assert train["input_ids"] == [encoded.input_ids] and train["labels"] == [encoded.labels]
    evaluation = preprocess({"messages": [CONVERSATION]}, ctx, train=False)
    prompt = chat.generation_prompt(toy_tokenizer, CONVERSATION)
    assert evaluation["input_ids"] == [prompt]  # ends with the assistant header, the last reply left out
    assert toy_tokenizer.decode(evaluation["labels"][0]).replace(" ", "") == "¿dondeestalaestacion?[unused1]"


def test_long_conversations_lose_oldest_exchanges(
    toy_tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    whole = len(chat.encode(toy_tokenizer, CONVERSATION).input_ids)
    last_two = [CONVERSATION[0], *CONVERSATION[3:]]
    budget = len(chat.encode(toy_tokenizer, last_two).input_ids)
    assert budget < whole
    ctx = context(toy_tokenizer, max_source_length=budget - 2, max_target_length=2)
    with caplog.at_level(logging.WARNING):
        out = preprocess({"messages": [CONVERSATION]}, ctx, train=True)
    assert out["input_ids"] == [chat.encode(toy_tokenizer, last_two).input_ids]
    assert "1 lost their oldest exchanges, 0 were skipped" in caplog.text
    tiny = context(toy_tokenizer, max_source_length=3, max_target_length=2)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert preprocess({"messages": [CONVERSATION]}, tiny, train=True)["input_ids"] == []
    assert "0 lost their oldest exchanges, 1 were skipped" in caplog.text
    # evaluation keeps every conversation (its prompt is generated from as it is)
    assert len(preprocess({"messages": [CONVERSATION]}, tiny, train=False)["input_ids"]) == 1


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([], "non-empty list"),
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        ([{"role": "bot", "content": "hi"}], "role 'bot'"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], "content is empty"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only come first"),
        ([*CONVERSATION[1:3], {"role": "user", "content": "c"}], "ends with a user turn"),
    ],
)  # fmt: skip
def test_bad_conversations_are_named(toy_tokenizer: Any, messages: list[Any], needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        preprocess({"messages": [messages]}, context(toy_tokenizer), train=True)


def test_prefix_unstable_template_refused(toy_tokenizer: Any) -> None:
    tokenizer = copy.deepcopy(toy_tokenizer)
    # drops earlier assistant turns once a later one exists (as reasoning-hiding templates do)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}[unused0]{{ m['role'] }}: "
        "{{ m['content'] }}[unused1] {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}[unused0]assistant: {% endif %}"
    )
    with pytest.raises(PeftkitError, match="renders an earlier turn differently"):
        chat.encode(tokenizer, CONVERSATION)


def test_chat_config_rules() -> None:
    with pytest.raises(ValueError, match="remove prompt_template"):
        Seq2SeqConfig(chat=True, prompt_template="x {source}")
    with pytest.raises(ValueError, match="needs the chat template"):
        Seq2SeqConfig(chat=True, use_chat_template=False)


def test_chat_on_an_encoder_decoder_is_refused(toy_tokenizer: Any) -> None:
    from tests.unit.test_seq2seq import t5_config

    ctx = TaskContext(
        cfg=Seq2SeqConfig(chat=True), tokenizer=toy_tokenizer, labels=None, model_config=t5_config()
    )
    with pytest.raises(PeftkitError, match="chat = true applies to decoder-only models"):
        preprocess({"messages": [CONVERSATION]}, ctx, train=True)
