"""Generalized zero-shot labels: which labels a run holds out of training (``unseen_labels``), Ray- and torch-free.

``unseen_labels`` names labels of the task or, for IOB2 tasks, entity types (``LOC`` stands for ``B-LOC`` and
``I-LOC``). Training never sees them (``train.prepare``), English-dev selection scores the seen labels only
(``evaluate.evaluate_seen_labels``), and evaluation scores the full label set plus seen / unseen / harmonic-mean
scores per language (``metrics.generalized_scores``).
"""
from __future__ import annotations

from topro.config import ConfigError
from topro.data.tasks import Task, get_task

FIELD = "unseen_labels"
MIN_SEEN_LABELS = 2
"""Training needs at least two seen labels: with one, its softmax is always 1 and the loss always 0."""


def entity_types(task: Task) -> list[str]:
    """The entity types of an IOB2 task (``PER``, ``ORG``, ``LOC`` for PAN-X); none for tag tasks."""
    if task.scheme != "iob2":
        return []
    return list(dict.fromkeys(label[2:] for label in task.labels if label[:2] in ("B-", "I-")))


def expand_unseen_labels(task: Task | str, names: list[str]) -> list[str]:
    """The task labels ``names`` stands for, in the task's label order; bad names raise ``ConfigError``
    naming the field: not a label or entity type of the task, ``O`` of an IOB2 task, or fewer than
    ``MIN_SEEN_LABELS`` labels left seen."""
    task = get_task(task)
    if not names:
        return []
    types = entity_types(task)
    chosen: set[str] = set()
    unknown = []
    for name in names:
        if name in types:
            chosen.update((f"B-{name}", f"I-{name}"))
        elif name in task.labels:
            chosen.add(name)
        else:
            unknown.append(name)
    if unknown:
        kinds = f"labels {task.labels} or entity types {types}" if types else f"labels {task.labels}"
        raise ConfigError(f"field {FIELD!r}: {unknown} {'is' if len(unknown) == 1 else 'are'} not among the "
                          f"{kinds} of task {task.name!r}")
    if task.scheme == "iob2" and "O" in chosen:
        raise ConfigError(f"field {FIELD!r}: 'O' (outside any entity) cannot be unseen: span F1 does not score "
                          f"it and every other label needs it; hold out entity types ({', '.join(types)})")
    seen = [label for label in task.labels if label not in chosen]
    if len(seen) < MIN_SEEN_LABELS:
        raise ConfigError(f"field {FIELD!r}: {sorted(chosen)} leaves {len(seen)} of the {len(task.labels)} labels "
                          f"of task {task.name!r} seen ({seen}); training needs at least {MIN_SEEN_LABELS} "
                          f"(all labels unseen leaves nothing to train on)")
    return [label for label in task.labels if label in chosen]


def unseen_label_indices(labels: list[str], unseen: list[str]) -> list[int]:
    """Positions of ``unseen`` in ``labels`` (the model's class order)."""
    return [i for i, label in enumerate(labels) if label in set(unseen)]
