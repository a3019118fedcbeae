"""Length-bucketed dynamic batching under a token budget (Ray-free).

Examples of similar length go together so padding stays small; a batch holds
at most ``max_examples`` examples and ``max_tokens`` padded tokens.

With several workers, a batch built here is a *global* micro-batch:
``split_batches`` gives each worker one slice of every batch, so one
optimizer step sees the same examples whatever the number of workers.
"""
from __future__ import annotations

import random
from typing import Sequence


def token_budget_batches(lengths: Sequence[int], max_tokens: int, max_examples: int,
                         shuffle: bool = False, seed: int = 0, sizes: Sequence[int] | None = None) -> list[list[int]]:
    """Index batches whose padded size (longest x count) fits ``max_tokens``.

    With ``shuffle``, lengths are bucketed after a random tie-break and the
    batch order is shuffled, so each epoch sees different neighbours.
    ``sizes``: what each example counts towards ``max_examples`` (default 1;
    a packed ToPro row counts its questions); one example always fits.
    """
    if max_tokens < 1 or max_examples < 1:
        raise ValueError("max_tokens and max_examples must be positive")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    # Stable: shuffled ties stay shuffled. Ties in length are ordered by size, so the number of
    # batches depends only on the (length, size) multiset, never on the epoch's shuffle.
    order.sort(key=lambda i: (lengths[i], sizes[i] if sizes is not None else 1))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    units = 0
    for i in order:
        new_longest = max(longest, lengths[i])
        size = sizes[i] if sizes is not None else 1
        if current and (units + size > max_examples or new_longest * (len(current) + 1) > max_tokens):
            batches.append(current)
            current, new_longest, units = [], lengths[i], 0
        current.append(i)
        longest = new_longest
        units += size
    if current:
        batches.append(current)
    if shuffle:
        rng.shuffle(batches)
    return batches


def shard_batches(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's share; every rank gets the same number of batches (collectives stay in step)."""
    if world_size <= 1:
        return batches
    usable = len(batches) - len(batches) % world_size
    if usable == 0:
        raise ValueError(f"{len(batches)} batches cannot be split over {world_size} workers; "
                         "use more data or a smaller batch")
    return batches[rank:usable:world_size]


def split_batches(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's slice of every global batch (interleaved, so slices have similar lengths and sizes).

    Every rank gets the same number of slices, none empty (collectives stay in
    step). A batch with fewer examples than workers cannot be split and is
    skipped: only the last batch of a length bucket can be that small, and
    only with more workers than its examples.
    """
    if world_size <= 1:
        return batches
    return [batch[rank::world_size] for batch in batches if len(batch) >= world_size]
