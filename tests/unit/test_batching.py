"""Length-grouped batches: little padding, every example once, and no long-to-short drift."""

from __future__ import annotations

import itertools
import random

import torch

from peftkit.batching import ShuffledLengthGroupedSampler, length_grouped_batches, padding_fraction


def lengths(n: int = 1000, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(5, 120) for _ in range(n)]


def test_every_index_once_and_only_the_last_batch_short() -> None:
    lens = lengths(1003)
    batches = length_grouped_batches(lens, 16, generator=torch.Generator().manual_seed(0))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1003))
    assert all(len(b) == 16 for b in batches[:-1]) and len(batches[-1]) == 1003 % 16


def test_padding_is_far_below_random_batches() -> None:
    lens = lengths()
    grouped = length_grouped_batches(lens, 16, generator=torch.Generator().manual_seed(0))
    order = list(range(len(lens)))
    random.Random(0).shuffle(order)
    shuffled = [order[i : i + 16] for i in range(0, len(order), 16)]
    assert padding_fraction(lens, grouped) < 0.05
    assert padding_fraction(lens, shuffled) > 0.3


def test_batches_are_not_visited_long_to_short() -> None:
    """transformers' sampler walks each mega-batch from long to short; ours must not."""
    lens = lengths(4000)
    batches = length_grouped_batches(lens, 16, generator=torch.Generator().manual_seed(1))
    maxima = [max(lens[i] for i in b) for b in batches[:50]]
    descents = sum(a >= b for a, b in itertools.pairwise(maxima))
    assert 10 < descents < 40  # about half, not ~all


def test_sampler_is_seeded_by_torch() -> None:
    lens = lengths(200)
    torch.manual_seed(3)
    first = list(ShuffledLengthGroupedSampler(lens, 8))
    torch.manual_seed(3)
    assert list(ShuffledLengthGroupedSampler(lens, 8)) == first
    assert len(first) == 200
