"""The sweep's MLflow bookkeeping: what is logged for the sweep's parent run, each trial and each evaluation.

One parent run per sweep (its config as params, totals as metrics, the report as artifacts), one nested
child run per trial (its training config as params, every English dev report as metrics, the nodes it ran
on as tags), and each chosen trial's multilingual evaluation logged to its run. Trial writes go through a
spool: a tracking server that is down or hung never stops the trials, and what it missed is written later.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from ray import tune

from topro import atomic
from topro import tracking
from topro.cluster.sweep_tune import PLACEMENT_FILE, trial_config
from topro.config import to_dict
from topro.data import get_task
from topro.metrics import resolve_selection_metric
from topro.sweep_config import SweepConfig, sweep_to_dict
from topro.sweep_selection import TrialOutcome, setting_label, short_value

log = logging.getLogger(__name__)

SPOOL_FILE = "mlflow_spool.jsonl"
SPOOL_RETRY_S = 10.0
TRACKING_OUTAGE_WAIT_S = float(os.environ.get("TOPRO_TRACKING_OUTAGE_WAIT_S", 600))
"""After the trials, how long the driver waits for an unreachable MLflow before it stops (the spool keeps
everything for the next run)."""


def absolute_tracking_uri(uri: str | None) -> str:
    """``sqlite:///relative.db`` made absolute, so every process of the sweep writes the same file."""
    resolved = tracking.tracking_uri(uri)
    match = re.fullmatch(r"sqlite:///(?!/)(.+)", resolved)
    if match:
        return f"sqlite:///{Path(match.group(1)).resolve()}"
    return resolved


def error_line(err: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (cut at ``limit``), for a warning about an MLflow call."""
    return f"{type(err).__name__}: {str(err).splitlines()[0][:limit] if str(err) else ''}"


# --- the parent run --------------------------------------------------------------------------------------------

def sweep_params(sweep: SweepConfig, config_path: str | None) -> dict[str, Any]:
    """The parent run's params: the sweep's fields, its base training config and the config file's path."""
    params = {k: v for k, v in sweep_to_dict(sweep).items() if k != "base"}
    params["base"] = sweep.base
    params["config_file"] = config_path or ""
    return params


def close_parent(parent_run_id: str, status: str) -> None:
    """Mark the parent run on the way out, without letting an unreachable MLflow hide the error that ended the
    sweep (the rerun reopens the run anyway)."""
    try:
        tracking.end_run(parent_run_id, status)
    except Exception as err:
        log.warning("could not mark the sweep's MLflow run %s %s: %s", parent_run_id, status, error_line(err, 200))


def close_stopped_sweep(parent_run_id: str) -> None:
    """A sweep stopped during its trials: the runs of trials stopped mid-way (reopened when they resume) and
    the parent run are marked KILLED."""
    for run in tracking.child_runs(parent_run_id):
        if run.info.status == "RUNNING":
            tracking.end_run(run.info.run_id, "KILLED")
    tracking.end_run(parent_run_id, "KILLED")


def finish_sweep_run(parent_run_id: str, totals: dict[str, float], failed: bool) -> None:
    """The sweep's totals (trial counts, wall seconds) on its parent run, then the run closed."""
    tracking.log_metrics(parent_run_id, totals)
    tracking.end_run(parent_run_id, "FAILED" if failed else "FINISHED")


# --- trial runs --------------------------------------------------------------------------------------------------

def trial_run_name(sweep: SweepConfig, params: dict[str, Any]) -> str:
    parts = [f"{k}={short_value(v)}" for k, v in params.items()]
    return f"{sweep.name}: " + ", ".join(parts)


def placement_tags(trial_dir: Path) -> dict[str, str]:
    """MLflow tags naming the trial's nodes (empty if the trial wrote no placement)."""
    path = trial_dir / PLACEMENT_FILE
    if not path.is_file():
        return {}
    placement = json.loads(path.read_text())
    return {"topro.trial_node": placement["trial_node"],
            "topro.worker_nodes": ",".join(w["node"] for w in placement["workers"])}


def close_trial_runs(parent_run_id: str, sweep: SweepConfig, outcomes: list[TrialOutcome],
                     experiment_dir: Path) -> None:
    """After the trials: each outcome gets its run (``run_id``), its placement tags and its final status; runs
    an earlier, killed driver left RUNNING for trials that no longer exist are marked KILLED."""
    client = tracking.mlflow_client()
    for o in outcomes:
        o.run_id = tracking.trial_run(parent_run_id, o.trial_id, trial_run_name(sweep, o.params), reopen=False)
        run = client.get_run(o.run_id)
        status = "FAILED" if o.status == "ERROR" else "FINISHED"
        for key, value in placement_tags(experiment_dir / "trials" / o.trial_id).items():
            client.set_tag(o.run_id, key, value)
        if run.info.status != status:
            tracking.end_run(o.run_id, status)
    close_stale_trial_runs(parent_run_id, {o.run_id for o in outcomes})


def close_stale_trial_runs(parent_run_id: str, current: set[str]) -> None:
    """Mark KILLED the trial runs a killed driver left RUNNING that no trial of this sweep owns any more (a
    trial Tune had not yet saved in its state when the driver died starts afresh under another id)."""
    for run in tracking.child_runs(parent_run_id):
        if run.info.status == "RUNNING" and run.info.run_id not in current:
            log.info("trial run %s was left RUNNING by an earlier driver; marking it KILLED", run.info.run_id)
            tracking.end_run(run.info.run_id, "KILLED")


# --- evaluations -------------------------------------------------------------------------------------------------

def logged_evaluation(run_id: str, langs: tuple[str, ...]) -> dict[str, Any] | None:
    """The evaluation record already logged to the run, if it covers exactly ``langs`` (a resumed sweep)."""
    run = tracking.mlflow_client().get_run(run_id)
    return tracking.load_evaluation(run_id) if run.data.tags.get(tracking.EVALUATED_TAG) == ",".join(sorted(langs)) \
        else None


def log_trial_evaluation(sweep: SweepConfig, trial: TrialOutcome, record: dict[str, Any],
                         max_sentences: int | None) -> None:
    """A trial's multilingual evaluation on its run: the record (with what identifies the trial in the report),
    its metrics and artifacts, and tags naming its setting and the Ray nodes that scored it."""
    record.update(max_sentences=max_sentences, trial_id=trial.trial_id, setting=setting_label(sweep, trial.params),
                  seed=trial.config.seed, learning_rate=trial.config.learning_rate, dev_score=trial.dev_score,
                  selection_metric=resolve_selection_metric(get_task(trial.config.task),
                                                            trial.config.selection_metric))
    trial.record = record
    workdir = Path(sweep.storage_path).expanduser().resolve() / sweep.name / "trials" / trial.trial_id / "evaluation"
    tracking.log_evaluation(trial.run_id, record, workdir)
    client = tracking.mlflow_client()
    client.set_tag(trial.run_id, "topro.setting", record["setting"])
    # which Ray node scored each language (the full map is in the run's evaluation/eval.json)
    client.set_tag(trial.run_id, "topro.eval_nodes", ",".join(sorted(set(record.get("nodes", {}).values()))))


# --- writes during the trials, kept while MLflow does not answer ----------------------------------------------

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
        # The whole spool rewritten atomically (not appended): a kill mid-write leaves the old spool.
        kept = self.path.read_text() if self.path.is_file() else ""
        atomic.write_text(self.path, kept + json.dumps({**entry, "error": self.first_error}, default=str) + "\n",
                          "mlflow_spool")
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
                atomic.write_text(self.path, "".join(json.dumps(e, default=str) + "\n" for e in entries[done:]),
                                  "mlflow_spool")
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
        text = error_line(err)
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
