"""MLflow: the tracking URI, and the registry of checkpoints (no Ray here).

The embedded default is a SQLite store in the working directory
(``sqlite:///mlflow.db``); ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` points
at a server. A registered model version's source is the run's ``checkpoint``
artifact folder, a plain topro checkpoint (safetensors + tokenizer +
``topro.json``), so serving downloads it and loads it like any checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CHECKPOINT_ARTIFACT = "checkpoint"
# A tracking server that is down or hung costs each call at most about 3 x 15 s + 1 s + 2 s of backoff, not
# MLflow's default 7 retries with doubling backoff and a 120 s timeout (~4 minutes per call, measured 247 s).
# Set any of them in the environment to choose otherwise.
HTTP_REQUEST_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                         "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def tracking_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def configure(uri: str | None = None) -> str:
    """Point MLflow at ``uri`` (or the default) with bounded HTTP timeouts and retries, and return it."""
    import mlflow

    for key, value in HTTP_REQUEST_DEFAULTS.items():
        os.environ.setdefault(key, value)
    resolved = tracking_uri(uri)
    mlflow.set_tracking_uri(resolved)
    return resolved


def registered_name(task: str, method: str) -> str:
    """The registry name of the best model per task and method."""
    return f"topro-{task}-{method}"


def register_checkpoint(run_id: str, name: str, alias: str | None = "champion",
                        artifact_path: str = CHECKPOINT_ARTIFACT, description: str = "") -> str:
    """Register the run's checkpoint artifact folder as a new version of ``name``; returns the version."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        client.create_registered_model(name, description=description or None)
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(name, source=source, run_id=run_id)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version.version


def is_registry_uri(uri: str) -> bool:
    return uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def _model_version(uri: str):
    """The registry's ``ModelVersion`` behind ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    from mlflow import MlflowClient

    ref = uri[len("models:/"):]
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    if "/" in ref:
        name, number = ref.split("/", 1)
        return client.get_model_version(name, number)
    raise ValueError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")


def describe_model_uri(uri: str) -> dict[str, str | None]:
    """Where a model URI comes from, without downloading anything.

    ``models:/`` URIs: the registered name, version, run id and source artifact
    (raises ``mlflow.exceptions.MlflowException`` when the name, alias or version
    is unknown). ``runs:/`` URIs: the run id. Paths: just the path.
    """
    if uri.startswith("models:/"):
        version = _model_version(uri)
        return {"registered_model": version.name, "version": str(version.version), "run_id": version.run_id,
                "source": version.source}
    if uri.startswith("runs:/"):
        return {"registered_model": None, "version": None, "run_id": uri[len("runs:/"):].split("/", 1)[0],
                "source": uri}
    return {"registered_model": None, "version": None, "run_id": None, "source": uri}


def resolve_checkpoint(uri: str, cache: str | os.PathLike | None = None) -> Path:
    """A local checkpoint folder for a path, ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or ``runs:/`` URI."""
    if not is_registry_uri(uri):
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{uri}: no such checkpoint folder")
        return path
    import mlflow

    source = uri
    if uri.startswith("models:/"):
        source = _model_version(uri).source
    root = Path(cache or Path(os.environ.get("TOPRO_CACHE", Path.home() / ".cache" / "topro")) / "registry")
    target = root / hashlib.sha1(source.encode()).hexdigest()[:16]
    if not (target / "topro.json").is_file():
        target.mkdir(parents=True, exist_ok=True)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(target)))
        if local != target and (local / "topro.json").is_file():
            target = local
    found = target if (target / "topro.json").is_file() else next(target.rglob("topro.json"), None)
    if found is None:
        raise FileNotFoundError(f"{uri} ({source}): no topro checkpoint (topro.json) in the artifacts")
    return found if found.is_dir() else found.parent


# --- Sweep runs: one parent run per sweep, one nested child run per trial ----------------------------------

SWEEP_TAG = "topro.sweep"
KIND_TAG = "topro.kind"
TRIAL_TAG = "topro.trial_id"
EVALUATED_TAG = "topro.evaluated"
PREDICTIONS_FILE = "predictions.json"
PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by
# Per-report training metrics worth a history in MLflow (Tune adds many bookkeeping keys).
TRAINING_METRIC_PREFIXES = ("train_", "dev_", "best_dev_")
TRAINING_METRIC_KEYS = ("epoch", "step", "examples_per_second", "tokens_per_second")


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
        if artifact_location and found.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
            log.warning("experiment %s keeps its artifacts at %s (it exists already), not at artifact_location %s",
                        name, found.artifact_location, artifact_location)
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


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


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log (flattened) params. Params already logged are kept (MLflow refuses to change them): a resumed
    sweep logs the same values again, and a different value (e.g. the config file's path) is only noted."""
    import logging

    from mlflow.entities import Param

    client = mlflow_client()
    have = client.get_run(run_id).data.params
    flat = flat_params(params)
    changed = sorted(k for k, v in flat.items() if k in have and have[k] != v)
    if changed:
        logging.getLogger(__name__).warning("run %s: params %s differ from those logged first; kept the first",
                                            run_id, changed)
    items = [Param(k, v) for k, v in flat.items() if k not in have]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    for i in range(0, len(items), 1000):
        mlflow_client().log_batch(run_id, metrics=items[i:i + 1000])


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
    run = client.create_run(experiment_id(experiment, artifact_location), run_name=sweep, tags={SWEEP_TAG: sweep, KIND_TAG: "sweep"})
    log_params(run.info.run_id, params)
    return run.info.run_id


def trial_run(parent_run_id: str, trial_id: str, run_name: str, params: dict[str, Any] | None = None,
              reopen: bool = True) -> str:
    """The child run of one trial under the sweep's parent run (found again after a resume, and set
    RUNNING again if ``reopen``: the trial runs again)."""
    client = mlflow_client()
    parent = client.get_run(parent_run_id)
    existing = client.search_runs([parent.info.experiment_id],
                                  f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
                                  max_results=1)
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


def training_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The training and English dev metrics of one reported result."""
    return {k: v for k, v in result.items()
            if (k.startswith(TRAINING_METRIC_PREFIXES) or k in TRAINING_METRIC_KEYS)
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """Close a run: ``FINISHED``, ``FAILED`` or ``KILLED``."""
    mlflow_client().set_terminated(run_id, status=status)


def child_runs(parent_run_id: str) -> list:
    """Trial runs of a sweep, oldest first."""
    client = mlflow_client()
    parent = client.get_run(parent_run_id)
    return list(reversed(client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                            max_results=5000, order_by=["attributes.start_time DESC"])))


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


def _is_score(key: str, value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and not key.startswith(("n_", "model_")) and key not in ("seconds",))


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
        (folder / PREDICTIONS_FILE).write_text(json.dumps(
            {"task": record["task"], "method": record["method"], "split": record.get("split"),
             "languages": predictions}, ensure_ascii=False))
    (folder / "eval.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
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


def log_checkpoint(run_id: str, folder: str | os.PathLike) -> None:
    """Log a checkpoint folder as the run's ``checkpoint`` artifact (what ``register_checkpoint`` registers)."""
    mlflow_client().log_artifacts(run_id, str(folder), CHECKPOINT_ARTIFACT)


def registered_version_of_run(name: str, run_id: str) -> str | None:
    """The version of ``name`` already registered from ``run_id`` (resumed sweeps register once)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = mlflow_client().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    return versions[0].version if versions else None
