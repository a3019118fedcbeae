"""``topro compare RUN_A RUN_B``: paired bootstrap per language of two evaluations' stored predictions.

A run is an MLflow run id (its ``evaluation/predictions.json``), a results file written by
``topro evaluate`` / ``topro train`` (``X.json``, its predictions in ``X.predictions.json``), or the
output folder of ``topro train`` (its ``eval.json``). No model
is run: the comparison reads the per-sentence predictions the evaluation stored.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from topro.cli.flags import add_config_arguments, add_config_flags, flag_values
from topro.config import _at_least as at_least
from topro.config import check_ranges, load_config
from topro import atomic
from topro.significance import ALPHA, N_RESAMPLES, ComparisonError, Predictions, compare_predictions, \
    comparison_markdown


def results_path(ref: str) -> Path:
    """``ref`` as a file: a results file, or the ``eval.json`` of a training output folder."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "eval.json").is_file():
            raise ComparisonError(f"{path}: a folder without eval.json (evaluate the run first, or pass "
                                  f"a results file or an MLflow run id)")
        return path / "eval.json"
    return path


def load_predictions(ref: str) -> Predictions:
    """The stored predictions of ``ref`` (a results/predictions file, a run folder, or an MLflow run id)."""
    path = results_path(ref)
    if path.is_file():
        data = json.loads(path.read_text())
        if "predictions_file" in data:  # a results file: its predictions lie beside it
            pred_path = path.with_name(data["predictions_file"])
            if not pred_path.is_file():
                raise ComparisonError(f"{path}: its predictions file {pred_path} is missing")
            data = json.loads(pred_path.read_text())
        elif "languages" in data and not all("gold" in v for v in data["languages"].values()):
            raise ComparisonError(f"{path}: holds no per-sentence predictions (evaluated before they were "
                                  f"stored); evaluate the checkpoint again")
        where = f"{path.parent.name}/{path.name}" if path.parent.name else path.name  # two runs' eval.json differ
        return Predictions(data["task"], f"{data.get('method', '?')} ({where})", data["languages"])
    from topro import tracking

    data = tracking.load_predictions(ref)
    if data is None:
        raise ComparisonError(f"{ref!r}: neither a results file nor an MLflow run with "
                              f"evaluation/{tracking.PREDICTIONS_FILE} in {tracking.tracking_uri()}")
    return Predictions(data["task"], f"{data.get('method', '?')} ({ref[:8]})", data["languages"])


@dataclass
class CompareConfig:
    """Two evaluated systems and how their per-sentence predictions are compared."""

    run_a: str | None = None
    """MLflow run id, a results JSON of ``topro evaluate`` (predictions beside it), or a ``topro train`` output
    folder (its eval.json). Required (the first positional argument)."""
    run_b: str | None = None
    """The same for the other system. Required (the second positional argument)."""
    metric: str | None = None
    """accuracy, f1 or f1_strict (default: the task's headline)."""
    langs: str | None = None
    """Comma-separated languages (default: all, which both must have)."""
    resamples: int = N_RESAMPLES
    """Bootstrap resamples."""
    seed: int = 0
    """Bootstrap seed."""
    alpha: float = ALPHA
    """Significance level."""
    tracking_uri: str | None = None
    """MLflow tracking URI for run ids."""
    output: str | None = None
    """Also write the comparison as JSON to this file."""

    def problems(self) -> list[tuple[str, str]]:
        required = [(name, "required (positional, or " + name + "=...)") for name in ("run_a", "run_b")
                    if not getattr(self, name)]
        return required + check_ranges(self, {"resamples": at_least(1)})


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="paired bootstrap of two evaluations per language (stored predictions)",
                       description="Compare two evaluated runs on the same sentences: per language, both scores, "
                                   "the difference, its bootstrap 95% interval and p-value; no model is run. "
                                   "RUN_A RUN_B come first, then key=value overrides.")
    p.add_argument("runs", nargs="*", metavar="RUN_A RUN_B",
                   help="the two systems (run_a, run_b), then key=value overrides of CompareConfig fields")
    p.add_argument("--config", help="YAML of CompareConfig fields")
    add_config_flags(p, CompareConfig, [f for f in CompareConfig.__dataclass_fields__ if f not in ("run_a", "run_b")])
    p.set_defaults(func=cmd_compare)


def config_from_args(args) -> CompareConfig:
    """Positional words without ``=`` are the two runs, in order; the others ``key=value`` overrides."""
    runs = [word for word in args.runs if "=" not in word or Path(word).exists()]
    overrides = [word for word in args.runs if word not in runs]
    if len(runs) > 2:
        raise ComparisonError(f"expected two runs to compare, got {len(runs)}: {' '.join(runs)}")
    named = dict(zip(("run_a", "run_b"), runs))
    return load_config(CompareConfig, args.config, overrides, **named, **flag_values(args, CompareConfig))


def cmd_compare(args) -> int:
    return compare(config_from_args(args))


def compare(cfg: CompareConfig) -> int:
    from topro import tracking
    from topro.data import get_task

    if not all(results_path(r).is_file() for r in (cfg.run_a, cfg.run_b)):
        tracking.configure(cfg.tracking_uri)  # run ids: MLflow (files need none)
    a, b = load_predictions(cfg.run_a), load_predictions(cfg.run_b)
    metric = cfg.metric or get_task(a.task).metric
    langs = [x for x in cfg.langs.split(",") if x] if cfg.langs else None
    result = compare_predictions(a, b, metric, langs, n_resamples=cfg.resamples, seed=cfg.seed, alpha=cfg.alpha)
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(cfg.output, result, "report_text")
    sys.stdout.write(f"## {a.task}: {a.label} vs {b.label}\n\n" + comparison_markdown(result))
    return 0
