"""``topro compare RUN_A RUN_B``: paired bootstrap per language of two evaluations' stored predictions.

A run is an MLflow run id (its ``evaluation/predictions.json``), a results file written by
``topro evaluate`` / ``topro train`` (``X.json``, its predictions in ``X.predictions.json``), or the
output folder of ``topro train`` (its ``eval.json``). No model
is run: the comparison reads the per-sentence predictions the evaluation stored.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

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


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="paired bootstrap of two evaluations per language (stored predictions)",
                       description="Compare two evaluated runs on the same sentences: per language, both scores, "
                                   "the difference, its bootstrap 95%% interval and p-value; no model is run.")
    p.add_argument("run_a", help="MLflow run id, a results JSON of topro evaluate (predictions beside it), or a "
                                 "topro train output folder (its eval.json)")
    p.add_argument("run_b", help="the same for the other system")
    p.add_argument("--metric", help="accuracy, f1 or f1_strict (default: the task's headline)")
    p.add_argument("--langs", help="comma-separated languages (default: all, which both must have)")
    p.add_argument("--resamples", type=int, default=N_RESAMPLES, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--alpha", type=float, default=ALPHA, help="significance level (default 0.05)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for run ids")
    p.add_argument("--output", help="also write the comparison as JSON to this file")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from topro import tracking
    from topro.data import get_task

    if args.resamples < 1:
        raise ComparisonError(f"--resamples must be at least 1, got {args.resamples}")
    if not all(results_path(r).is_file() for r in (args.run_a, args.run_b)):
        tracking.configure(args.tracking_uri)  # run ids: MLflow (files need none)
    a, b = load_predictions(args.run_a), load_predictions(args.run_b)
    metric = args.metric or get_task(a.task).metric
    langs = [x for x in args.langs.split(",") if x] if args.langs else None
    result = compare_predictions(a, b, metric, langs, n_resamples=args.resamples, seed=args.seed, alpha=args.alpha)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(args.output, result, "report_text")
    sys.stdout.write(f"## {a.task}: {a.label} vs {b.label}\n\n" + comparison_markdown(result))
    return 0
