"""A real multi-node Ray cluster on one machine's loopback, for tests and demonstrations.

Each node is its own ``ray start --block`` process (a head, then nodes that
join it), with its own temp dir and free ports, all on 127.0.0.1. Work can be
pinned to a node through its custom resource (``{"node2": 1}``) and every
node has a name (``ray start --node-name``), which the records use.

Why joining needs a small wrapper: Ray resolves ``127.0.0.1`` to the
machine's external address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
and that same variable makes ``ray start --address`` refuse to join
("Multi-node Ray clusters are not supported"). A joining node therefore runs
Ray's own CLI in a Python process that turns multi-node mode back on for the
join while leaving loopback addresses as they are; every Ray process it
starts inherits ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` and stays on
127.0.0.1 (checked: no Ray socket of either node listens off loopback).

``stop`` ends only the processes this module started (SIGTERM to each
``ray start --block``, which stops the Ray processes it spawned).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# Ray's CLI with multi-node mode on and loopback addresses left alone (see the module docstring).
JOIN_LOOPBACK = """
import sys
import ray._private.ray_constants as constants
import ray._private.services as services
constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = "ray"
main()
"""


@dataclass
class NodeSpec:
    """One node of the local cluster."""

    name: str
    """Node name (``ray start --node-name``) and custom resource (1 unit) that pins work to it."""
    num_cpus: float = 1.0
    """Logical CPUs the node offers (Ray takes whole numbers for ``--num-cpus``)."""
    object_store_bytes: int = 200 * 1024 * 1024
    private_dirs: list[str] = field(default_factory=list)
    """Folders this node sees as its own empty tmpfs (a private mount namespace, needs ``unshare``): a
    node-local disk, to check that storage checks tell it from a shared one."""


@dataclass
class LocalCluster:
    """A running local cluster: ``address`` (GCS) for ``ray.init``/``RAY_ADDRESS``, ``dashboard_url`` for jobs."""

    address: str
    dashboard_url: str
    work_dir: Path
    nodes: list[NodeSpec]
    ray_dir: Path
    """Ray's temp dirs (short: Ray's socket paths must stay under 108 bytes); removed by ``stop``."""
    processes: list[subprocess.Popen] = field(default_factory=list)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM each ``ray start --block`` this cluster started (workers first), and wait for them."""
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.processes.clear()
        shutil.rmtree(self.ray_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# Ray gives a starting node a fixed 30 s to register; on a loaded 2-core machine that fails now and then.
START_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env() -> dict[str, str]:
    """Environment of every node (and so of every Ray worker and job driver on it)."""
    from topro.cluster.runtime import local_ray_env

    # The venv's bin first: a job's `python` is the one on the head's PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, **local_ray_env(), "PATH": path}


def _ray_start(args: list[str], log_file: Path, env: dict[str, str], join: bool,
               private_dirs: list[str]) -> subprocess.Popen:
    ray_cli = [sys.executable, "-c", JOIN_LOOPBACK] if join else [str(Path(sys.executable).parent / "ray")]
    if not join and not Path(ray_cli[0]).exists():
        ray_cli = [sys.executable, "-c", "from ray.scripts.scripts import main; import sys; sys.argv[0] = 'ray'; main()"]
    command = [*ray_cli, "start", "--block", *args]
    if private_dirs:
        if shutil.which("unshare") is None:
            raise RuntimeError("private_dirs needs `unshare` (util-linux)")
        mounts = " && ".join(f"mkdir -p {shlex.quote(d)} && mount -t tmpfs topro-node-local {shlex.quote(d)}"
                             for d in private_dirs)
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f"{mounts} && exec {shlex.join(command)}"]
    out = open(log_file, "w")
    return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def alive_nodes(dashboard_url: str) -> list[dict]:
    """The cluster's alive nodes as the dashboard's state API lists them (``node_name``, ``node_id``, ...)."""
    with urllib.request.urlopen(f"{dashboard_url}/api/v0/nodes?limit=100", timeout=10) as response:
        rows = json.loads(response.read())["data"]["result"]["result"]
    return [r for r in rows if r.get("state") == "ALIVE"]


def start_local_cluster(work_dir: str | Path, nodes: list[NodeSpec] | None = None,
                        timeout: float = 180.0) -> LocalCluster:
    """Start ``nodes`` (the first is the head) on 127.0.0.1; returns once all are alive.

    Default: a head ``head`` with 1 CPU and a node ``node2`` with 1 CPU.
    """
    nodes = nodes or [NodeSpec("head"), NodeSpec("node2")]
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    env = node_env()
    port, dashboard_port = free_port(), free_port()
    cluster = LocalCluster(address=f"127.0.0.1:{port}", dashboard_url=f"http://127.0.0.1:{dashboard_port}",
                           work_dir=work_dir, nodes=nodes, ray_dir=Path(tempfile.mkdtemp(prefix="topro-ray-")))
    try:
        for i, node in enumerate(nodes):
            common = [f"--node-ip-address=127.0.0.1", f"--node-name={node.name}",
                      f"--num-cpus={int(round(node.num_cpus))}", f"--resources={json.dumps({node.name: 1})}",
                      f"--object-store-memory={node.object_store_bytes}", f"--temp-dir={cluster.ray_dir / node.name}",
                      # the defaults (52365, 10001) would clash between the nodes and with other clusters
                      f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
            if i == 0:
                args = ["--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                        f"--ray-client-server-port={free_port()}", *common]
            else:
                args = [f"--address={cluster.address}", *common]
            for attempt in range(1, START_ATTEMPTS + 1):
                log_file = work_dir / f"{node.name}.log"
                cluster.processes.append(_ray_start(args, log_file, env, join=i > 0, private_dirs=node.private_dirs))
                try:
                    _wait_for_nodes(cluster, i + 1, timeout, log_file)
                    break
                except NodeStartTimeout:
                    if attempt == START_ATTEMPTS:
                        raise
                    # What that attempt started is in its own process group (start_new_session): stop it all.
                    proc = cluster.processes.pop()
                    _kill_group(proc)
                    time.sleep(2)
    except BaseException:
        cluster.stop()
        raise
    return cluster


class NodeStartTimeout(RuntimeError):
    """Ray gave up on a starting node (its raylet did not register in Ray's fixed 30 s: a busy machine)."""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _wait_for_nodes(cluster: LocalCluster, count: int, timeout: float, log_file: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        proc = cluster.processes[-1]
        if proc.poll() is not None:
            text = log_file.read_text()
            error = NodeStartTimeout if "timed out during startup" in text else RuntimeError
            raise error(f"ray start exited with {proc.returncode}; its log {log_file}:\n{text[-3000:]}")
        try:
            if len(alive_nodes(cluster.dashboard_url)) >= count:
                return
        except (OSError, ValueError, KeyError):
            pass  # the dashboard is not up yet
        time.sleep(1)
    raise TimeoutError(f"the local cluster did not reach {count} alive nodes in {timeout:.0f}s (log {log_file})")


def main(argv: list[str] | None = None) -> int:
    """``python -m topro.cluster.local_cluster WORK_DIR``: start head + node2, print the addresses, wait."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir")
    parser.add_argument("--head-cpus", type=float, default=1.0)
    parser.add_argument("--node2-cpus", type=float, default=1.0)
    args = parser.parse_args(argv)
    cluster = start_local_cluster(args.work_dir, [NodeSpec("head", args.head_cpus), NodeSpec("node2", args.node2_cpus)])
    print(json.dumps({"address": cluster.address, "dashboard_url": cluster.dashboard_url}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while all(p.poll() is None for p in cluster.processes):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
