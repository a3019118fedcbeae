"""The suite's own hygiene, tested: what one test sets does not reach the next, and a server start that lost
its port to another process tries another one. These guard the fixtures in conftest.py and tests/net.py."""
from __future__ import annotations

import errno
import os
import socket

import pytest

from net import on_free_port

_seen: dict[str, str] = {}


def test_a_command_points_mlflow_at_its_own_store(tmp_path):
    import mlflow

    from topro import tracking

    uri = tracking.configure(f"sqlite:///{tmp_path / 'mine.db'}")  # what `topro sweep --tracking-uri` does
    assert mlflow.get_tracking_uri() == uri == os.environ["MLFLOW_TRACKING_URI"]
    _seen["uri"] = uri


def test_the_next_test_does_not_inherit_that_store():
    import mlflow

    assert _seen, "runs after test_a_command_points_mlflow_at_its_own_store (file order)"
    assert mlflow.get_tracking_uri() != _seen["uri"]
    assert os.environ["MLFLOW_TRACKING_URI"] != _seen["uri"]


def test_distributed_variables_set_with_monkeypatch_are_gone_afterwards(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert os.environ["RANK"] == "3"


def test_no_rank_is_left_in_the_environment():
    assert os.environ.get("RANK") != "3"


def test_a_leaked_variable_fails_the_test_that_leaked_it(pytester):
    """conftest's guard, run on a test that writes os.environ directly: that test errors at teardown."""
    pytester.makeconftest((__import__("pathlib").Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_leak="import os\ndef test_leak():\n    os.environ['RANK'] = '0'\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1, errors=1)
    assert "the test left {'RANK': '0'} in os.environ" in result.stdout.str()
    os.environ.pop("RANK", None)


def test_a_port_taken_between_probe_and_bind_is_given_up_for_another():
    """The race on a busy machine, made to happen: on the first try another socket takes the probed port and
    the server's bind fails with EADDRINUSE; the second try gets another port and starts."""
    thief, tried = socket.socket(), []

    def start(port: int) -> int:
        tried.append(port)
        if len(tried) == 1:
            thief.bind(("127.0.0.1", port))
            thief.listen()
            raise OSError(errno.EADDRINUSE, "Address already in use")
        server = socket.socket()
        server.bind(("127.0.0.1", port))
        server.close()
        return port

    try:
        port = on_free_port(start)
    finally:
        thief.close()
    assert len(tried) == 2 and port == tried[1] != tried[0]


def test_a_start_that_fails_for_another_reason_is_not_retried():
    tried = []

    def start(port: int):
        tried.append(port)
        raise ValueError("bad config")

    with pytest.raises(ValueError, match="bad config"):
        on_free_port(start)
    assert len(tried) == 1
