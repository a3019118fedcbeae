"""Sweeps: Ray Tune over training configs, then parallel per-language evaluation, MLflow and a report.

The Ray 2.6x (Train V2) pattern: each Tune trial runs a small *driver*
function that builds a ``TorchTrainer`` for its config and fits it; a
``TuneReportCallback`` forwards every English dev evaluation to Tune (for
ASHA and the results table). A Tune callback on the driver process writes
every trial into MLflow as a child run of the sweep's parent run.

After the trials: the learning rate (``select_over``) is chosen on English dev
per compared setting, the chosen trials' best checkpoints are evaluated on
every language in parallel (``topro.cluster.evaluation``), their results
logged to their runs, the best checkpoint per task and method registered with
an alias, and the report table written to the parent run.

State lives under ``<storage_path>/<name>``: rerunning the same sweep resumes
it (Tune restores finished trials instead of redoing them; trials already
evaluated are not evaluated again).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from topro import tracking
from topro.config import ConfigError, TrainConfig, to_dict
from topro.data import get_task
from topro.metrics import resolve_selection_metric
from topro.sweep_config import SweepConfig, dimensions, grid_size, sweep_to_dict, trial_train_config

log = logging.getLogger(__name__)

STATE_FILE = "topro_sweep.json"
SCORE = "dev_score"
BEST_SCORE = "best_dev_score"
# Sweep fields that decide which trials run: a resumed sweep must have the same ones.
# Fault injection for tests (tests/test_sweep_resume.py): "<point>" SIGKILLs the sweep's driver process the
# first time the point is reached: "report" (a trial's Train run registered a checkpoint, Tune has not yet
# seen its result), "fit" (a trial's TorchTrainer is about to start), "evaluated" (the first checkpoint's
# evaluation is logged, the others not yet), "registered" (a champion is registered, the report not yet).
KILL_DRIVER_ENV = "TOPRO_TEST_KILL_SWEEP_DRIVER_AT"
DRIVER_PID_ENV = "TOPRO_SWEEP_DRIVER_PID"
TRIAL_FIELDS = ("base", "search_space", "search", "num_samples", "scheduler", "grace_period", "reduction_factor",
                "max_t", "metric")


# --- inside each trial ---------------------------------------------------------------------------------------

def kill_driver_if_asked(point: str) -> None:
    """SIGKILL the sweep's driver at ``point`` when ``$TOPRO_TEST_KILL_SWEEP_DRIVER_AT`` names it (tests)."""
    if os.environ.get(KILL_DRIVER_ENV) != point or not os.environ.get(DRIVER_PID_ENV):
        return
    log.warning("fault injection: killing the sweep driver (pid %s) at %r", os.environ[DRIVER_PID_ENV], point)
    os.kill(int(os.environ[DRIVER_PID_ENV]), signal.SIGKILL)
    time.sleep(5)  # this process goes down with Ray's; do not carry on meanwhile


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
    from topro.cluster.trainer import build_trainer

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
    copy_best_export(result, Path(cfg.output_dir) / "checkpoint")
    write_placement(Path(cfg.output_dir), result)


PLACEMENT_FILE = "placement.json"


def write_placement(trial_dir: Path, result) -> None:
    """Where the trial ran: its driver's node and each Train worker's (``trials/<id>/placement.json``)."""
    from topro.cluster.runtime import node_name

    workers = (result.return_value or {}).get("workers") or []
    (trial_dir / PLACEMENT_FILE).write_text(json.dumps({"trial_node": node_name(), "workers": workers}, indent=2))


def placement_tags(trial_dir: Path) -> dict[str, str]:
    """MLflow tags naming the trial's nodes (empty if the trial wrote no placement)."""
    path = trial_dir / PLACEMENT_FILE
    if not path.is_file():
        return {}
    placement = json.loads(path.read_text())
    return {"topro.trial_node": placement["trial_node"],
            "topro.worker_nodes": ",".join(w["node"] for w in placement["workers"])}


def copy_best_export(result, target: Path) -> None:
    """A stable local copy of the trial's best export: Train rotates its checkpoints, MLflow logs from here."""
    import pyarrow.fs

    from topro.cluster.trainer import best_checkpoint_path

    export = best_checkpoint_path(result)
    if export is None:
        raise RuntimeError(f"run {result.path} reported no improved checkpoint")
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    pyarrow.fs.copy_files(export, str(target), source_filesystem=result.checkpoint.filesystem,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())


# --- on the sweep driver ------------------------------------------------------------------------------------

SPOOL_FILE = "mlflow_spool.jsonl"
SPOOL_RETRY_S = 10.0
TRACKING_OUTAGE_WAIT_S = float(os.environ.get("TOPRO_TRACKING_OUTAGE_WAIT_S", 600))
"""After the trials, how long the driver waits for an unreachable MLflow before it stops (the spool keeps
everything for the next run)."""


class TrackingOutage(RuntimeError):
    """MLflow stayed unreachable: what could not be written is kept in the spool file."""


class TrialSpool:
    """Trial-run writes MLflow did not take (server down or hung), kept in order in a JSON-lines file beside
    the sweep's state and replayed once MLflow answers again, or by the next run of the sweep.

    An entry is ``{"op": "start" | "metrics" | "end", "parent": ..., "trial_id": ..., "run_name": ..., ...}``;
    it names the trial, not the run, so a run that could not even be created is created on replay.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.first_error: str | None = None
        self.next_try = 0.0
        self.runs: dict[tuple[str, str], str] = {}

    def pending(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, entry: dict[str, Any]) -> None:
        """Apply ``entry`` now if nothing is waiting before it and MLflow answers; else keep it."""
        if not self.path.is_file():
            start = time.monotonic()
            try:
                self.apply(entry)
                return
            except Exception as err:
                self._failed(err, time.monotonic() - start)
        with self.path.open("a") as out:
            out.write(json.dumps({**entry, "error": self.first_error}, default=str) + "\n")
        self.replay()

    def replay(self, force: bool = False) -> bool:
        """Write what is kept, in order; True when nothing is left. Tries at most every ``SPOOL_RETRY_S``."""
        entries = self.pending()
        if not entries:
            return True
        if not force and time.monotonic() < self.next_try:
            return False
        start = time.monotonic()
        for done, entry in enumerate(entries):
            try:
                self.apply(entry)
            except Exception as err:
                self._failed(err, time.monotonic() - start)
                self.path.write_text("".join(json.dumps(e, default=str) + "\n" for e in entries[done:]))
                return False
        self.path.unlink()
        log.warning("MLflow answers again: wrote the %d kept trial records", len(entries))
        return True

    def flush(self, budget_s: float) -> None:
        """Replay until nothing is left, for at most ``budget_s``; then ``TrackingOutage`` naming the first error."""
        deadline = time.monotonic() + budget_s
        while not self.replay(force=True):
            if time.monotonic() >= deadline:
                kept = self.pending()
                first = next((e["error"] for e in kept if e.get("error")), self.first_error)
                raise TrackingOutage(f"MLflow did not answer for {budget_s:.0f}s (first error: {first}); "
                                     f"{len(kept)} trial records are kept in {self.path} and written when the same "
                                     "sweep is run again")
            time.sleep(min(SPOOL_RETRY_S, max(0.0, deadline - time.monotonic())))

    def _failed(self, err: BaseException, seconds: float) -> None:
        text = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        if self.first_error is None:
            self.first_error = text
            log.warning("MLflow write failed after %.1fs (%s); keeping trial records in %s until it answers",
                        seconds, text, self.path)
        else:
            log.info("MLflow still unreachable (another try took %.1fs)", seconds)
        self.next_try = time.monotonic() + SPOOL_RETRY_S

    def apply(self, entry: dict[str, Any]) -> None:
        key = (entry["parent"], entry["trial_id"])
        if entry["op"] == "start" or key not in self.runs:
            self.runs[key] = tracking.trial_run(entry["parent"], entry["trial_id"], entry["run_name"],
                                                entry.get("params"), reopen=entry["op"] != "end")
        run_id = self.runs[key]
        if entry["op"] == "metrics":
            tracking.log_metrics(run_id, entry["metrics"], step=entry["step"])
        elif entry["op"] == "end":
            tracking.end_run(run_id, entry["status"])


class MlflowTrialCallback(tune.Callback):
    """One MLflow child run per trial under the sweep's parent run; closes runs Tune stops.

    Never raises into Tune and never blocks it for long: a write MLflow does not take goes to the sweep's
    ``TrialSpool`` and is replayed later (the driver flushes it after the trials)."""

    def __init__(self, tracking_uri: str, parent_run_id: str, sweep: SweepConfig, experiment_dir: str):
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.sweep = sweep
        self.experiment_dir = experiment_dir
        self.spool = TrialSpool(Path(experiment_dir) / SPOOL_FILE)

    def setup(self, **info):
        tracking.configure(self.tracking_uri)

    def _write(self, trial, op: str, **fields) -> None:
        entry = {"op": op, "parent": self.parent_run_id, "trial_id": trial.trial_id,
                 "run_name": trial_run_name(self.sweep, trial.config), **fields}
        self.spool.write(entry)

    def on_trial_start(self, iteration, trials, trial, **info):
        cfg = trial_config(self.sweep, trial.config, self.experiment_dir, trial.trial_id)
        self._write(trial, "start", params={**to_dict(cfg), "trial_id": trial.trial_id})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = tracking.training_metrics(result)
        step = int(result.get("step", result.get("training_iteration", 0)) or 0)
        self._write(trial, "metrics", metrics=metrics, step=step)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write(trial, "end", status="FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write(trial, "end", status="FAILED")

    def __getstate__(self):  # pickled into the experiment state; run ids are found again by tag
        state = dict(self.__dict__)
        state["spool"] = TrialSpool(self.spool.path)
        return state

    def __setstate__(self, state):  # also a callback pickled by an earlier version (it had no spool)
        state.pop("runs", None)
        self.__dict__.update(state)
        if "spool" not in state:
            self.spool = TrialSpool(Path(self.experiment_dir) / SPOOL_FILE)


def trial_run_name(sweep: SweepConfig, params: dict[str, Any]) -> str:
    parts = [f"{k}={_short(v)}" for k, v in params.items()]
    return f"{sweep.name}: " + ", ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return Path(text).name if "/" in text else text


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


@dataclass
class TrialOutcome:
    """One trial after Tune: its params, status, English dev score and best checkpoint."""

    trial_id: str
    params: dict[str, Any]
    config: TrainConfig
    status: str
    dev_score: float | None
    checkpoint: str | None
    run_id: str | None = None
    record: dict[str, Any] | None = field(default=None, repr=False)


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


# Errors a rerun cannot cure: the configuration or the data must change first.
NOT_TRANSIENT = ("ConfigError", "DataFormatError", "FormatError", "ValueError", "TypeError", "KeyError",
                 "FileNotFoundError")


def failure_advice(errors: list[BaseException]) -> str:
    """What to do about failed trials: fix the input for a configuration or data error, else rerun."""
    text = " ".join(f"{type(e).__name__}: {e}" for e in errors)
    named = [name for name in NOT_TRANSIENT if f"{name}:" in text]
    if named:
        return (f"they failed with {named[0]}, which a rerun does not cure: see the trial's error above, fix the "
                f"configuration or data, then rerun the same command (finished trials are kept)")
    return "rerun the same command to retry them; finished trials are kept"


def compared_fields(sweep: SweepConfig) -> list[str]:
    """Searched fields the report compares (everything but ``select_over`` and ``seed``)."""
    return [d.field for d in dimensions(sweep) if d.field not in sweep.select_over and d.field != "seed"]


def setting_label(sweep: SweepConfig, params: dict[str, Any]) -> str:
    """How a trial appears in the report: the method, plus other compared fields that vary (not the task)."""
    fields = [f for f in compared_fields(sweep) if f not in ("task", "method")]
    method = params.get("method", sweep.base.get("method"))
    extra = ", ".join(f"{f}={_short(params[f])}" for f in fields if f in params)
    return f"{method} ({extra})" if extra else str(method)


def select_trials(sweep: SweepConfig, outcomes: list[TrialOutcome]) -> list[TrialOutcome]:
    """Per compared setting, the ``select_over`` values with the best mean English dev score; all their seeds."""
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


def check_resumable(state_file: Path, sweep: SweepConfig) -> dict[str, Any]:
    """The stored state of this sweep; refuses to resume with different trials."""
    state = json.loads(state_file.read_text())
    old, new = state["config"], sweep_to_dict(sweep)
    changed = [k for k in TRIAL_FIELDS if json.dumps(old.get(k), sort_keys=True) != json.dumps(new.get(k), sort_keys=True)]
    if changed:
        raise ConfigError(f"sweep {sweep.name!r} at {state_file.parent} was started with different {changed}; "
                          f"rerun with --fresh to start it again, or give it another name")
    return state


def prepare_experiment_dir(sweep: SweepConfig, fresh: bool) -> Path:
    if "://" in sweep.storage_path:
        raise ConfigError(f"sweep {sweep.name!r}: storage_path {sweep.storage_path!r}: a sweep keeps its state in a "
                          "folder (on a cluster, one that every node mounts at the same path); object-store URIs "
                          "are taken by a training run's storage_path, not by sweeps yet")
    experiment_dir = (Path(sweep.storage_path).expanduser() / sweep.name).resolve()
    if fresh and experiment_dir.exists():
        aside = experiment_dir.with_name(f"{sweep.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        experiment_dir.rename(aside)
        log.info("--fresh: moved the previous state of sweep %s to %s", sweep.name, aside)
    experiment_dir.mkdir(parents=True, exist_ok=True)
    return experiment_dir


def sweep_params(sweep: SweepConfig, config_path: str | None) -> dict[str, Any]:
    params = {k: v for k, v in sweep_to_dict(sweep).items() if k != "base"}
    params["base"] = sweep.base
    params["config_file"] = config_path or ""
    return params


def run_sweep(sweep: SweepConfig, *, address: str | None = None, tracking_uri: str | None = None,
              fresh: bool = False, config_path: str | None = None) -> dict[str, Any]:
    """Run (or resume) ``sweep`` end to end; returns a summary (parent run id, trials, report)."""
    from topro.cluster.runtime import init_ray

    started = time.perf_counter()
    uri = tracking.configure(absolute_tracking_uri(tracking_uri))
    experiment_dir = prepare_experiment_dir(sweep, fresh)
    state_file = experiment_dir / STATE_FILE
    state = check_resumable(state_file, sweep) if state_file.is_file() else {}
    os.environ[DRIVER_PID_ENV] = str(os.getpid())  # for fault injection only (a local Ray's workers inherit it)
    ray = init_ray(address)
    check_trial_fits(sweep)
    check_sweep_storage(sweep, experiment_dir)
    experiment = sweep.experiment or f"topro-sweep-{sweep.name}"
    parent = tracking.start_sweep_run(experiment, sweep.name, sweep_params(sweep, config_path),
                                      run_id=state.get("parent_run_id"), artifact_location=sweep.artifact_location)
    TrialSpool(experiment_dir / SPOOL_FILE).replay(force=True)  # what an earlier run could not write
    state_file.write_text(json.dumps({"config": sweep_to_dict(sweep), "parent_run_id": parent, "tracking_uri": uri,
                                      "experiment": experiment}, indent=2, default=str))
    try:
        trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep, experiment_dir=str(experiment_dir)),
                                        {"CPU": sweep.driver_cpus})
        resumed = tune.Tuner.can_restore(str(experiment_dir))
        if resumed:
            log.info("resuming sweep %s from %s (finished trials are not run again)", sweep.name, experiment_dir)
            # Errored trials are resumed, not restarted: they keep their trial id (and MLflow run), and their
            # TorchTrainer, under the same name, continues from its last Train checkpoint if it has one.
            tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            max_concurrent = concurrent_trials(sweep)
            log.info("sweep %s: %s search, %s scheduler, up to %d trials at once (%.1f CPUs each of %.0f)",
                     sweep.name, sweep.search, sweep.scheduler, max_concurrent, trial_cpus(sweep),
                     ray.cluster_resources().get("CPU", 0))
            tuner = tune.Tuner(
                trainable, param_space=param_space(sweep),
                tune_config=tune.TuneConfig(metric=sweep.metric, mode="max", scheduler=scheduler(sweep),
                                            num_samples=sweep.num_samples, max_concurrent_trials=max_concurrent),
                run_config=tune.RunConfig(name=sweep.name, storage_path=str(experiment_dir.parent),
                                          callbacks=[MlflowTrialCallback(uri, parent, sweep, str(experiment_dir))],
                                          failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                          verbose=1))
        with graceful_stop() as stopped:
            results = tuner.fit()
        # Trial records MLflow did not take during the trials go in now (selection and evaluation need them).
        TrialSpool(experiment_dir / SPOOL_FILE).flush(TRACKING_OUTAGE_WAIT_S)
        train_seconds = time.perf_counter() - started
        if stopped.is_set():
            # Tune saved its state; the trial that was running counts as finished in `results`, so the
            # state (not this run's results) decides what a rerun does. Nothing is evaluated yet.
            log.warning("sweep %s stopped; rerun the same command to resume it", sweep.name)
            for run in tracking.child_runs(parent):
                if run.info.status == "RUNNING":  # stopped mid-trial: reopened when the trial resumes
                    tracking.end_run(run.info.run_id, "KILLED")
            tracking.end_run(parent, "KILLED")
            return {"name": sweep.name, "parent_run_id": parent, "experiment": experiment, "tracking_uri": uri,
                    "experiment_dir": str(experiment_dir), "resumed": resumed, "interrupted": True,
                    "total_trials": grid_size(sweep), "trials": [], "selected": [], "registered": [],
                    "report": "", "wall_seconds": time.perf_counter() - started}
        outcomes = trial_outcomes(results, sweep, experiment_dir)
        for o in outcomes:
            o.run_id = tracking.trial_run(parent, o.trial_id, trial_run_name(sweep, o.params), reopen=False)
            run = tracking.mlflow_client().get_run(o.run_id)
            status = "FAILED" if o.status == "ERROR" else "FINISHED"
            for key, value in placement_tags(experiment_dir / "trials" / o.trial_id).items():
                tracking.mlflow_client().set_tag(o.run_id, key, value)
            if run.info.status != status:
                tracking.end_run(o.run_id, status)
        close_stale_trial_runs(parent, {o.run_id for o in outcomes})
        failed = [o.trial_id for o in outcomes if o.status == "ERROR"]
        advice = failure_advice([r.error for r in results if r.error is not None]) if failed else ""
        if failed:
            log.warning("sweep %s: trials %s failed; the report covers the others (%s)", sweep.name, failed, advice)
        selected = select_trials(sweep, outcomes)
        eval_seconds = evaluate_trials(sweep, selected, address)
        registered = register_champions(sweep, selected)
        from topro.sweep_report import sweep_report

        report = sweep_report(parent, log_artifacts=True)
        tracking.log_metrics(parent, {"trials": len(outcomes), "trials_failed": len(failed),
                                      "trials_evaluated": len(selected), "train_wall_seconds": train_seconds,
                                      "eval_wall_seconds": eval_seconds,
                                      "wall_seconds": time.perf_counter() - started})
        tracking.end_run(parent, "FAILED" if failed else "FINISHED")
    except KeyboardInterrupt:
        _close_parent(parent, "KILLED")
        raise
    except BaseException:
        _close_parent(parent, "FAILED")
        raise
    return {"name": sweep.name, "parent_run_id": parent, "experiment": experiment, "tracking_uri": uri,
            "experiment_dir": str(experiment_dir), "resumed": resumed, "interrupted": False,
            "trials": outcomes, "selected": selected, "failure_advice": advice,
            "registered": registered, "report": report, "wall_seconds": time.perf_counter() - started}


def check_sweep_storage(sweep: SweepConfig, experiment_dir: Path) -> None:
    """Before any trial: the sweep's folder, and a file-based artifact location, are shared by every node.

    Trials write their checkpoints and state under ``<storage_path>/<name>`` from whichever node they run
    on, and the driver reads them back; MLflow artifacts are read by serving replicas anywhere."""
    from topro.cluster.storage import check_artifact_location, check_storage

    check_storage(str(experiment_dir), f"sweep {sweep.name!r}: storage_path")
    location = sweep.artifact_location
    if location and not location.startswith(("mlflow-artifacts:", "http://", "https://")):
        check_artifact_location(location, f"sweep {sweep.name!r}: artifact_location")


def _close_parent(parent_run_id: str, status: str) -> None:
    """Mark the parent run on the way out, without letting an unreachable MLflow hide the error that ended the
    sweep (the rerun reopens the run anyway)."""
    try:
        tracking.end_run(parent_run_id, status)
    except Exception as err:
        log.warning("could not mark the sweep's MLflow run %s %s: %s", parent_run_id, status,
                    f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")


def close_stale_trial_runs(parent_run_id: str, current: set[str]) -> None:
    """Mark KILLED the trial runs a killed driver left RUNNING that no trial of this sweep owns any more (a
    trial Tune had not yet saved in its state when the driver died starts afresh under another id)."""
    for run in tracking.child_runs(parent_run_id):
        if run.info.status == "RUNNING" and run.info.run_id not in current:
            log.info("trial run %s was left RUNNING by an earlier driver; marking it KILLED", run.info.run_id)
            tracking.end_run(run.info.run_id, "KILLED")


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


def absolute_tracking_uri(uri: str | None) -> str:
    """``sqlite:///relative.db`` made absolute, so every process of the sweep writes the same file."""
    resolved = tracking.tracking_uri(uri)
    match = re.fullmatch(r"sqlite:///(?!/)(.+)", resolved)
    if match:
        return f"sqlite:///{Path(match.group(1)).resolve()}"
    return resolved


def evaluate_trials(sweep: SweepConfig, trials: list[TrialOutcome], address: str | None) -> float:
    """Zero-shot evaluation of the trials' checkpoints on every language, in parallel; logged to their runs."""
    from topro.cluster.evaluation import EvaluationJob, evaluate_checkpoints_parallel
    from topro.evaluate import resolve_languages

    base = trial_train_config(sweep, {})
    langs = sweep.eval_langs or base.eval_langs or ["all"]
    max_sentences = sweep.max_eval_sentences if sweep.max_eval_sentences is not None else base.max_eval_sentences
    todo, wanted_langs = [], {}
    for t in trials:
        available = resolve_languages(t.config.task, "all", base.data_dir, sweep.eval_split)
        chosen = available if langs == ["all"] else [lang for lang in langs if lang in available]
        missing = sorted(set(langs) - set(available) - {"all"})
        if missing:  # a multi-task sweep names languages some tasks have no data for
            log.warning("%s: no %s data for %s; evaluating the other %d languages", t.config.task,
                        sweep.eval_split, missing, len(chosen))
        wanted_langs[t.trial_id] = tuple(chosen)
        wanted = ",".join(sorted(chosen))
        run = tracking.mlflow_client().get_run(t.run_id)
        t.record = tracking.load_evaluation(t.run_id) if run.data.tags.get(tracking.EVALUATED_TAG) == wanted else None
        if t.record is None or t.record.get("max_sentences") != max_sentences:
            todo.append(t)
    start = time.perf_counter()
    if todo:
        jobs = [EvaluationJob(t.checkpoint, wanted_langs[t.trial_id], t.config.task) for t in todo]
        records = evaluate_checkpoints_parallel(jobs, data_dir=base.data_dir, split=sweep.eval_split,
                                                max_sentences=max_sentences, viterbi=base.viterbi,
                                                device=base.device, dtype=base.dtype, num_workers=sweep.eval_workers,
                                                cpus_per_worker=sweep.eval_cpus_per_worker, address=address)
        for t, record in zip(todo, records):
            record.update(max_sentences=max_sentences, trial_id=t.trial_id, setting=setting_label(sweep, t.params),
                          seed=t.config.seed, learning_rate=t.config.learning_rate, dev_score=t.dev_score,
                          selection_metric=resolve_selection_metric(get_task(t.config.task),
                                                                    t.config.selection_metric))
            t.record = record
            workdir = Path(sweep.storage_path).expanduser().resolve() / sweep.name / "trials" / t.trial_id / "evaluation"
            tracking.log_evaluation(t.run_id, record, workdir)
            tracking.mlflow_client().set_tag(t.run_id, "topro.setting", record["setting"])
            # which Ray node scored each language (the full map is in the run's evaluation/eval.json)
            tracking.mlflow_client().set_tag(t.run_id, "topro.eval_nodes",
                                             ",".join(sorted(set(record.get("nodes", {}).values()))))
            kill_driver_if_asked("evaluated")
    seconds = time.perf_counter() - start
    log.info("evaluated %d checkpoints in %.1fs (%d already evaluated)", len(todo), seconds, len(trials) - len(todo))
    return seconds


def register_champions(sweep: SweepConfig, trials: list[TrialOutcome]) -> list[dict[str, Any]]:
    """Register the best evaluated checkpoint per task and method (chosen on English dev, not on the test languages)."""
    if not sweep.register_alias:
        return []
    best: dict[tuple[str, str], TrialOutcome] = {}
    for t in trials:
        key = (t.config.task, t.config.method)
        if t.record is not None and (key not in best or t.dev_score > best[key].dev_score):
            best[key] = t
    registered = []
    for (task, method), t in sorted(best.items()):
        name = tracking.registered_name(task, method)
        version = tracking.registered_version_of_run(name, t.run_id)
        if version is None:
            tracking.log_checkpoint(t.run_id, t.checkpoint)
            version = tracking.register_checkpoint(t.run_id, name, alias=sweep.register_alias,
                                                   description=f"best {task} {method} checkpoint of sweep {sweep.name} "
                                                               f"on English dev")
        else:
            tracking.mlflow_client().set_registered_model_alias(name, sweep.register_alias, version)
        tracking.mlflow_client().set_tag(t.run_id, "topro.registered", f"{name}/{version}@{sweep.register_alias}")
        log.info("registered %s version %s as @%s (trial %s, English dev %.4f)", name, version, sweep.register_alias,
                 t.trial_id, t.dev_score)
        kill_driver_if_asked("registered")
        registered.append({"name": name, "version": version, "alias": sweep.register_alias, "run_id": t.run_id,
                           "trial_id": t.trial_id, "dev_score": t.dev_score,
                           "uri": f"models:/{name}@{sweep.register_alias}"})
    return registered
