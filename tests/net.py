"""Ports for the servers that tests start, without the probe-then-bind race.

A probe (bind port 0, read the port, close) leaves a moment in which another process on a busy machine can
take the port before our server binds it. Servers that bind port 0 themselves are used as such
(``TinyOpenAIServer``); for those that need a port up front (Ray Serve's HTTP proxy, ``mlflow server``,
``topro serve``) ``on_free_port`` probes, starts, and, when the start failed because somebody else now holds
the port, tries again on another one. Any other failure is raised at once. ``wait_until_healthy`` is how a
test waits for a server process it started.
"""
from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A port that was free a moment ago (see ``on_free_port`` for using it safely)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` now."""
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def on_free_port(start: Callable[[int], T], *, attempts: int = 3, stop: Callable[[], object] | None = None) -> T:
    """``start(port)`` on a probed port; if it raises and the port is now held by another process (the race
    above), ``stop()`` what was started and try another port, at most ``attempts`` times."""
    for attempt in range(1, attempts + 1):
        port = free_port()
        try:
            return start(port)
        except Exception:
            if stop is not None:
                stop()
            if attempt == attempts or not port_taken(port):
                raise


def serve_on_free_port(deploy: Callable[[int], object], *, attempts: int = 3) -> str:
    """Start Ray Serve's HTTP proxy on 127.0.0.1 and ``deploy(port)`` the apps; returns the base URL."""
    from ray import serve

    def start(port: int) -> str:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(port)
        return f"http://127.0.0.1:{port}"

    return on_free_port(start, attempts=attempts, stop=serve.shutdown)


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path, *, timeout_s: float, poll_s: float = 1.0,
                       name: str = "the server") -> None:
    """Return once GET ``url`` answers 200. ``process`` exiting first raises ``RuntimeError`` with the tail of
    its ``log`` (``on_free_port`` then tries another port if somebody else took this one); no answer within
    ``timeout_s`` fails the test (another port would not help)."""
    import pytest
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before answering:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or too busy starting to answer
            pass
        time.sleep(poll_s)
    pytest.fail(f"{name}: no answer from {url} within {timeout_s:.0f}s:\n{log.read_text()[-3000:]}")
