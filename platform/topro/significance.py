"""Seed spread and paired significance of per-language differences (Ray-free, MLflow-free).

- ``confidence_interval``: the 95% t-interval of a mean over seeds.
- ``paired_bootstrap``: the paired bootstrap over sentences (Koehn 2004; Berg-Kirkpatrick et al. 2012)
  between two systems' predictions on the same sentences: resample sentences with replacement
  ``n_resamples`` times (seeded), recompute both scores on each resample, and take the two-sided p-value
  of the observed difference from the resampled differences centred on it.
- ``compare_predictions``: that test per language of two evaluations' stored per-sentence predictions
  (``evaluation/predictions.json`` of a run, or ``X.predictions.json`` beside ``topro evaluate``'s
  output), refusing runs of different tasks or on different sentences.

Scores are recomputed from per-sentence counts (correct words and words; or true-positive, predicted
and gold spans), so a resample costs a sum, not a re-scoring, and the full-sample score equals the
one ``topro evaluate`` reports.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np

N_RESAMPLES = 10_000
ALPHA = 0.05


class ComparisonError(ValueError):
    """Two evaluations cannot be compared: other task, other languages or other sentences."""


def t_quantile(level: float, df: int) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom (scipy's ``t.ppf``):
    any level in (0, 1), any df >= 1, never the normal's 1.96 in place of t."""
    if not 0 < level < 1:
        raise ValueError(f"confidence level {level!r} must lie strictly between 0 and 1")
    if df < 1:
        raise ValueError(f"degrees of freedom {df!r} must be at least 1")
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def confidence_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """The t-interval of the mean of ``values`` (seeds); ``None`` for a single value (no spread to use)."""
    n = len(values)
    if n < 2:
        return None
    mean, std = statistics.fmean(values), statistics.stdev(values)
    half = t_quantile(level, n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


def _spans(tags: list[str], strict: bool) -> set[tuple]:
    if strict:
        from seqeval.scheme import IOB2, Entities

        return {e.to_tuple()[1:] for e in Entities([tags], IOB2).entities[0]}
    from seqeval.metrics.sequence_labeling import get_entities

    return set(get_entities(tags))


def sentence_stats(gold: list[list[str]], pred: list[list[str]], metric: str) -> np.ndarray:
    """Per-sentence counts whose sums give ``metric``: [n, 2] (correct, words) for accuracy,
    [n, 3] (true positives, predicted spans, gold spans) for ``f1`` / ``f1_strict``."""
    if metric == "accuracy":
        return np.array([[sum(a == b for a, b in zip(g, p)), len(g)] for g, p in zip(gold, pred)], dtype=np.float64)
    if metric in ("f1", "f1_strict"):
        strict = metric == "f1_strict"
        rows = []
        for g, p in zip(gold, pred):
            gs, ps = _spans(g, strict), _spans(p, strict)
            rows.append([len(gs & ps), len(ps), len(gs)])
        return np.array(rows, dtype=np.float64).reshape(-1, 3)
    raise ValueError(f"metric {metric!r} cannot be resampled; use accuracy, f1 or f1_strict")


def score_from_sums(sums: np.ndarray, metric: str) -> np.ndarray:
    """``metric`` from summed counts (last axis), vectorised over resamples."""
    if metric == "accuracy":
        return np.divide(sums[..., 0], sums[..., 1], out=np.zeros_like(sums[..., 0]), where=sums[..., 1] > 0)
    denominator = sums[..., 1] + sums[..., 2]
    return np.divide(2 * sums[..., 0], denominator, out=np.zeros_like(denominator), where=denominator > 0)


def paired_bootstrap(stats_a: np.ndarray, stats_b: np.ndarray, metric: str, n_resamples: int = N_RESAMPLES,
                     seed: int = 0, chunk: int = 500) -> dict[str, float]:
    """Paired bootstrap of ``score(A) - score(B)`` over sentences (rows of the stats)."""
    a, b, deltas = bootstrap_deltas(stats_a, stats_b, metric, n_resamples, seed, chunk)
    return summarize_deltas(a, b, deltas, n_sentences=stats_a.shape[0])


def bootstrap_deltas(stats_a: np.ndarray, stats_b: np.ndarray, metric: str, n_resamples: int = N_RESAMPLES,
                     seed: int = 0, chunk: int = 500) -> tuple[float, float, np.ndarray]:
    """Both scores and ``n_resamples`` resampled differences ``score(A) - score(B)``."""
    if stats_a.shape != stats_b.shape:
        raise ComparisonError(f"paired bootstrap needs the same sentences: {stats_a.shape[0]} vs {stats_b.shape[0]}")
    n = stats_a.shape[0]
    if n == 0:
        raise ComparisonError("no sentences to compare")
    a = float(score_from_sums(stats_a.sum(axis=0), metric))
    b = float(score_from_sums(stats_b.sum(axis=0), metric))
    rng = np.random.default_rng(seed)
    deltas = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(size, n))
        deltas[start:start + size] = (score_from_sums(stats_a[idx].sum(axis=1), metric)
                                      - score_from_sums(stats_b[idx].sum(axis=1), metric))
    return a, b, deltas


def summarize_deltas(a: float, b: float, deltas: np.ndarray, n_sentences: int) -> dict[str, float]:
    """The observed difference ``a - b``, the 95% percentile interval of ``deltas`` and the p-value."""
    observed = a - b
    n_resamples = len(deltas)
    # Two-sided: how often a resampled difference, centred on the observed one, is at least as far from 0.
    extreme = np.abs(deltas - observed) >= abs(observed) - 1e-12
    p_value = float((extreme.sum() + 1) / (n_resamples + 1))
    low, high = np.percentile(deltas, [2.5, 97.5])
    return {"a": a, "b": b, "delta": observed, "p_value": p_value, "ci_low": float(low), "ci_high": float(high),
            "n_sentences": n_sentences, "n_resamples": n_resamples}


@dataclass
class Predictions:
    """One system's stored per-sentence predictions: task, label and {lang: digests, gold, pred}."""

    task: str
    label: str
    languages: dict[str, dict[str, Any]]


def check_comparable(a: Predictions, b: Predictions, langs: list[str] | None = None) -> list[str]:
    """The languages both evaluations scored on the same sentences; a mismatch raises naming it."""
    if a.task != b.task:
        raise ComparisonError(f"cannot compare runs of different tasks: {a.label} is {a.task!r}, "
                              f"{b.label} is {b.task!r}")
    wanted = langs or sorted(set(a.languages) | set(b.languages))
    for lang, side in ((lg, s) for lg in wanted for s in (a, b)):
        if lang not in side.languages:
            raise ComparisonError(f"{side.label} has no predictions for language {lang!r} "
                                  f"(it has {sorted(side.languages)}); pass --langs to compare a subset")
    for lang in wanted:
        da, db = a.languages[lang]["digests"], b.languages[lang]["digests"]
        if da != db:
            if len(da) != len(db):
                why = f"{len(da)} vs {len(db)} sentences"
            else:
                first = next(i for i, (x, y) in enumerate(zip(da, db)) if x != y)
                why = f"sentence {first} differs"
            raise ComparisonError(f"{a.label} and {b.label} evaluated different {lang!r} sentences ({why}); "
                                  f"evaluate both on the same split and max_sentences")
    return wanted


def pooled_stats(predictions: list[dict[str, Any]], metric: str) -> np.ndarray:
    """Per-sentence counts summed over several seeds' predictions of the same sentences."""
    total = None
    for p in predictions:
        stats = sentence_stats(p["gold"], p["pred"], metric)
        total = stats if total is None else total + stats
    return total


def compare_predictions(a: Predictions | list[Predictions], b: Predictions | list[Predictions], metric: str,
                        langs: list[str] | None = None, n_resamples: int = N_RESAMPLES, seed: int = 0,
                        alpha: float = ALPHA) -> dict[str, Any]:
    """Per-language paired bootstrap of A vs B. A list is several seeds of one system: their counts are
    pooled per sentence (the score of the seeds together), so the test is over sentences, not seeds."""
    group_a = a if isinstance(a, list) else [a]
    group_b = b if isinstance(b, list) else [b]
    common = None
    for x in group_a + group_b:
        common = check_comparable(group_a[0], x, langs)
    results, all_deltas = {}, []
    for i, lang in enumerate(common):
        sa = pooled_stats([p.languages[lang] for p in group_a], metric)
        sb = pooled_stats([p.languages[lang] for p in group_b], metric)
        score_a, score_b, deltas = bootstrap_deltas(sa, sb, metric, n_resamples, seed + i)
        r = summarize_deltas(score_a, score_b, deltas, n_sentences=sa.shape[0])
        r["significant"] = r["p_value"] < alpha
        results[lang] = r
        all_deltas.append(deltas)
    # The mean over languages: each language resampled on its own (independent seeds), the k-th resamples
    # averaged, so its interval and p-value are those of the unweighted language average.
    average = summarize_deltas(float(np.mean([r["a"] for r in results.values()])),
                               float(np.mean([r["b"] for r in results.values()])),
                               np.mean(all_deltas, axis=0), sum(r["n_sentences"] for r in results.values()))
    average["significant"] = average["p_value"] < alpha
    return {"task": group_a[0].task, "metric": metric, "a": group_a[0].label, "b": group_b[0].label,
            "n_seeds_a": len(group_a), "n_seeds_b": len(group_b), "alpha": alpha, "n_resamples": n_resamples,
            "seed": seed, "languages": results, "average": average}


def comparison_markdown(result: dict[str, Any]) -> str:
    """One row per language: both scores, the difference, its 95% bootstrap interval and the p-value."""
    lines = [f"| lang | A: {result['a']} | B: {result['b']} | Δ (A − B) | 95% CI of Δ | p | |",
             "|---|---|---|---|---|---|---|"]
    rows = list(result["languages"].items())
    if "average" in result:
        rows.append((f"**avg of {len(result['languages'])}**", result["average"]))
    for lang, r in rows:
        mark = "*" if r["significant"] else ""
        lines.append(f"| {lang} | {100 * r['a']:.1f} | {100 * r['b']:.1f} | {100 * r['delta']:+.1f} | "
                     f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}] | {r['p_value']:.4f} | {mark} |")
    n_sig = sum(r["significant"] for r in result["languages"].values())
    lines.append("")
    lines.append("Δ = A − B: positive where A scores higher. The last row is the unweighted mean over languages, "
                 "its interval from the per-language resamples averaged.")
    lines.append(f"{result['metric']} x 100; paired bootstrap over sentences, {result['n_resamples']} resamples "
                 f"(seed {result['seed']}), two-sided; * = significant at {result['alpha']} "
                 f"({n_sig} of {len(result['languages'])} languages); seeds pooled per sentence: "
                 f"{result['n_seeds_a']} vs {result['n_seeds_b']}.")
    return "\n".join(lines) + "\n"
