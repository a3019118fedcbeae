"""``topro sweep`` (and ``jobs/sweep.py``): run or resume a sweep from a YAML file."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from topro import atomic
from topro.cli.flags import add_config_arguments, add_config_flags, flag_values
from topro.config import TrainConfig
from topro.sweep_config import SweepConfig


@dataclass
class SweepRunOptions:
    """How ``topro sweep`` runs the sweep of ``--config``: where Ray and MLflow are, whether it starts over,
    where the summary goes. Not part of the sweep: a resumed sweep may change them."""

    tracking_uri: str | None = None
    """MLflow tracking URI (default ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working
    directory)."""
    address: str | None = None
    """Ray cluster address (default ``$RAY_ADDRESS``, else a local Ray on 127.0.0.1)."""
    fresh: bool = False
    """Start over instead of resuming (the previous state is moved aside, not deleted)."""
    summary: str | None = None
    """Write a JSON summary (parent run, trials, registered models) here."""


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="Ray Tune sweep over methods, models, templates, learning rates, seeds...",
                       description="Run a sweep (configs/sweeps/*.yaml): Ray Tune trials of Ray Train runs, "
                                   "selection on English dev, parallel zero-shot evaluation on every language, "
                                   "MLflow tracking (one parent run, one child run per trial), the best checkpoint "
                                   "per task and method registered, and a report. Rerunning the same sweep resumes "
                                   "it. Overrides are key=value: sweep fields (num_samples=2), nested entries "
                                   "(search_space.seed.grid=[1,2]) or training fields of the base "
                                   "(max_train_sentences=100, same as base.max_train_sentences=100); the flags "
                                   "are shorthands for the sweep's fields, --data-dir for the base's.")
    add_arguments(p)
    p.set_defaults(func=cmd_sweep)


def add_arguments(p) -> None:
    add_config_arguments(p, SweepConfig, "configs/sweeps/*.yaml", required=True,
                         overrides="SweepConfig fields, or TrainConfig fields of the base")
    add_config_flags(p, SweepRunOptions)
    add_config_flags(p, TrainConfig, ["data_dir"])
    add_config_flags(p, SweepConfig)


def load_sweep(args) -> SweepConfig:
    """The sweep of ``--config``, its ``key=value`` overrides, then its flags (``--data-dir`` into the base)."""
    from topro.sweep_config import load_sweep_config

    return load_sweep_config(args.config, args.overrides, flags=flag_values(args, SweepConfig),
                             data_dir=args.data_dir)


def cmd_sweep(args) -> int:
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Ray folds log lines that differ only in numbers ("[repeated 2x across cluster]"): the trials'
    # progress lines would show one trial's and hide the others'. Read when Ray is imported, below.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")

    from topro.precheck import check_sweep

    sweep = load_sweep(args)  # fails before Ray starts
    check_sweep(sweep)  # data, languages, models: once, here on the driver, before Ray or MLflow start
    import logging
    from pathlib import Path

    import topro

    logging.getLogger(__name__).info("sweep %s with topro from %s", sweep.name, Path(topro.__file__).parent)
    import ray

    from topro import tracking
    from topro.cluster.sweep import TrackingOutage, run_sweep

    ray_was_running = ray.is_initialized()
    try:
        summary = run_sweep(sweep, address=args.address, tracking_uri=args.tracking_uri, fresh=args.fresh,
                            config_path=args.config)
    except TrackingOutage as err:  # the trials are done and kept; only MLflow is missing
        print(f"topro sweep: {err}", file=sys.stderr)
        return 3
    if not ray_was_running and ray.is_initialized():
        # Workers' forwarded log lines arrive late: stopping the Ray this command started ends the
        # forwarding, so none prints after (and interleaves with) the summary below.
        ray.shutdown()
    if summary["interrupted"]:
        print(f"topro sweep: stopped by signal {summary['signal']}: Tune saved the sweep's state, the MLflow runs "
              f"are marked KILLED; rerun the same command to resume it ({summary['total_trials']} trials)",
              file=sys.stderr)
        return 128 + summary["signal"]
    sys.stdout.write("\n" + summary["report"] + "\n")
    for reg in summary["registered"]:
        print(f"registered {reg['uri']} (version {reg['version']}, English dev {reg['dev_score']:.4f})")
    done = sum(t.status != "ERROR" for t in summary["trials"])
    print(f"sweep {summary['name']}: {done}/{len(summary['trials'])} trials finished"
          f"{' (resumed)' if summary['resumed'] else ''}, {len(summary['selected'])} evaluated, "
          f"{summary['wall_seconds']:.0f}s; MLflow parent run {summary['parent_run_id']} in experiment "
          f"{summary['experiment']!r} at {summary['tracking_uri']}")
    uri = summary["tracking_uri"]
    if uri.startswith("sqlite:"):
        print(f"compare the runs: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open "
              f"{tracking.ui_link(summary['experiment_id'])}")
    if args.summary:
        atomic.write_json(args.summary, summary_json(summary), "sweep_summary", default=str)
    failed = [t for t in summary["trials"] if t.status == "ERROR"]
    if failed:
        print(f"{len(failed)} trials failed: {summary.get('failure_advice', '')}", file=sys.stderr)
    return 1 if failed else 0


def summary_json(summary: dict) -> dict:
    trials = [{"trial_id": t.trial_id, "params": t.params, "status": t.status, "dev_score": t.dev_score,
               "checkpoint": t.checkpoint, "run_id": t.run_id,
               "average": (t.record or {}).get("average")} for t in summary["trials"]]
    return {**{k: v for k, v in summary.items() if k not in ("trials", "selected")}, "trials": trials,
            "selected": [t.trial_id for t in summary["selected"]]}
