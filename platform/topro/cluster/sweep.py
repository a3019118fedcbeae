"""Sweeps, end to end: Ray Tune trials, then parallel per-language evaluation, registration and a report.

This module is the sweep's driver, top to bottom (``run_sweep``); each step lives in its own module:

- ``sweep_tune``: the Tune wiring (each trial's trainable, the search space, the scheduler, the Tuner);
- ``sweep_tracking``: the MLflow bookkeeping (the parent run, one child run per trial, evaluations);
- ``topro.sweep_selection``: which trials win, in plain Python: the learning rate (``select_over``) is
  chosen on mean English dev over seeds per compared setting, the champion per task and method likewise;
- ``topro.cluster.evaluation``: the chosen trials' best checkpoints evaluated on every language in parallel;
- ``sweep_registry``: the champion per task and method registered in MLflow under an alias.

The report table is written to the parent run. State lives under ``<storage_path>/<name>``: rerunning
the same sweep resumes it (Tune restores finished trials instead of redoing them; trials already
evaluated are not evaluated again).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from topro import atomic
from topro import tracking
from topro.cluster.sweep_faults import kill_driver_if_asked, note_driver_pid
from topro.cluster.sweep_registry import register_champions
from topro.cluster.sweep_tracking import (SPOOL_FILE, TRACKING_OUTAGE_WAIT_S, MlflowTrialCallback,  # noqa: F401
                                          TrackingOutage, TrialSpool, absolute_tracking_uri, close_parent,
                                          close_stopped_sweep, close_trial_runs, finish_sweep_run,
                                          log_trial_evaluation, logged_evaluation, sweep_params)
from topro.cluster.sweep_tune import build_tuner, check_trial_fits, graceful_stop, trial_outcomes
from topro.config import ConfigError
from topro.sweep_config import (SweepConfig, evaluation_max_tokens_per_batch, grid_size, sweep_to_dict,
                                trial_train_config)
from topro.sweep_selection import TrialOutcome, select_trials

# TrackingOutage is what `topro sweep` catches. MlflowTrialCallback and TrialSpool must stay importable from
# here: Tune pickles the callback into its experiment state, and a sweep started before they moved to
# sweep_tracking names them under this module when it resumes.

log = logging.getLogger(__name__)

STATE_FILE = "topro_sweep.json"
# Sweep fields that decide which trials run: a resumed sweep must have the same ones.
TRIAL_FIELDS = ("base", "search_space", "search", "num_samples", "scheduler", "grace_period", "reduction_factor",
                "max_t", "metric")
# Errors a rerun cannot cure: the configuration or the data must change first.
NOT_TRANSIENT = ("ConfigError", "DataFormatError", "FormatError", "ValueError", "TypeError", "KeyError",
                 "FileNotFoundError")


def run_sweep(sweep: SweepConfig, *, address: str | None = None, tracking_uri: str | None = None,
              fresh: bool = False, config_path: str | None = None) -> dict[str, Any]:
    """Run (or resume) ``sweep`` end to end; returns a summary (parent run id, trials, report).

    One driver per sweep: a second ``topro sweep`` of the same name and storage is refused (``RunLocked``),
    by a lock beside the sweep's folder (``--fresh`` moves the folder aside)."""
    if "://" not in sweep.storage_path:
        storage = Path(sweep.storage_path).expanduser().resolve()
        with atomic.RunLock(storage, f"topro sweep {sweep.name!r}", file_name=f".{sweep.name}.topro.lock"):
            return run_sweep_locked(sweep, address=address, tracking_uri=tracking_uri, fresh=fresh,
                                    config_path=config_path)
    return run_sweep_locked(sweep, address=address, tracking_uri=tracking_uri, fresh=fresh, config_path=config_path)


def run_sweep_locked(sweep: SweepConfig, *, address: str | None, tracking_uri: str | None, fresh: bool,
                     config_path: str | None) -> dict[str, Any]:
    from topro.cluster.runtime import init_ray

    started = time.perf_counter()
    uri = tracking.configure(absolute_tracking_uri(tracking_uri))
    experiment_dir = prepare_experiment_dir(sweep, fresh)
    state_file = experiment_dir / STATE_FILE
    state = check_resumable(state_file, sweep) if state_file.is_file() else {}
    note_driver_pid()  # for fault injection only
    init_ray(address)
    check_trial_fits(sweep)
    check_sweep_storage(sweep, experiment_dir)
    experiment = sweep.experiment or f"topro-sweep-{sweep.name}"
    parent = tracking.start_sweep_run(experiment, sweep.name, sweep_params(sweep, config_path),
                                      run_id=state.get("parent_run_id"), artifact_location=sweep.artifact_location)
    TrialSpool(experiment_dir / SPOOL_FILE).replay(force=True)  # what an earlier run could not write
    atomic.write_json(state_file, {"config": sweep_to_dict(sweep), "parent_run_id": parent, "tracking_uri": uri,
                                   "experiment": experiment}, "sweep_state", default=str)
    summary = {"name": sweep.name, "parent_run_id": parent, "experiment": experiment, "tracking_uri": uri,
               "experiment_dir": str(experiment_dir),
               "experiment_id": tracking.mlflow_client().get_run(parent).info.experiment_id}
    try:
        tuner, resumed = build_tuner(sweep, experiment_dir, [MlflowTrialCallback(uri, parent, sweep,
                                                                                 str(experiment_dir))])
        with graceful_stop() as stopped:
            results = tuner.fit()
        # Trial records MLflow did not take during the trials go in now (selection and evaluation need them).
        TrialSpool(experiment_dir / SPOOL_FILE).flush(TRACKING_OUTAGE_WAIT_S)
        train_seconds = time.perf_counter() - started
        if stopped.is_set():
            # Tune saved its state; the trial that was running counts as finished in `results`, so the
            # state (not this run's results) decides what a rerun does. Nothing is evaluated yet.
            log.warning("sweep %s stopped; rerun the same command to resume it", sweep.name)
            close_stopped_sweep(parent)
            return {**summary, "resumed": resumed, "interrupted": True, "signal": getattr(stopped, "signum", 2),
                    "total_trials": grid_size(sweep),
                    "trials": [], "selected": [], "registered": [], "report": "",
                    "wall_seconds": time.perf_counter() - started}
        outcome = conclude_sweep(sweep, results, parent, experiment_dir, address, started, train_seconds)
    except KeyboardInterrupt:
        close_parent(parent, "KILLED")
        raise
    except BaseException:
        close_parent(parent, "FAILED")
        raise
    return {**summary, "resumed": resumed, "interrupted": False, **outcome,
            "wall_seconds": time.perf_counter() - started}


def conclude_sweep(sweep: SweepConfig, results, parent: str, experiment_dir: Path, address: str | None,
                   started: float, train_seconds: float) -> dict[str, Any]:
    """After the trials: close their runs, select, evaluate, register, report and close the parent run."""
    from topro.sweep_report import sweep_report

    outcomes = trial_outcomes(results, sweep, experiment_dir)
    close_trial_runs(parent, sweep, outcomes, experiment_dir)
    failed = [o.trial_id for o in outcomes if o.status == "ERROR"]
    advice = failure_advice([r.error for r in results if r.error is not None]) if failed else ""
    if failed:
        log.warning("sweep %s: trials %s failed; the report covers the others (%s)", sweep.name, failed, advice)
    selected = select_trials(sweep, outcomes)
    eval_seconds = evaluate_trials(sweep, selected, address)
    registered = register_champions(sweep, selected)
    report = sweep_report(parent, log_artifacts=True)
    finish_sweep_run(parent, {"trials": len(outcomes), "trials_failed": len(failed),
                              "trials_evaluated": len(selected), "train_wall_seconds": train_seconds,
                              "eval_wall_seconds": eval_seconds, "wall_seconds": time.perf_counter() - started},
                     failed=bool(failed))
    return {"trials": outcomes, "selected": selected, "failure_advice": advice, "registered": registered,
            "report": report}


def evaluate_trials(sweep: SweepConfig, trials: list[TrialOutcome], address: str | None) -> float:
    """Zero-shot evaluation of the trials' checkpoints on every language, in parallel; logged to their runs."""
    from topro.cluster.evaluation import EvaluationJob, evaluate_checkpoints_parallel
    from topro.evaluate import resolve_languages

    base = trial_train_config(sweep, {})
    langs = sweep.eval_langs or base.eval_langs or ["all"]
    max_sentences = sweep.max_sentences if sweep.max_sentences is not None else base.max_sentences
    todo, wanted_langs = [], {}
    for t in trials:
        available = resolve_languages(t.config.task, "all", base.data_dir, sweep.eval_split)
        chosen = available if langs == ["all"] else [lang for lang in langs if lang in available]
        missing = sorted(set(langs) - set(available) - {"all"})
        if missing:  # a multi-task sweep names languages some tasks have no data for
            log.warning("%s: no %s data for %s; evaluating the other %d languages", t.config.task,
                        sweep.eval_split, missing, len(chosen))
        wanted_langs[t.trial_id] = tuple(chosen)
        t.record = logged_evaluation(t.run_id, wanted_langs[t.trial_id])
        if t.record is None or t.record.get("max_sentences") != max_sentences:
            todo.append(t)
    start = time.perf_counter()
    if todo:
        jobs = [EvaluationJob(t.checkpoint, wanted_langs[t.trial_id], t.config.task) for t in todo]
        records = evaluate_checkpoints_parallel(jobs, data_dir=base.data_dir, split=sweep.eval_split,
                                                max_sentences=max_sentences, viterbi=base.viterbi,
                                                device=base.device, dtype=base.dtype, num_workers=sweep.eval_workers,
                                                cpus_per_worker=sweep.eval_cpus_per_worker, address=address,
                                                max_tokens_per_batch=evaluation_max_tokens_per_batch(sweep))
        for t, record in zip(todo, records):
            log_trial_evaluation(sweep, t, record, max_sentences)
            kill_driver_if_asked("evaluated")
    seconds = time.perf_counter() - start
    log.info("evaluated %d checkpoints in %.1fs (%d already evaluated)", len(todo), seconds, len(trials) - len(todo))
    return seconds


def failure_advice(errors: list[BaseException]) -> str:
    """What to do about failed trials: fix the input for a configuration or data error, else rerun."""
    text = " ".join(f"{type(e).__name__}: {e}" for e in errors)
    named = [name for name in NOT_TRANSIENT if f"{name}:" in text]
    if named:
        return (f"they failed with {named[0]}, which a rerun does not cure: see the trial's error above, fix the "
                f"configuration or data, then rerun the same command (finished trials are kept)")
    return "rerun the same command to retry them; finished trials are kept"


# --- the sweep's folder ----------------------------------------------------------------------------------------

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


def check_sweep_storage(sweep: SweepConfig, experiment_dir: Path) -> None:
    """Before any trial: the sweep's folder, and a file-based artifact location, are shared by every node.

    Trials write their checkpoints and state under ``<storage_path>/<name>`` from whichever node they run
    on, and the driver reads them back; MLflow artifacts are read by serving replicas anywhere."""
    from topro.cluster.storage import check_artifact_location, check_storage

    check_storage(str(experiment_dir), f"sweep {sweep.name!r}: storage_path")
    location = sweep.artifact_location
    if location and not location.startswith(("mlflow-artifacts:", "http://", "https://")):
        check_artifact_location(location, f"sweep {sweep.name!r}: artifact_location")
