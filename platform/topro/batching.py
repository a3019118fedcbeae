"""Length-bucketed dynamic batching under a token budget (Ray-free).

Examples of similar length go together so padding stays small; a batch holds
about ``max_examples`` examples (units) and at most ``max_tokens_per_batch`` padded tokens.

With several workers, a batch built here is a *global* micro-batch:
``split_batches`` gives each worker one slice of every batch, so one
optimizer step sees the same examples whatever the number of workers.
"""
from __future__ import annotations

import random
from typing import Sequence

EVALUATION_MAX_TOKENS_PER_BATCH = 8192
"""Padded tokens per forward of an evaluation (``topro evaluate``, a run's ``eval_langs``, the evaluation
actors) unless one is given; serving, which measured CPU passes, takes ``default_max_tokens_per_batch``."""
MAX_EXAMPLES = 256
"""Examples per forward of a prediction (evaluation and serving) unless one is given."""


def default_max_tokens_per_batch(device) -> int:
    """Padded tokens per forward pass for serving on ``device`` when none is given.

    On CPU a smaller pass is faster: 2048 tokens keep a pass's activations in
    cache, while at 8192 every pass page-faults its buffers in afresh
    (multilingual-e5-small ToPro, one thread: 4.6 against 3.7 sentences/s).
    An accelerator wants large passes.
    """
    return 2048 if str(device).startswith("cpu") else EVALUATION_MAX_TOKENS_PER_BATCH


def length_buckets(lengths: Sequence[int], width: float = 0.125, min_width: int = 8,
                   min_count: int = 8) -> list[list[int]]:
    """Indices grouped by similar length, shortest bucket first: a bucket spans
    lengths from its shortest ``s`` up to ``max(s + min_width, s * (1 + width))``,
    so padding inside a batch of one bucket stays small. A bucket also holds at
    least ``min_count`` examples (it grows past its span until it does, and a
    short last bucket joins the one before): a bucket of one or two long
    examples would make a batch too small to split over several workers
    (``split_batches`` skips those), so steps per epoch would depend on the
    number of workers."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets: list[list[int]] = []
    limit = -1
    for i in order:
        if not buckets or (lengths[i] > limit and len(buckets[-1]) >= min_count):
            buckets.append([])
            limit = max(lengths[i] + min_width, int(lengths[i] * (1 + width)))
        buckets[-1].append(i)
    if len(buckets) > 1 and len(buckets[-1]) < min_count:
        buckets[-2].extend(buckets.pop())
    return buckets


def _cut(group: list[int], length_of, size_of, max_tokens_per_batch: int, max_examples: int,
         balance: bool) -> list[list[int]]:
    """Cut ``group`` (in order) into batches within the budget. ``balance``: as
    many batches as a greedy cut needs, but of near-equal size, so a bucket's
    last batch is not a lone leftover."""
    def greedy(cap_of) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        longest = units = done = 0
        for i in group:
            new_longest = max(longest, length_of(i))
            size = size_of(i)
            # Past ``max_examples`` only by less than stopping short would leave: a row of many units
            # (a packed sentence) never splits, so a hard cap would leave batches well under it on average.
            # With units of 1 this is the plain cap.
            if current and (2 * units + size >= 2 * max_examples
                            or new_longest * (len(current) + 1) > max_tokens_per_batch
                            or done + units >= cap_of(len(batches))):
                batches.append(current)
                done += units
                current, new_longest, units = [], length_of(i), 0
            current.append(i)
            longest = new_longest
            units += size
        if current:
            batches.append(current)
        return batches

    batches = greedy(lambda k: float("inf"))
    if not balance or len(batches) < 2:
        return batches
    total, m = sum(size_of(i) for i in group), len(batches)
    # Close batch k once the units so far reach its share of the bucket.
    return greedy(lambda k: int((k + 1) * total / m + 0.5))


def token_budget_batches(lengths: Sequence[int], max_tokens_per_batch: int, max_examples: int,
                         shuffle: bool = False, seed: int = 0, sizes: Sequence[int] | None = None) -> list[list[int]]:
    """Index batches whose padded size (longest x count) fits ``max_tokens_per_batch``.

    Without ``shuffle``: examples in length order, each batch as large as fits
    (evaluation). With ``shuffle`` (training): examples are grouped into length
    buckets (``length_buckets``), shuffled within each bucket, cut into batches
    of near-equal size for the bucket's longest example, and the batch order is
    shuffled; so batches differ across epochs and seeds while staying
    length-homogeneous.
    ``sizes``: what each example counts towards ``max_examples`` (default 1;
    a packed ToPro row counts its questions); one example always fits, and a
    batch goes past ``max_examples`` when that takes it nearer to it than
    stopping would (a row is never split; a hard cap would leave packed
    batches a quarter short on average), so batches hold ``max_examples``
    units on average and an epoch takes as many steps as it would unpacked.
    ``max_tokens_per_batch`` stays a hard cap. The
    number of batches depends only on the (length, size) multiset, never on
    the seed (steps per epoch are known before the first epoch).
    """
    if max_tokens_per_batch < 1 or max_examples < 1:
        raise ValueError("max_tokens_per_batch and max_examples must be positive")
    size_of = (lambda i: sizes[i]) if sizes is not None else (lambda i: 1)
    rng = random.Random(seed)
    if shuffle:
        groups = length_buckets(lengths)
        for bucket in groups:
            rng.shuffle(bucket)
            bucket.sort(key=size_of)  # stable: shuffled within equal sizes
    else:
        groups = [sorted(range(len(lengths)), key=lambda i: (lengths[i], size_of(i)))]
    batches: list[list[int]] = []
    for group in groups:
        # A shuffled bucket is cut as if every example had the bucket's longest
        # length, so the cut depends on the bucket, not on the shuffle.
        bucket_longest = max(lengths[i] for i in group) if shuffle and group else 0
        batches.extend(_cut(group, lambda i: max(lengths[i], bucket_longest), size_of, max_tokens_per_batch,
                            max_examples, balance=shuffle))
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
    skipped: with training batches (buckets of at least 8 examples, cut into
    near-equal batches) that happens only where the token budget holds fewer
    examples per batch than there are workers.
    """
    if world_size <= 1:
        return batches
    return [batch[rank::world_size] for batch in batches if len(batch) >= world_size]
