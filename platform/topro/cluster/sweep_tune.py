"""The sweep's Tune wiring: the trainable each trial runs, the search space, the scheduler, the Tuner.

The Ray 2.6x (Train V2) pattern: each Tune trial runs a small *driver* function (``run_trial``) that
builds a ``TorchTrainer`` for its config and fits it; a ``TuneReportCallback`` forwards every English dev
evaluation to Tune (for ASHA and the results table) under one name, ``dev_score``, whatever the task's
metric. After the trials, ``trial_outcomes`` reads Tune's results back into ``TrialOutcome`` records.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from topro import atomic
from topro.config import ConfigError, TrainConfig
from topro.cluster.sweep_faults import kill_driver_if_asked
from topro.data import get_task
from topro.metrics import resolve_selection_metric
from topro.sweep_config import SweepConfig, dimensions, trial_train_config
from topro.sweep_selection import TrialOutcome

log = logging.getLogger(__name__)

SCORE = "dev_score"
BEST_SCORE = "best_dev_score"
PLACEMENT_FILE = "placement.json"


# --- inside each trial ---------------------------------------------------------------------------------------

class SweepReportCallback(TuneReportCallback):
    """Forward Ray Train reports to Tune, adding the run's selection metric (English dev) under one name for any task."""

    def __init__(self, task_metric: str):
        super().__init__()
        self.task_metric = task_metric

    def after_report(self, run_context, metrics, checkpoint):
        renamed = [tune_metrics(m, self.task_metric) for m in metrics]
        if checkpoint is not None:
            kill_driver_if_asked("report")
        super().after_report(run_context, renamed, checkpoint)


def tune_metrics(metrics: dict[str, Any], task_metric: str) -> dict[str, Any]:
    """A Train result's metrics as ``SweepReportCallback`` hands them to Tune."""
    out = dict(metrics)
    if f"dev_{task_metric}" in out:
        out[SCORE] = out[f"dev_{task_metric}"]
    if f"best_dev_{task_metric}" in out:
        out[BEST_SCORE] = out[f"best_dev_{task_metric}"]
    return out


def trial_config(sweep: SweepConfig, params: dict[str, Any], experiment_dir: str, trial_id: str) -> TrainConfig:
    """A trial's full training config: unique run name and folders, no in-trial multilingual evaluation."""
    return trial_train_config(sweep, params, output_dir=str(Path(experiment_dir) / "trials" / trial_id),
                              run_name=f"{sweep.name}-{trial_id}", storage_path=str(Path(experiment_dir) / "train"),
                              eval_langs=[], progress=False)


def run_trial(params: dict[str, Any], sweep: SweepConfig, experiment_dir: str) -> None:
    """Tune trainable: build and fit one TorchTrainer for ``params`` (a Train V2 driver)."""
    from topro.cluster.trainer import build_trainer, copy_best_export

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(sweep, params, experiment_dir, trial_id)
    callback = SweepReportCallback(resolve_selection_metric(get_task(cfg.task), cfg.selection_metric))
    trainer = build_trainer(cfg, name=cfg.run_name, storage_path=cfg.storage_path, callbacks=[callback])
    kill_driver_if_asked("fit")
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    summary = result.return_value or {}
    resumed_at = summary.get("resumed_from_step")
    if resumed_at is not None and not [h for h in summary.get("history", []) if h["step"] > resumed_at]:
        # The driver died after this trial's last checkpoint but before Tune recorded its result: the
        # resumed Train run had nothing left to do and reported nothing, and a trial without a result
        # fails the whole Tune run ("did not include the specified metric"). Report the last one again.
        log.info("trial %s resumed at its final step %d; reporting its last result again", trial_id, resumed_at)
        metrics = tune_metrics(result.metrics or {}, get_task(cfg.task).metric)
        if result.checkpoint is not None:
            metrics["checkpoint_path"] = result.checkpoint.path
        tune.report(metrics)
    # A stable local copy of the best export: Train rotates its checkpoints, MLflow logs from here.
    copy_best_export(result, Path(cfg.output_dir) / "checkpoint")
    write_placement(Path(cfg.output_dir), result)


def write_placement(trial_dir: Path, result) -> None:
    """Where the trial ran: its driver's node and each Train worker's (``trials/<id>/placement.json``)."""
    from topro.cluster.runtime import node_name

    workers = (result.return_value or {}).get("workers") or []
    atomic.write_json(trial_dir / PLACEMENT_FILE, {"trial_node": node_name(), "workers": workers}, "trial_placement")


# --- the search and its resources ------------------------------------------------------------------------------

def param_space(sweep: SweepConfig) -> dict[str, Any]:
    space: dict[str, Any] = {}
    for dim in dimensions(sweep):
        values = list(dim.values)
        if dim.kind == "grid" and sweep.search == "grid":
            space[dim.field] = tune.grid_search(values)
        elif dim.kind in ("grid", "choice"):
            space[dim.field] = tune.choice(values)
        elif dim.kind == "uniform":
            space[dim.field] = tune.uniform(*values)
        elif dim.kind == "loguniform":
            space[dim.field] = tune.loguniform(*values)
        elif dim.kind == "randint":
            space[dim.field] = tune.randint(*values)
    return space


def trial_cpus(sweep: SweepConfig) -> float:
    """CPUs one trial holds: its driver plus its Train workers (the largest in the space)."""
    candidates = [trial_train_config(sweep, {})]
    for dim in dimensions(sweep):
        if dim.field in ("workers", "cpus_per_worker") and dim.discrete:
            candidates += [trial_train_config(sweep, {dim.field: v}) for v in dim.values]
    return sweep.driver_cpus + max(c.workers * c.cpus_per_worker for c in candidates)


def check_trial_fits(sweep: SweepConfig) -> None:
    """Refuse a trial the cluster cannot hold: Ray Train would wait for its worker group forever."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0.0)
    largest_node = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
    base = trial_train_config(sweep, {})
    if base.cpus_per_worker > largest_node or trial_cpus(sweep) > cpus:
        raise ConfigError(f"sweep {sweep.name!r}: a trial needs {trial_cpus(sweep):g} CPUs (driver_cpus "
                          f"{sweep.driver_cpus:g} + workers {base.workers} x cpus_per_worker {base.cpus_per_worker:g}) "
                          f"but the cluster has {cpus:g} (largest node {largest_node:g}); lower cpus_per_worker "
                          f"or workers")


def concurrent_trials(sweep: SweepConfig) -> int:
    """``max_concurrent_trials``, or as many trials as the cluster's CPUs hold."""
    import ray

    if sweep.max_concurrent_trials:
        return sweep.max_concurrent_trials
    return max(1, int(ray.cluster_resources().get("CPU", 0.0) // trial_cpus(sweep)))


def scheduler(sweep: SweepConfig):
    if sweep.scheduler == "fifo":
        return tune.schedulers.FIFOScheduler()
    def largest(name: str) -> int:
        values = [getattr(trial_train_config(sweep, {}), name)]
        values += [v for d in dimensions(sweep) if d.field == name and d.discrete for v in d.values]
        return max(v or 1 for v in values)

    # A trial reports once per English dev evaluation: evals_per_epoch times per epoch.
    max_t = sweep.max_t or largest("epochs") * largest("evals_per_epoch")
    return tune.schedulers.ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                         grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor)


# --- the Tuner -------------------------------------------------------------------------------------------------

def build_tuner(sweep: SweepConfig, experiment_dir: Path, callbacks: list) -> tuple[tune.Tuner, bool]:
    """The sweep's Tuner and whether it resumes: restored from ``experiment_dir`` when Tune saved state there
    (finished trials are not run again), else a new one with ``callbacks`` on the driver."""
    import ray

    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep, experiment_dir=str(experiment_dir)),
                                    {"CPU": sweep.driver_cpus})
    if tune.Tuner.can_restore(str(experiment_dir)):
        log.info("resuming sweep %s from %s (finished trials are not run again)", sweep.name, experiment_dir)
        # Errored trials are resumed, not restarted: they keep their trial id (and MLflow run), and their
        # TorchTrainer, under the same name, continues from its last Train checkpoint if it has one.
        return tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True), True
    max_concurrent = concurrent_trials(sweep)
    log.info("sweep %s: %s search, %s scheduler, up to %d trials at once (%.1f CPUs each of %.0f)",
             sweep.name, sweep.search, sweep.scheduler, max_concurrent, trial_cpus(sweep),
             ray.cluster_resources().get("CPU", 0))
    return tune.Tuner(
        trainable, param_space=param_space(sweep),
        tune_config=tune.TuneConfig(metric=sweep.metric, mode="max", scheduler=scheduler(sweep),
                                    num_samples=sweep.num_samples, max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=sweep.name, storage_path=str(experiment_dir.parent), callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                  verbose=1)), False


@contextlib.contextmanager
def graceful_stop():
    """Ctrl-C (SIGINT) or ``ray job stop`` (SIGTERM) during the trials: Tune stops cleanly and saves its
    state, so the same command resumes; a second signal stops at once. Yields an event set on a stop.

    Tune's own SIGINT handler does not say afterwards whether it fired, so ours does the noting and
    asks Tune to stop through SIGUSR1, which Tune handles the same way.
    """
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return

    def handler(signum, frame):
        tune_listens = signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        if stopped.is_set() or not tune_listens:
            raise KeyboardInterrupt
        stopped.signum = signum  # the exit status says which (128 + signal)
        stopped.set()
        log.warning("stop requested (signal %d): ending the running trials and saving the sweep's state", signum)
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield stopped
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if previous_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = previous_env


# --- after the trials ------------------------------------------------------------------------------------------

def _best_export_from_history(history) -> str | None:
    """Fallback when the trial driver did not finish (ASHA stopped it): its last improving checkpoint."""
    if history is None or "checkpoint_path" not in getattr(history, "columns", []):
        return None
    rows = history.dropna(subset=["checkpoint_path"])
    if "is_best" in rows:
        rows = rows[rows["is_best"] > 0]
    for path in reversed(list(rows["checkpoint_path"])):
        folder = Path(path) / "model"
        if (folder / "topro.json").is_file():
            return str(folder)
    return None


def trial_outcomes(results, sweep: SweepConfig, experiment_dir: Path) -> list[TrialOutcome]:
    """Tune's results as ``TrialOutcome``s: English dev score, the trial's best export, status."""
    outcomes = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or re.search(r"_([0-9a-f]+_\d{5})_", Path(result.path).name).group(1)
        history = result.metrics_dataframe
        score = None
        if history is not None and SCORE in getattr(history, "columns", []):
            values = [v for v in history[SCORE] if v == v]
            score = max(values) if values else None
            if "is_averaged" in history.columns and len(history) and history["is_averaged"].iloc[-1] == 1:
                score = float(history[SCORE].iloc[-1])  # selection: average_*: the exported weights' score
        export = experiment_dir / "trials" / trial_id / "checkpoint"
        checkpoint = str(export) if (export / "topro.json").is_file() else _best_export_from_history(history)
        status = "ERROR" if result.error else "TERMINATED"
        params = {k: v for k, v in (result.config or {}).items()}
        cfg = trial_config(sweep, params, str(experiment_dir), trial_id)
        outcomes.append(TrialOutcome(trial_id, params, cfg, status, score, checkpoint))
    return outcomes
