"""What MLflow metrics and params are called: the names topro logs under, and which values qualify (no MLflow here).

A trial's history keeps its training and English dev metrics (``train_loss``, ``dev_f1``); an evaluation
logs every score per language (``f1.de``, ``viterbi_f1.de``) plus averages (``f1.avg``,
``f1.avg_without_en``, ``f1.family.Germanic``, ``f1.script.Latin``); nested params are flattened to
``a.b`` keys.
"""
from __future__ import annotations

import json
import math
from typing import Any

# Per-report training metrics worth a history in MLflow (Tune adds many bookkeeping keys).
TRAINING_METRIC_PREFIXES = ("train_", "dev_", "best_dev_")
TRAINING_METRIC_KEYS = ("epoch", "step", "examples_per_second", "tokens_per_second")


def is_number(value: Any) -> bool:
    """An int or float, not a bool (``True`` is an int to Python, not a metric to us)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A number MLflow can store (it refuses NaN and infinities)."""
    return is_number(value) and math.isfinite(float(value))


def training_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The training and English dev metrics of one reported result."""
    return {k: v for k, v in result.items()
            if (k.startswith(TRAINING_METRIC_PREFIXES) or k in TRAINING_METRIC_KEYS) and is_number(v)}


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings flattened to ``a.b`` keys; values as strings (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            out[name] = text[:6000]
    return out


def _is_score(key: str, value: Any) -> bool:
    return is_finite_number(value) and not key.startswith(("n_", "model_")) and key not in ("seconds",)


def evaluation_metrics(record: dict[str, Any]) -> dict[str, float]:
    """Per-language metrics (``f1.de``), the average over languages and averages by family and script."""
    from topro.reports import group_averages

    metric = record["metric"]
    out: dict[str, float] = {}
    headline = {lang: r[metric] for lang, r in record["languages"].items()}
    for lang, r in record["languages"].items():
        # Every score the evaluation wrote (xtreme_seqeval_f1, f1_strict, precision, ...), not sizes or timings.
        for key, value in r.items():
            if _is_score(key, value):
                out[f"{key}.{lang}"] = float(value)
        for key, value in (r.get("viterbi") or {}).items():
            if _is_score(key, value):
                out[f"viterbi_{key}.{lang}"] = float(value)
    if headline:
        out[f"{metric}.avg"] = sum(headline.values()) / len(headline)
        zero_shot = [v for lang, v in headline.items() if lang != "en"]
        if zero_shot and len(zero_shot) < len(headline):
            out[f"{metric}.avg_without_en"] = sum(zero_shot) / len(zero_shot)
        for by in ("family", "script"):
            for group, value in group_averages(headline, by).items():
                out[f"{metric}.{by}.{group}"] = value
    return out
