"""Which trials of a sweep win: the selection policy, in plain Python (no Ray, no MLflow).

Per compared setting (every searched field except ``select_over`` and ``seed``), the ``select_over``
values (the learning rate, usually) with the best mean English dev score over seeds are chosen, with all
their seeds; those trials' checkpoints are evaluated on every language. The champion per task and method,
the one registered, is the evaluated trial with the best English dev score: never a test language's.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from topro.config import TrainConfig
from topro.sweep_config import SweepConfig, dimensions


@dataclass
class TrialOutcome:
    """One trial after Tune: its params, status, English dev score and best checkpoint."""

    trial_id: str
    params: dict[str, Any]
    config: TrainConfig
    status: str
    dev_score: float | None
    """The trial's English dev selection score (the best over its evaluations, or its averaged weights')."""
    checkpoint: str | None
    run_id: str | None = None
    """Its MLflow trial run, once the driver has found it."""
    record: dict[str, Any] | None = field(default=None, repr=False)
    """Its multilingual evaluation record, once evaluated."""


def short_value(value: Any) -> str:
    """A searched value as names show it: floats in ``%g``, paths by their last part."""
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return Path(text).name if "/" in text else text


def compared_fields(sweep: SweepConfig) -> list[str]:
    """Searched fields the report compares (everything but ``select_over`` and ``seed``)."""
    return [d.field for d in dimensions(sweep) if d.field not in sweep.select_over and d.field != "seed"]


def setting_label(sweep: SweepConfig, params: dict[str, Any]) -> str:
    """How a trial appears in the report: the method, plus other compared fields that vary (not the task)."""
    fields = [f for f in compared_fields(sweep) if f not in ("task", "method")]
    method = params.get("method", sweep.base.get("method"))
    extra = ", ".join(f"{f}={short_value(params[f])}" for f in fields if f in params)
    return f"{method} ({extra})" if extra else str(method)


def select_trials(sweep: SweepConfig, outcomes: list[TrialOutcome]) -> list[TrialOutcome]:
    """Per compared setting, the ``select_over`` values with the best mean English dev score; all their seeds.

    Trials without a checkpoint or a dev score cannot be chosen; ``evaluate: all`` chooses every other one."""
    usable = [o for o in outcomes if o.checkpoint and o.dev_score is not None]
    if sweep.evaluate == "all":
        return usable
    searched = {d.field for d in dimensions(sweep)}
    select = [f for f in sweep.select_over if f in searched]
    compared = compared_fields(sweep)
    groups: dict[tuple, dict[tuple, list[TrialOutcome]]] = {}
    for o in usable:
        key = tuple(repr(o.params.get(f)) for f in compared)
        choice = tuple(repr(o.params.get(f)) for f in select)
        groups.setdefault(key, {}).setdefault(choice, []).append(o)
    chosen = []
    for candidates in groups.values():
        best = max(candidates.values(), key=lambda trials: statistics.fmean(t.dev_score for t in trials))
        chosen += best
    return chosen


def champions(trials: list[TrialOutcome]) -> dict[tuple[str, str], TrialOutcome]:
    """Per (task, method), sorted, the evaluated trial with the best English dev score (the first on a tie)."""
    best: dict[tuple[str, str], TrialOutcome] = {}
    for t in trials:
        key = (t.config.task, t.config.method)
        if t.record is not None and (key not in best or t.dev_score > best[key].dev_score):
            best[key] = t
    return dict(sorted(best.items()))
