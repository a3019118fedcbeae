"""Starting or joining Ray.

With no address (argument or ``RAY_ADDRESS``) Ray starts in-process on
127.0.0.1: the embedded default for one machine. That path sets
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (without it Ray binds the machine's
external interface even when told 127.0.0.1) and disables token auth for the
local dashboard. Neither is touched when joining a real cluster.
"""
from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 768 * 1024 * 1024
# Ray gives a starting raylet a fixed 30 s to register with the GCS. On a busy shared machine (load
# average 15-20 on 2 cores, measured) that fails now and then; a fresh attempt usually succeeds.
LOCAL_START_ATTEMPTS = 3


def local_ray_env() -> dict[str, str]:
    """Environment for a loopback-only local Ray (also given to Ray workers)."""
    # RAY_USAGE_STATS_ENABLED=0: a local Ray's dashboard otherwise reports usage to usage-stats.ray.io.
    # RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0: see topro.quiet (no node of a one-machine Ray is preempted).
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")}


def init_ray(address: str | None = None, *, num_cpus: int | None = None, include_dashboard: bool = True,
             log_to_driver: bool = True):
    """Join ``address`` (or ``$RAY_ADDRESS``), or start a local Ray on 127.0.0.1. Idempotent."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    on_loopback = address is None or is_loopback_address(address)
    if on_loopback:
        for key, value in local_ray_env().items():
            os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return ray
    passthrough = {k: os.environ[k] for k in ("TOPRO_DATA_DIR", "TOPRO_CACHE", "MLFLOW_TRACKING_URI",
                                              "HF_HUB_OFFLINE", "TOPRO_TASKS_PATH", "TOPRO_PROMPTS_PATH")
                   if k in os.environ}
    from topro.data.loading import resolve_data_dir

    if "TOPRO_DATA_DIR" not in passthrough and resolve_data_dir(None) is not None:
        passthrough["TOPRO_DATA_DIR"] = str(resolve_data_dir(None))  # ../shared beside this checkout
    # Ray workers run in other working folders: relative paths are made absolute here, on the driver.
    for key in ("TOPRO_DATA_DIR", "TOPRO_CACHE", "TOPRO_TASKS_PATH", "TOPRO_PROMPTS_PATH"):
        if passthrough.get(key) and "://" not in passthrough[key]:
            passthrough[key] = os.pathsep.join(os.path.abspath(os.path.expanduser(p))
                                               for p in passthrough[key].split(os.pathsep) if p)
    if on_loopback:
        # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import: where something imported it before
        # this call (Tune, Train), the setdefault above came too late and 127.0.0.1 would be "resolved"
        # to the machine's external address (a cluster on this machine's loopback, such as
        # topro.cluster.local_cluster's, listens on 127.0.0.1 only).
        import ray._private.ray_constants as ray_constants
        from ray._common.utils import env_bool

        ray_constants.ENABLE_RAY_CLUSTER = env_bool(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, True)
    if address is None:
        # address="local": always a new in-process Ray; with None, Ray would join any cluster that a
        # `ray start` on this machine recorded in /tmp/ray/ray_current_cluster (someone else's, on a shared box).
        _start_local(ray, address="local", num_cpus=num_cpus, include_dashboard=include_dashboard,
                     dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, log_to_driver=log_to_driver,
                     runtime_env={"env_vars": {**local_ray_env(), **passthrough}})
    else:
        # Inside `ray job submit`, Ray refuses a driver runtime env that sets a variable the job's own
        # runtime env sets too; those reach the workers anyway.
        job_env = _job_runtime_env().get("env_vars") or {}
        passthrough = {k: v for k, v in passthrough.items() if k not in job_env}
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env={"env_vars": passthrough})
    return ray


def is_loopback_address(address: str) -> bool:
    """Whether a Ray address (``127.0.0.1:6379``, ``localhost:6379``, ``http://127.0.0.1:8265``) is on loopback."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


def node_name() -> str:
    """The name of the Ray node this process runs on (``ray start --node-name``; Ray's default is its IP);
    ``local`` outside Ray (an evaluator built in-process), where asking Ray would start one."""
    import ray

    if not ray.is_initialized():
        return "local"
    node_id = ray.get_runtime_context().get_node_id()
    return next((n.get("NodeName") or n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id),
                node_id)


def _job_runtime_env() -> dict:
    """The runtime env of the Ray job this driver runs as (empty outside ``ray job submit``)."""
    import json

    try:
        return json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def _start_local(ray, **init_kwargs) -> None:
    """``ray.init`` of a local Ray, tried again if the node times out during start-up.

    A failed start leaves its GCS and raylet running as children of this process; they are stopped (by
    pid: only processes this process started during that attempt) before the next attempt.
    """
    import psutil

    me = psutil.Process()
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        started = time.time()
        try:
            ray.init(**init_kwargs)
            return
        except Exception as err:
            if "timed out during startup" not in str(err) or attempt == LOCAL_START_ATTEMPTS:
                raise
            leftovers = []
            for child in me.children(recursive=True):
                try:
                    if child.create_time() >= started - 1:
                        child.kill()
                        leftovers.append(child)
                except psutil.Error:
                    pass
            psutil.wait_procs(leftovers, timeout=10)
            ray.shutdown()
            log.warning("local Ray did not start (attempt %d of %d: %s); trying again", attempt,
                        LOCAL_START_ATTEMPTS, str(err).split(".")[0])


def stop_ray_started_here(was_running: bool) -> None:
    """Stop the Ray this command started (not one it joined or found running): its workers' forwarded log
    lines arrive late, and stopping it ends them before the command prints its final table."""
    import ray

    if not was_running and ray.is_initialized():
        ray.shutdown()
