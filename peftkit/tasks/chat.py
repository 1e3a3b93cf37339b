"""Multi-turn conversations for decoder-only models: render with the tokenizer's chat template, label only
the assistant turns.

A record's ``messages`` is a list of ``{"role", "content"}`` turns (``system`` optional and first, then
``user`` and ``assistant`` turns). Training features are the whole conversation, with the loss on every
assistant turn's content and its end-of-turn token and on nothing else (system text, user text, the
template's headers and separators carry -100). Where each assistant turn starts and ends is found by
rendering the conversation up to that turn (``add_generation_prompt=True``) and through it: the difference
is the turn, whatever the template's markup. A template that renders an earlier turn differently once a
later turn exists (one that hides earlier reasoning, say) cannot be labelled this way and is refused.

Evaluation and ``predict`` generate the last assistant turn from the conversation before it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from peftkit.errors import DataError, PeftkitError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Encoded:
    """One conversation's tokens: ``labels`` carry the ids of assistant tokens and -100 elsewhere;
    ``last_turn`` is the index of the first token of the final assistant turn (the generation prompt ends
    there)."""

    input_ids: list[int]
    labels: list[int]
    last_turn: int
    dropped_turns: int


def check_messages(value: Any, where: str, *, needs_reply: bool) -> list[dict[str, str]]:
    """The conversation as plain ``{role, content}`` dicts, or a DataError naming ``where`` and the turn.

    ``needs_reply``: the conversation must end with an assistant turn (training and evaluation data).
    """
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or not value:
        raise DataError(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} turns, not {value!r:.80}"
        )
    turns: list[dict[str, str]] = []
    for i, turn in enumerate(value):
        if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
            raise DataError(f"{where}, turn {i}: {turn!r:.80} is not a {{role, content}} object")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise DataError(f"{where}, turn {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise DataError(f"{where}, turn {i}: a system turn may only come first")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}, turn {i} ({role}): the content is empty ({content!r:.40})")
        turns.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in turns) and needs_reply:
        raise DataError(f"{where}: the conversation has no assistant turn to learn or to score")
    if needs_reply and turns[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the conversation ends with a {turns[-1]['role']} turn; training and evaluation "
            "conversations end with the assistant's reply"
        )
    if not needs_reply and turns[-1]["role"] == "system":
        raise DataError(f"{where}: the conversation has only a system turn; add the user's message")
    return turns


def with_system(turns: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """``system_prompt`` as the first turn where the conversation has no system turn of its own."""
    if system_prompt is None or turns[0]["role"] == "system":
        return turns
    return [{"role": "system", "content": system_prompt}, *turns]


def _render(tokenizer: Any, turns: list[dict[str, str]], *, generation_prompt: bool) -> str:
    return str(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt))


def _special_texts(tokenizer: Any) -> list[str]:
    """Texts of the tokenizer's special tokens (end-of-turn markers are among them), longest first."""
    texts = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts |= {str(token) for token in decoder.values() if getattr(token, "special", False)}
    return sorted((t for t in texts if t), key=len, reverse=True)


def assistant_spans(tokenizer: Any, turns: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, per assistant turn, the character span that carries loss: from the
    start of its content through the end-of-turn token that follows it (the first special token after the
    content). Raises PeftkitError for a template this cannot label."""
    full = _render(tokenizer, turns, generation_prompt=False)
    specials = _special_texts(tokenizer)
    spans: list[tuple[int, int]] = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, turns[:i], generation_prompt=True) if i else ""
        through = _render(tokenizer, turns[: i + 1], generation_prompt=False)
        if not through.startswith(before) or not full.startswith(through):
            raise PeftkitError(
                "the tokenizer's chat template renders an earlier turn differently once later turns follow, "
                "so assistant turns cannot be told apart for the loss; use a template whose rendering of a "
                "conversation starts with the rendering of its first turns ([model] tokenizer or "
                "a chat_template in the tokenizer's folder)"
            )
        turn_text = through[len(before) :]
        content_at = turn_text.find(turn["content"])
        if content_at < 0:
            raise PeftkitError(
                "the chat template does not write an assistant turn's content verbatim, so its tokens "
                "cannot be labelled; use a template that writes {{ message['content'] }} as it is"
            )
        content_end = content_at + len(turn["content"])
        ends = [(turn_text.find(s, content_end), s) for s in specials]
        ends = [(at, s) for at, s in ends if at >= 0]
        if not ends:
            raise PeftkitError(
                "the chat template ends assistant turns with no special token, so the model could not "
                "learn where a reply stops; use a template with an end-of-turn token (e.g. <|im_end|>)"
            )
        at, token = min(ends, key=lambda pair: (pair[0], -len(pair[1])))
        spans.append((len(before) + content_at, len(before) + at + len(token)))
    return full, spans


def encode(tokenizer: Any, turns: list[dict[str, str]]) -> Encoded:
    """Token ids of the conversation and labels on its assistant spans only.

    A token carries loss when it starts inside an assistant span; offsets come from the fast tokenizer, so
    no text is re-tokenized piecewise (which could split tokens differently than the whole text does).
    """
    full, spans = assistant_spans(tokenizer, turns)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    span_of_token = [-1] * len(ids)
    for k, (start, end) in enumerate(encoded["offset_mapping"]):
        for s, (lo, hi) in enumerate(spans):
            if lo <= start < hi and end > start:
                labels[k] = ids[k]
                span_of_token[k] = s
                break
    last = len(spans) - 1
    if last < 0 or last not in span_of_token:
        return Encoded(ids, labels, len(ids), 0)
    return Encoded(ids, labels, span_of_token.index(last), 0)


def fit(tokenizer: Any, turns: list[dict[str, str]], budget: int, *, keep_long: bool) -> Encoded | None:
    """:func:`encode`, dropping the oldest exchanges (a user turn and the replies up to the next user turn,
    never part of one) until the conversation fits ``budget`` tokens; the system turn and the last exchange
    are always kept. A conversation whose last exchange alone is too long is skipped (None), unless
    ``keep_long`` (evaluation: the prompt is generated from as it is)."""
    system = turns[:1] if turns[0]["role"] == "system" else []
    rest = turns[len(system) :]
    dropped = 0
    while True:
        result = encode(tokenizer, system + rest)
        if len(result.input_ids) <= budget:
            return Encoded(result.input_ids, result.labels, result.last_turn, dropped)
        starts = [i for i, t in enumerate(rest) if t["role"] == "user" and i > 0]
        if not starts:
            return Encoded(result.input_ids, result.labels, result.last_turn, dropped) if keep_long else None
        dropped += starts[0]
        rest = rest[starts[0] :]


def generation_prompt(tokenizer: Any, turns: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation up to (not including) the last assistant turn, ending with the
    template's assistant header: what the model continues from."""
    context = turns[:-1] if turns[-1]["role"] == "assistant" else turns
    text = _render(tokenizer, context, generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def last_reply(turns: list[dict[str, str]]) -> str:
    """The reference: the final assistant turn's content."""
    return turns[-1]["content"] if turns[-1]["role"] == "assistant" else ""


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn in this template (generation stops there)."""
    probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    full, spans = assistant_spans(tokenizer, probe)
    ids = tokenizer(full[: spans[-1][1]], add_special_tokens=False)["input_ids"]
    return int(ids[-1])
