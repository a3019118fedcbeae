"""Start-up as an operator does it: ``serve run serve/config.yaml`` and ``topro serve``, each in its own
process with its own loopback Ray, answered over HTTP, stopped with SIGTERM."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 240


from net import on_free_port, wait_until_healthy


def child_env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO / "platform"), str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    # Loopback-only local Ray, as topro's init_ray sets it up (serve run starts Ray by itself).
    env.pop("RAY_ADDRESS", None)  # a Ray of its own, never a cluster named by the caller's environment
    env.pop("TOPRO_LLM_MODEL", None)
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"},
               **extra)
    return env


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail("did not stop within 90s of SIGTERM")


def start_healthy(command, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """``command(port)`` started on a free port and answering /healthz (another port if the first was taken)."""
    started: list[subprocess.Popen] = []

    def start(port: int):
        with log.open("w") as out:
            started.append(subprocess.Popen(command(port), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(f"{url}/healthz", started[-1], log, timeout_s=START_TIMEOUT_S, poll_s=2)
        return started[-1], url

    def kill_last():
        if started[-1].poll() is None:
            started[-1].kill()
            started[-1].wait()

    return on_free_port(start, stop=kill_last)


def run_and_check(command, env: dict[str, str], log: Path, expected_model: str | None) -> int:
    process, url = start_healthy(command, env, log)
    try:
        r = requests.post(f"{url}/tag", json={"text": "Das ist gut ."}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["model"]["uri"] == expected_model
        assert [w["word"] for w in r.json()["sentences"][0]["words"]] == ["Das", "ist", "gut", "."]
        assert requests.post(f"{url}/tag", json={"text": ""}, timeout=60).status_code == 422
        r = requests.post(f"{url}/tag", json={"text": "Das ist gut", "lang": "xx"}, timeout=60)
        assert r.status_code == 422 and "'xx' is not a language of task 'udpos'" in r.json()["detail"]
        assert "de, el, en" in r.json()["detail"]  # the known ones are named
        # The config's second app deploys too; with no LLM configured it says so instead of failing.
        assert requests.get(f"{url}/llm/healthz", timeout=30).json()["llm"] == "unavailable"
        r = requests.post(f"{url}/llm/tag", json={"text": "Das ist gut"}, timeout=60)
        assert r.status_code == 503 and "no LLM configured" in r.json()["detail"]
        for way in ("--llm-model", "args.model", "TOPRO_LLM_MODEL"):  # every way to configure one
            assert way in r.json()["detail"]
    finally:
        code = stop(process)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=5)
    return code


def test_serve_run_with_the_project_config(tmp_path, model_registry):
    """The config the RayService embeds, unchanged but for the port (8000 may be taken on a shared machine)."""
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    serve_cli = Path(sys.executable).parent / "serve"

    def command(port: int) -> list[str]:
        config["http_options"]["port"] = port
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return [str(serve_cli), "run", str(path)]

    env = child_env(MLFLOW_TRACKING_URI=model_registry["uri"])
    run_and_check(command, env, tmp_path / "serve-run.log", config["applications"][0]["args"]["model"])


def test_topro_serve_with_a_checkpoint_and_a_port(tmp_path, tiny_topro_checkpoint):
    code = run_and_check(lambda port: [sys.executable, "-m", "topro.cli", "serve", "--model", str(tiny_topro_checkpoint),
                                       "--port", str(port), "--num-cpus", "2"], child_env(), tmp_path / "topro-serve.log",
                         None)  # a checkpoint folder: its server path is not shown
    assert code == 128 + signal.SIGTERM  # stopped by SIGTERM, cleanly
    assert "topro serve: tagging ready at http://127.0.0.1:" in (tmp_path / "topro-serve.log").read_text()


def test_topro_serve_that_cannot_come_up_ends_with_one_line(tmp_path, tiny_topro_checkpoint):
    """The port is taken: every try fails, within the budget, and the last line says what and what to set."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "topro.cli", "serve", "--model", str(tiny_topro_checkpoint),
                               "--port", str(port), "--num-cpus", "2", "--startup-timeout", "20",
                               "--startup-attempts", "2"], cwd=REPO, env=child_env(), capture_output=True,
                              text=True, timeout=600)
        seconds = time.monotonic() - start
    last = done.stderr.strip().splitlines()[-1]
    print(f"gave up after {seconds:.0f}s: {last}")
    assert done.returncode == 1, done.stderr[-3000:]
    assert last.startswith("topro serve: Serve's HTTP proxy did not come up at 127.0.0.1:") and "--startup-timeout" in last, \
        done.stderr[-3000:]
    assert "serve start-up try 1 of 2 failed" in done.stderr
