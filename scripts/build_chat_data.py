"""Build the multi-turn chat corpus ``data/tatoeba_chat`` from the Tatoeba English-Spanish pairs.

No real multi-turn corpus ships offline, so this one is derived from real data: consecutive pairs of each
split of ``data/tatoeba_en_es`` are grouped two or three to a conversation (the group size drawn with a
seeded generator), each pair becoming a user request to translate the English sentence and the assistant's
reply, the Spanish sentence as Tatoeba gives it. The first request of a conversation is phrased one of a
few ways, the later ones as follow-ups, so the model must read the conversation to know what is asked. Every
conversation opens with the same system turn. Splits stay apart (a test conversation only holds test pairs),
and each record keeps the Tatoeba attribution of its pairs.

    .venv/bin/python scripts/build_chat_data.py                 # writes data/tatoeba_chat/*.jsonl
    .venv/bin/python scripts/build_chat_data.py --source tests/fixtures/seq2seq --out /tmp/chat
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = "You are a translator. Translate each English sentence the user gives you into Spanish."
FIRST = (
    "Translate into Spanish: {en}",
    'How do you say "{en}" in Spanish?',
    "Spanish, please: {en}",
)
FOLLOW_UP = (
    "And this one: {en}",
    "Now this: {en}",
    "Next: {en}",
)
SPLITS = ("train", "validation", "test")


def conversations(pairs: list[dict[str, str]], rng: random.Random) -> list[dict[str, object]]:
    """Consecutive pairs grouped 2 or 3 to a conversation; a last lone pair joins the one before it."""
    out: list[dict[str, object]] = []
    i = 0
    while i < len(pairs):
        size = rng.choice((2, 3))
        group = pairs[i : i + size]
        i += size
        if len(group) == 1 and out:
            group = [*out.pop()["pairs"], *group]  # type: ignore[list-item]
        out.append({"pairs": group})
    records = []
    for item in out:
        group = item["pairs"]
        messages = [{"role": "system", "content": SYSTEM}]
        for k, pair in enumerate(group):  # type: ignore[arg-type]
            phrasing = rng.choice(FIRST if k == 0 else FOLLOW_UP)
            messages.append({"role": "user", "content": phrasing.format(en=pair["en"])})
            messages.append({"role": "assistant", "content": pair["es"]})
        records.append(
            {"messages": messages, "attribution": [pair.get("attribution", "") for pair in group]}  # type: ignore[union-attr]
        )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, default=Path("data/tatoeba_en_es"))
    parser.add_argument("--out", type=Path, default=Path("data/tatoeba_chat"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        rng = random.Random(f"{args.seed}-{split}")
        lines = (args.source / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        pairs = [json.loads(line) for line in lines if line.strip()]
        records = conversations(pairs, rng)
        tmp = args.out / f".{split}.jsonl.tmp"
        with tmp.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        tmp.replace(args.out / f"{split}.jsonl")
        turns = sum(len(r["messages"]) // 2 for r in records)  # type: ignore[arg-type]
        print(f"{split}: {len(pairs)} pairs -> {len(records)} conversations ({turns} assistant turns)")


if __name__ == "__main__":
    main()
