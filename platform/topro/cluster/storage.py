"""Storage every node reaches: checked before a run starts, not discovered when a checkpoint goes missing.

Ray Train and Tune write checkpoints from the workers and read them back on
the driver (and on whichever node a restarted worker lands), so on a cluster
``storage_path`` must be one place that every node sees: a shared filesystem
mounted at the same path on every node (NFS, a ReadWriteMany volume) or an
object-store URI that pyarrow opens (``s3://bucket/prefix``, ``gs://...``).
The MLflow artifact location has the same need (the sweep driver writes,
serving replicas read).

How a node-local path is told apart: not by its name (``/tmp`` can be a
shared mount and ``/data`` a node's own disk), but by trying it. The driver
writes a marker file with a random token into the storage, then one task
pinned to each alive node reads it back through the same path or URI. A node
that does not find the token does not share the storage; the run stops
before it starts, naming the nodes. On a single-node cluster a local folder
is always fine and nothing is checked beyond creating it.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from topro.config import ConfigError

MARKER_PREFIX = ".topro-storage-check-"


def is_uri(path: str) -> bool:
    return "://" in path


def normalise(path: str) -> str:
    """A local path made absolute (workers do not share the driver's working folder); URIs unchanged."""
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def _filesystem(storage: str, what: str):
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(storage if is_uri(storage) else f"file://{storage}")
    except Exception as err:  # unknown scheme, missing bucket region, no credentials
        raise ConfigError(f"{what} {storage!r}: cannot open it ({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def write_marker(storage: str, what: str = "storage_path") -> tuple[str, str]:
    """Create ``storage`` if needed and write a marker file into it; returns (marker path or URI, token).

    Raises ``ConfigError`` naming ``what`` when the storage cannot be opened or written (an unreachable
    object store, a missing bucket, a read-only folder)."""
    fs, path = _filesystem(storage, what)
    token = uuid.uuid4().hex
    marker = f"{path.rstrip('/')}/{MARKER_PREFIX}{token}"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(marker) as out:
            out.write(token.encode())
    except Exception as err:
        raise ConfigError(f"{what} {storage!r}: cannot write there ({type(err).__name__}: {_first_line(err)})") from None
    return (f"{storage.rstrip('/')}/{MARKER_PREFIX}{token}" if is_uri(storage) else marker), token


def read_marker(marker: str) -> str | None:
    """The token in ``marker`` as this process sees it (``None``: not there or not readable)."""
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(marker if is_uri(marker) else f"file://{marker}")
        with fs.open_input_stream(path) as stream:
            return stream.read().decode()
    except Exception:
        return None


def remove_marker(marker: str) -> None:
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(marker if is_uri(marker) else f"file://{marker}")
        fs.delete_file(path)
    except Exception:
        pass


def nodes_missing_marker(marker: str, token: str) -> list[dict[str, Any]]:
    """The alive Ray nodes on which a task does not read ``token`` from ``marker`` (Ray must be initialised)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def read_on_node(path: str) -> str | None:
        return read_marker(path)

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [read_on_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                                 ).remote(marker) for n in nodes]
    missing = []
    for node, ref in zip(nodes, refs):
        try:
            seen = ray.get(ref, timeout=120)
        except Exception as err:
            seen = f"error: {_first_line(err)}"
        if seen != token:
            missing.append({"node": node.get("NodeName") or node["NodeManagerAddress"], "node_id": node["NodeID"],
                            "saw": seen})
    return missing


def check_storage(storage: str, what: str = "storage_path") -> str:
    """``storage`` normalised, after checking that it can be written and (on a multi-node cluster) that every
    node sees what the driver wrote. Ray must be initialised. Raises ``ConfigError`` naming ``what``."""
    import ray

    storage = normalise(storage)
    marker, token = write_marker(storage, what)
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if len(alive) < 2:
            return storage
        missing = nodes_missing_marker(marker, token)
    finally:
        remove_marker(marker)
    if missing:
        names = ", ".join(f"{m['node']} ({m['node_id'][:8]})" for m in missing)
        kind = "an object store" if is_uri(storage) else "a folder"
        raise ConfigError(
            f"{what} {storage!r} is not shared by every node of this {len(alive)}-node Ray cluster: {names} "
            f"did not see the file the driver wrote into {kind} there. Give a path on a filesystem mounted at "
            f"the same place on every node (NFS, a ReadWriteMany volume; see k8s/) or an object-store URI "
            f"such as s3://bucket/prefix")
    return storage


def check_artifact_location(location: str, what: str = "artifact_location") -> str:
    """Like ``check_storage`` for an MLflow artifact location (``file:`` URIs and plain folders alike)."""
    if location.startswith("file:") and not location.startswith("file://"):
        location = location[len("file:"):]
    elif location.startswith("file://"):
        location = location[len("file://"):]
    return check_storage(location, what)


__all__ = ["check_artifact_location", "check_storage", "is_uri", "nodes_missing_marker", "normalise",
           "read_marker", "write_marker"]
