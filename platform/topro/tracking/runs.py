"""MLflow runs: the tracking URI, a sweep's parent run and its trial runs, their params, metrics and evaluations.

The embedded default is a SQLite store in the working directory (``sqlite:///mlflow.db``);
``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` points at a server. A sweep is one parent run with one
nested child run per trial, found again by tag when a sweep resumes.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from topro import atomic
from topro.tracking.metric_names import evaluation_metrics, flat_params, is_finite_number

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# A tracking server that is down or hung costs each call at most about 3 x 15 s + 1 s + 2 s of backoff, not
# MLflow's default 7 retries with doubling backoff and a 120 s timeout (~4 minutes per call, measured 247 s).
# Set any of them in the environment to choose otherwise.
HTTP_REQUEST_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                         "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}

SWEEP_TAG = "topro.sweep"
KIND_TAG = "topro.kind"
TRIAL_TAG = "topro.trial_id"
EVALUATED_TAG = "topro.evaluated"
PREDICTIONS_FILE = "predictions.json"
PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by
# MLflow 3's experiment kind, the tag its UI's own kind selector writes: "custom_model_development" is
# "Model training" (runs table, metrics, charts) rather than the GenAI view (traces, judges).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# MLflow 3.17's UI decides its view by a workflow switch kept in the browser (default GenAI); a link with
# this query opens the experiment in the model-training view whatever the browser kept.
MODEL_TRAINING_QUERY = "workflowType=machine_learning"


def tracking_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def configure(uri: str | None = None) -> str:
    """Point MLflow at ``uri`` (or the default) with bounded HTTP timeouts and retries, and return it."""
    import mlflow

    for key, value in HTTP_REQUEST_DEFAULTS.items():
        os.environ.setdefault(key, value)
    resolved = tracking_uri(uri)
    mlflow.set_tracking_uri(resolved)
    if resolved.startswith("sqlite:///"):
        create_sqlite_store_once(resolved)
    return resolved


_sqlite_ready: set[str] = set()


def create_sqlite_store_once(uri: str) -> None:
    """Create a SQLite store's schema under a file lock. Two processes opening a new store at once (two sweeps
    started together) both run MLflow's migrations and one fails with ``table ... already exists``; once the
    schema is there, SQLite's own locking serialises their writes (tests/test_sweep_writers.py)."""
    if uri in _sqlite_ready:
        return
    import fcntl

    from mlflow import MlflowClient

    path = Path(uri[len("sqlite:///"):]).expanduser()
    if not path.parent.is_dir():
        return  # MLflow says what is wrong with the path
    with open(path.with_name(path.name + ".topro-init.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(uri).search_experiments(max_results=1)  # builds the store: schema and migrations
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _sqlite_ready.add(uri)


def mlflow_client():
    from mlflow import MlflowClient

    return MlflowClient()


def experiment_id(name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created if missing (with ``artifact_location``, if given)."""
    client = mlflow_client()
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        if found.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before topro tagged its experiments
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        if artifact_location and found.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
            log.warning("experiment %s keeps its artifacts at %s (it exists already), not at artifact_location %s",
                        name, found.artifact_location, artifact_location)
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    except Exception:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


def ui_link(experiment: str, base: str = "http://127.0.0.1:5000", query: str = MODEL_TRAINING_QUERY) -> str:
    """Where ``mlflow ui`` shows experiment ``experiment`` (an id) in its model-training view."""
    return f"{base}/#/experiments/{experiment}?{query}"


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log (flattened) params. Params already logged are kept (MLflow refuses to change them): a resumed
    sweep logs the same values again, and a different value (e.g. the config file's path) is only noted."""
    from mlflow.entities import Param

    client = mlflow_client()
    have = client.get_run(run_id).data.params
    flat = flat_params(params)
    changed = sorted(k for k, v in flat.items() if k in have and have[k] != v)
    if changed:
        log.warning("run %s: params %s differ from those logged first; kept the first", run_id, changed)
    items = [Param(k, v) for k, v in flat.items() if k not in have]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if is_finite_number(v)]
    for i in range(0, len(items), 1000):
        mlflow_client().log_batch(run_id, metrics=items[i:i + 1000])


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """Close a run: ``FINISHED``, ``FAILED`` or ``KILLED``."""
    mlflow_client().set_terminated(run_id, status=status)


# --- sweep runs: one parent run per sweep, one nested child run per trial ----------------------------------

def start_sweep_run(experiment: str, sweep: str, params: dict[str, Any], run_id: str | None = None,
                    artifact_location: str | None = None) -> str:
    """The sweep's parent run: reopen ``run_id`` (a resumed sweep) or create one."""
    client = mlflow_client()
    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except Exception:
            run = None
        if run is not None and run.info.lifecycle_stage == "active":
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "topro.resumed", "true")
            return run_id
    run = client.create_run(experiment_id(experiment, artifact_location), run_name=sweep,
                            tags={SWEEP_TAG: sweep, KIND_TAG: "sweep"})
    log_params(run.info.run_id, params)
    return run.info.run_id


def _search_children(parent, condition: str = "", **search) -> list:
    """Runs nested under the run ``parent`` (an MLflow ``Run``), optionally filtered further by ``condition``."""
    query = f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'" + (f" and {condition}" if condition else "")
    return mlflow_client().search_runs([parent.info.experiment_id], query, **search)


def trial_run(parent_run_id: str, trial_id: str, run_name: str, params: dict[str, Any] | None = None,
              reopen: bool = True) -> str:
    """The child run of one trial under the sweep's parent run (found again after a resume, and set
    RUNNING again if ``reopen``: the trial runs again)."""
    client = mlflow_client()
    parent = client.get_run(parent_run_id)
    existing = _search_children(parent, f"tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=1)
    if existing:
        run_id = existing[0].info.run_id
        if reopen and existing[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
    else:
        tags = {PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id, KIND_TAG: "trial",
                SWEEP_TAG: parent.data.tags.get(SWEEP_TAG, "")}
        run_id = client.create_run(parent.info.experiment_id, run_name=run_name, tags=tags).info.run_id
    if params:
        log_params(run_id, params)
    return run_id


def child_runs(parent_run_id: str) -> list:
    """Trial runs of a sweep, oldest first."""
    parent = mlflow_client().get_run(parent_run_id)
    return list(reversed(_search_children(parent, max_results=5000, order_by=["attributes.start_time DESC"])))


def find_sweep_run(ref: str):
    """The parent run of a sweep: a run id, or the latest run of the sweep named ``ref``."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client()
    if len(ref) == 32 and all(c in "0123456789abcdef" for c in ref):
        try:
            return client.get_run(ref)
        except MlflowException:
            pass
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`{SWEEP_TAG}` = '{ref}' and tags.`{KIND_TAG}` = 'sweep'",
                              max_results=1, order_by=["attributes.start_time DESC"]) if experiments else []
    if not runs:
        raise ValueError(f"no sweep named or with run id {ref!r} in the tracking store {tracking_uri()}")
    return runs[0]


# --- evaluations: metrics per language plus the record, predictions, table and plot as artifacts -----------

def log_evaluation(run_id: str, record: dict[str, Any], workdir: str | os.PathLike) -> None:
    """Metrics of a results record plus artifacts: the JSON, the per-sentence predictions
    (``predictions.json``, what ``topro compare`` resamples), a per-language CSV, a bar chart by family."""
    from topro import reports
    from topro.evaluate import split_predictions

    client = mlflow_client()
    record, predictions = split_predictions(record)
    log_metrics(run_id, evaluation_metrics(record))
    folder = Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    if predictions:
        record["predictions_file"] = PREDICTIONS_FILE
        atomic.write_json(folder / PREDICTIONS_FILE, {"task": record["task"], "method": record["method"],
                                                      "split": record.get("split"), "languages": predictions},
                          "tracking_eval", indent=None, ensure_ascii=False)
    atomic.write_json(folder / "eval.json", record, "tracking_eval", ensure_ascii=False)
    reports.write_csv(reports.language_rows(record), folder / "per_language.csv")
    reports.plot_language_bars({record["method"]: {k: v[record["metric"]] for k, v in record["languages"].items()}},
                               folder / "per_language_by_family.png", metric=record["metric"],
                               title=f"{record['task']} {record['method']}: zero-shot {record['metric']} by language")
    client.log_artifacts(run_id, str(folder), "evaluation")
    if record.get("selection_metric"):
        client.set_tag(run_id, "topro.selection_metric", record["selection_metric"])
    if record.get("mlm_head_untrained"):
        client.set_tag(run_id, "topro.mlm_head_untrained", "true")
    client.set_tag(run_id, EVALUATED_TAG, ",".join(sorted(record["languages"])))


def _load_evaluation_file(run_id: str, name: str) -> dict[str, Any] | None:
    import mlflow

    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/evaluation/{name}")
    except Exception:
        return None
    return json.loads(text)


def load_evaluation(run_id: str) -> dict[str, Any] | None:
    """The results record logged by ``log_evaluation`` (``None`` if the run has none)."""
    return _load_evaluation_file(run_id, "eval.json")


def load_predictions(run_id: str) -> dict[str, Any] | None:
    """The per-sentence predictions logged by ``log_evaluation`` (``None`` if the run has none)."""
    return _load_evaluation_file(run_id, PREDICTIONS_FILE)
