"""Scores over reassembled sentences, and valid-IOB2 decoding (Ray-free).

Each number is named for what it is, and the IOB2 ones are what XTREME reports:
- ``accuracy``: token accuracy over all words.
- ``f1`` (IOB2 tasks): seqeval's *default* (conlleval-style) span micro-F1, the
  number XTREME's ``run_tag.py`` and the ToPro authors report: an ``I-X`` that
  does not continue an ``X`` span starts one. With ``precision``, ``recall`` and
  ``per_type`` scores.
- ``f1_strict`` (IOB2 tasks): strict IOB2 span micro-F1 (such an ``I-X`` starts
  no entity), with ``precision_strict``, ``recall_strict``, ``per_type_strict``.
  Both modes agree on valid IOB2 sequences (e.g. Viterbi-decoded ones).
- ``xtreme_seqeval_f1`` (tag tasks): what XTREME reports for UDPOS, seqeval's
  default-mode F1 applied to raw tags. It is not accuracy; both are reported.
- ``accuracy`` and ``macro_f1`` (classification tasks, one label per text): the unweighted mean over
  classes of each class's F1, with ``per_class`` precision / recall / F1 / support.

Which of them selects checkpoints is ``selection_metric`` (``selection_metrics``
lists the valid names per task).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from seqeval.metrics import classification_report, f1_score
from seqeval.scheme import IOB2

from topro.data.tasks import Task


def accuracy(gold: list[list[str]], pred: list[list[str]]) -> float:
    total = sum(len(g) for g in gold)
    hits = sum(g == p for gs, ps in zip(gold, pred) for g, p in zip(gs, ps))
    return hits / total if total else 0.0


def span_scores(gold: list[list[str]], pred: list[list[str]], strict: bool = False) -> dict:
    """Span micro precision/recall/F1 and per-type scores: seqeval default (conlleval) or strict IOB2."""
    kwargs = {"mode": "strict", "scheme": IOB2} if strict else {}
    with warnings.catch_warnings():  # seqeval warns on an I- that starts a span in default mode: expected
        warnings.simplefilter("ignore")
        report = classification_report(gold, pred, output_dict=True, zero_division=0, **kwargs)
    micro = report["micro avg"]
    per_type = {name: {"precision": float(v["precision"]), "recall": float(v["recall"]),
                       "f1": float(v["f1-score"]), "support": int(v["support"])}
                for name, v in report.items() if not name.endswith(" avg")}
    return {"f1": float(micro["f1-score"]), "precision": float(micro["precision"]),
            "recall": float(micro["recall"]), "per_type": per_type}


def score_task(task: Task, gold: list[list[str]], pred: list[list[str]]) -> dict:
    """All metrics of ``task`` for aligned gold and predicted tag sequences."""
    if len(gold) != len(pred) or any(len(g) != len(p) for g, p in zip(gold, pred)):
        raise ValueError("gold and predicted sequences differ in length; reassemble every word first")
    scores = {"accuracy": accuracy(gold, pred)}
    if task.kind == "classification":
        scores.update(class_scores([g for gs in gold for g in gs], [p for ps in pred for p in ps]))
    elif task.scheme == "iob2":
        scores.update(span_scores(gold, pred))
        strict = span_scores(gold, pred, strict=True)
        scores.update({f"{k}_strict": v for k, v in strict.items()})
    else:
        with warnings.catch_warnings():  # seqeval warns that POS tags are not NE tags: known
            warnings.simplefilter("ignore")
            scores["xtreme_seqeval_f1"] = float(f1_score(gold, pred, zero_division=0))
    return scores


def class_scores(gold: list[str], pred: list[str]) -> dict:
    """Macro-F1 and per-class precision / recall / F1 / support of single-label predictions. The classes
    averaged are those in gold or prediction (scikit-learn's default): a class predicted but never gold
    counts with F1 0, a class absent from both (a language without it) is left out."""
    per_class = {}
    for label in sorted(set(gold) | set(pred)):
        hits = sum(g == p == label for g, p in zip(gold, pred))
        n_pred, n_gold = sum(p == label for p in pred), sum(g == label for g in gold)
        precision = hits / n_pred if n_pred else 0.0
        recall = hits / n_gold if n_gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": n_gold}
    macro = sum(c["f1"] for c in per_class.values()) / len(per_class) if per_class else 0.0
    return {"macro_f1": macro, "per_class": per_class}


def selection_metrics(task: Task) -> list[str]:
    """Names a run may select checkpoints (and a sweep rank trials) by, for ``task``."""
    if task.kind == "classification":
        return ["accuracy", "macro_f1"]
    if task.scheme == "iob2":
        return ["f1", "f1_strict", "viterbi_f1", "accuracy"]
    return ["accuracy", "xtreme_seqeval_f1"]


def resolve_selection_metric(task: Task, name: str | None) -> str:
    """``name``, or the task's headline metric when ``None``; an unknown name raises naming the field."""
    from topro.config import ConfigError

    if name is None:
        return task.metric
    allowed = selection_metrics(task)
    if name not in allowed:
        raise ConfigError(f"selection_metric: {name!r} is not a score of task {task.name!r}; "
                          f"choose one of {allowed}")
    return name


def metric_value(scores: dict, name: str) -> float:
    """``name`` (one of ``selection_metrics``) read off a ``score_language`` result."""
    if name == "viterbi_f1":
        return scores["viterbi"]["f1"]
    return scores[name]


def iob2_transition_mask(labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(allowed[prev, next], allowed_start[next]) for strict IOB2."""
    n = len(labels)
    allowed = np.ones((n, n), dtype=bool)
    start = np.ones(n, dtype=bool)
    for j, nxt in enumerate(labels):
        if nxt.startswith("I-"):
            kind = nxt[2:]
            start[j] = False
            for i, prev in enumerate(labels):
                allowed[i, j] = prev in (f"B-{kind}", f"I-{kind}")
    return allowed, start


def fallback_label(scheme: str, labels: list[str]) -> str:
    """The label a word without a prediction gets (cut by ``max_length``, or an LLM answer that failed to
    parse): ``O`` for span tasks, else ``X`` (or the first label). It is still scored, so a lost word costs
    recall instead of vanishing from the metric."""
    if scheme == "iob2":
        return "O"
    return "X" if "X" in labels else labels[0]


def viterbi_iob2(log_probs: np.ndarray, labels: list[str]) -> list[int]:
    """The most probable valid IOB2 label sequence given per-word log-probabilities [n, L]."""
    n_words, n_labels = log_probs.shape
    if n_words == 0:
        return []
    allowed, start = iob2_transition_mask(labels)
    trans = np.where(allowed, 0.0, -math.inf)
    score = np.where(start, log_probs[0], -math.inf)
    back = np.zeros((n_words, n_labels), dtype=np.int64)
    for t in range(1, n_words):
        cand = score[:, None] + trans  # [prev, next]
        back[t] = cand.argmax(axis=0)
        score = cand.max(axis=0) + log_probs[t]
    best = [int(score.argmax())]
    for t in range(n_words - 1, 0, -1):
        best.append(int(back[t, best[-1]]))
    return best[::-1]


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    """2ab / (a + b), the generalized zero-shot summary of seen and unseen scores (0 when both are 0;
    ``None`` when either is undefined)."""
    if a is None or b is None:
        return None
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def _keep_labels(tags: list[list[str]], keep: set[str]) -> list[list[str]]:
    return [[t if t in keep else "O" for t in seq] for seq in tags]


def generalized_scores(task: Task, gold: list[list[str]], pred: list[list[str]], unseen: list[str]) -> dict:
    """Seen / unseen / harmonic-mean scores of a run whose ``unseen`` labels were held out of training.

    Tag tasks: accuracy over the words whose gold label is seen (``accuracy_seen_labels``) and over those whose
    gold label is unseen (``accuracy_unseen_labels``); the prediction is over the full label set either way.
    IOB2 tasks: span micro-F1 over the seen entity types only and over the unseen types only
    (``f1_seen_labels``, ``f1_unseen_labels``; the other types' tags read as ``O`` in gold and prediction
    alike, which leaves the chosen types' spans and their matches as they are). ``*_hmean_labels`` is their
    harmonic mean; ``n_unseen_label_words`` / ``n_seen_label_words`` count gold words. A score with no gold
    word to score is ``None``. Tag tasks also report ``precision_unseen_labels``: of the words predicted as an
    unseen label, the share whose gold label is that label (``n_unseen_label_predictions`` of them; ``None``
    when there are none). Accuracy on unseen gold words is their recall, which a model that predicts an unseen
    label everywhere maximizes; the precision shows that. (Span F1 holds its own precision.)"""
    unseen_set = set(unseen)
    n_unseen = sum(t in unseen_set for seq in gold for t in seq)
    n_total = sum(len(seq) for seq in gold)
    precision: dict[str, float | int | None] = {}  # tag tasks only
    if task.scheme == "iob2":
        labels = {t for seq in gold for t in seq} | {t for seq in pred for t in seq} | set(task.labels)
        seen_keep = {t for t in labels if t not in unseen_set}
        seen = span_scores(_keep_labels(gold, seen_keep), _keep_labels(pred, seen_keep))["f1"]
        unseen_f1 = span_scores(_keep_labels(gold, unseen_set), _keep_labels(pred, unseen_set))["f1"] \
            if n_unseen else None
        name = "f1"
        n_seen = n_total - n_unseen - sum(t == "O" for seq in gold for t in seq)
        seen = seen if n_seen else None
    else:
        pairs = [(g, p) for gs, ps in zip(gold, pred) for g, p in zip(gs, ps)]
        seen_pairs = [(g, p) for g, p in pairs if g not in unseen_set]
        unseen_pairs = [(g, p) for g, p in pairs if g in unseen_set]
        seen = sum(g == p for g, p in seen_pairs) / len(seen_pairs) if seen_pairs else None
        unseen_f1 = sum(g == p for g, p in unseen_pairs) / len(unseen_pairs) if unseen_pairs else None
        name = "accuracy"
        n_seen = len(seen_pairs)
        predicted_unseen = [(g, p) for g, p in pairs if p in unseen_set]
        precision = {"precision_unseen_labels": (sum(g == p for g, p in predicted_unseen) / len(predicted_unseen)
                                                 if predicted_unseen else None),
                     "n_unseen_label_predictions": len(predicted_unseen)}
    scores = {f"{name}_seen_labels": seen, f"{name}_unseen_labels": unseen_f1,
              f"{name}_hmean_labels": harmonic_mean(seen, unseen_f1),
              "n_seen_label_words": n_seen, "n_unseen_label_words": n_unseen, "unseen_labels": sorted(unseen_set)}
    return {**scores, **precision}
