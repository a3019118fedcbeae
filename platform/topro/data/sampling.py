"""Few-shot training sets: ``shots_per_label`` (Ray- and torch-free)."""
from __future__ import annotations

import random
from collections import Counter

from topro.config import ConfigError
from topro.data.readers import Sentence

FIELD = "shots_per_label"


def few_shot_sentences(sentences: list[Sentence], labels: list[str], shots: int, seed: int) -> list[Sentence]:
    """Sentences taken in a seeded shuffled order, each kept if it labels a word of a label in ``labels`` that
    still has fewer than ``shots`` words, until every label has at least ``shots``; returned in their
    original order. Refused (``ConfigError`` naming the field) when ``sentences`` hold fewer, with the counts."""
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    wanted = set(labels)
    counts: Counter[str] = Counter()
    chosen = []
    for i in order:
        if all(counts[label] >= shots for label in wanted):
            break
        tags = [t for t in sentences[i].tags if t in wanted]
        if any(counts[t] < shots for t in tags):
            chosen.append(i)
            counts.update(tags)
    short = {label: counts[label] for label in labels if counts[label] < shots}
    if short:
        raise ConfigError(f"field {FIELD!r}: {shots} labelled words per label asked for, but the "
                          f"{len(sentences)} training sentences hold only {short}")
    return [sentences[i] for i in sorted(chosen)]
