"""Torch distributed rendezvous that listens on no network socket when every worker is on this machine.

Ray Train's default (``env://`` on rank 0's node address) makes rank 0 host a
``TCPStore``, and torch binds that store to every interface (``*:<port>``)
whatever ``MASTER_ADDR`` says. When all workers report a loopback node
address (the embedded local Ray), ``LoopbackTorchConfig`` meets them in a
``file://`` store in the temp folder instead, and points gloo at the loopback
interface (``GLOO_SOCKET_IFNAME``), so no socket of the run leaves 127.0.0.1.
On a real cluster (any worker on another address) it is Ray Train's own setup,
unchanged: see the README for what such a network needs.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
import uuid
from dataclasses import dataclass

import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend


def loopback_interface() -> str | None:
    """The name of this machine's loopback interface (``lo`` on Linux, ``lo0`` on macOS), if found."""
    for _, name in socket.if_nameindex():
        if name in ("lo", "lo0"):
            return name
    return None


def _node_address() -> str:
    return ray.util.get_node_ip_address()


def _set_local_env(interface: str | None) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    if interface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
        return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback
    except ValueError:
        return False


class LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "LoopbackTorchConfig"):
        addresses = worker_group.execute(_node_address)
        if not all(_is_loopback(a) for a in addresses):
            return super().on_start(worker_group, backend_config)
        resources = worker_group.get_resources_per_worker()
        backend = backend_config.backend or ("nccl" if resources.get("GPU", 0) > 0 else "gloo")
        worker_group.execute(_set_local_env, interface=loopback_interface())
        worker_group.execute(_set_torch_distributed_env_vars)
        url = f"file://{tempfile.gettempdir()}/topro-rendezvous-{uuid.uuid4().hex}"
        ray.get([worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend, world_rank=i,
                                                   world_size=len(worker_group), init_method=url,
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous listens on no socket when all workers are local (see module doc)."""

    @property
    def backend_cls(self):
        return LoopbackTorchBackend
