"""The MLflow model registry: registering a run's checkpoint, aliases, and turning model URIs into local folders.

A registered model version's source is the run's ``checkpoint`` artifact folder, a plain topro checkpoint
(safetensors + tokenizer + ``topro.json``), so serving downloads it and loads it like any checkpoint.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from topro.tracking.runs import mlflow_client

CHECKPOINT_ARTIFACT = "checkpoint"


def registered_name(task: str, method: str) -> str:
    """The registry name of the best model per task and method."""
    return f"topro-{task}-{method}"


def log_checkpoint(run_id: str, folder: str | os.PathLike) -> None:
    """Log a checkpoint folder as the run's ``checkpoint`` artifact (what ``register_checkpoint`` registers)."""
    # RUN/checkpoint is a link to checkpoint.vN (topro.atomic): log the version it names now, whole.
    mlflow_client().log_artifacts(run_id, str(Path(folder).resolve()), CHECKPOINT_ARTIFACT)


def register_checkpoint(run_id: str, name: str, alias: str | None = "champion",
                        artifact_path: str = CHECKPOINT_ARTIFACT, description: str = "") -> str:
    """Register the run's checkpoint artifact folder as a new version of ``name``; returns the version."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client()
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


def registered_version_of_run(name: str, run_id: str) -> str | None:
    """The version of ``name`` already registered from ``run_id`` (resumed sweeps register once)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = mlflow_client().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    return versions[0].version if versions else None


def is_registry_uri(uri: str) -> bool:
    return uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def _model_version(uri: str):
    """The registry's ``ModelVersion`` behind ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    ref = uri[len("models:/"):]
    client = mlflow_client()
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
