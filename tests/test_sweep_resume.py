"""An interrupted sweep resumes without redoing finished trials.

Two interruptions. A trial that fails on purpose: its model folder exists (so
validation passes) but is empty; the first run finishes the other trial,
evaluates and reports it, and marks the sweep failed; once the folder holds a
model, rerunning the same command resumes only the failed trial. And Ctrl-C
(SIGINT) once the first of two trials finished: the sweep stops cleanly, and
the rerun runs only the second. Either way the finished trial is neither
trained nor evaluated again.
"""
import json
import shutil

import pytest

from mlflow import MlflowClient

from topro import tracking
from topro.cli import main

SWEEP = """name: resumable
base: {{task: udpos, max_train_sentences: 30, max_dev_sentences: 10, epochs: 1, learning_rate: 1e-3, method: vanilla,
        strategy: ddp, workers: 1, cpus_per_worker: 0.9, num_threads: 1, max_failures: 0}}
search_space:
  {search_space}
eval_langs: [de, ru]
max_sentences: 10
register_alias: null
storage_path: {storage}
"""


def _sweep(config, uri, summary):
    code = main(["sweep", "--config", str(config), "--tracking-uri", uri, "--summary", str(summary)])
    return code, json.loads(summary.read_text())


def test_interrupted_sweep_resumes_without_redoing_finished_trials(tmp_path, ray_local, tiny_udpos, capfd):
    broken = tmp_path / "model-not-there-yet"
    broken.mkdir()
    # A config.json but no weights or tokenizer: it passes the driver's pre-check (a model folder) and
    # fails inside its trial, which is the failure this test resumes from.
    (broken / "config.json").write_text('{"model_type": "bert"}')
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP.format(search_space=f"model: {{grid: [tiny, {broken}]}}", storage=tmp_path / "sweeps"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    code, first = _sweep(config, uri, tmp_path / "first.json")
    assert code == 1  # a trial failed
    printed = "".join(capfd.readouterr())  # what a person sees: quieting Ray's noise keeps real errors
    assert "Traceback (most recent call last)" in printed and "1 trials failed" in printed
    status = {t["params"]["model"]: t["status"] for t in first["trials"]}
    assert status == {"tiny": "TERMINATED", str(broken): "ERROR"}
    done = next(t for t in first["trials"] if t["params"]["model"] == "tiny")
    tracking.configure(uri)
    client = MlflowClient()
    assert client.get_run(first["parent_run_id"]).info.status == "FAILED"
    assert "| vanilla (model=tiny) | 1 (no spread: single seed) |" in first["report"]  # the finished trial is reported already
    trained_at = (tmp_path / "sweeps" / "resumable" / "trials" / done["trial_id"] / "checkpoint" /
                  "model.safetensors").stat().st_mtime_ns
    evaluated = client.get_run(done["run_id"]).data.tags[tracking.EVALUATED_TAG]

    shutil.copytree(tiny_udpos, broken, dirs_exist_ok=True)  # the cause of the failure is fixed
    code, second = _sweep(config, uri, tmp_path / "second.json")
    assert code == 0 and second["resumed"] and second["parent_run_id"] == first["parent_run_id"]
    assert {t["params"]["model"]: t["status"] for t in second["trials"]} == {"tiny": "TERMINATED",
                                                                               str(broken): "TERMINATED"}
    # The finished trial was not trained again: same checkpoint file, one dev evaluation in its history...
    assert (tmp_path / "sweeps" / "resumable" / "trials" / done["trial_id"] / "checkpoint" /
            "model.safetensors").stat().st_mtime_ns == trained_at
    assert len(client.get_metric_history(done["run_id"], "dev_accuracy")) == 1
    # ...nor evaluated again; the restarted trial has its own child run, now finished and evaluated.
    assert client.get_run(done["run_id"]).data.tags[tracking.EVALUATED_TAG] == evaluated
    assert len(client.get_metric_history(done["run_id"], "accuracy.de")) == 1
    children = tracking.child_runs(first["parent_run_id"])
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    assert all(tracking.EVALUATED_TAG in c.data.tags for c in children)
    assert client.get_run(first["parent_run_id"]).info.status == "FINISHED"
    assert "| vanilla (model=model-not-there-yet) | 1 (no spread: single seed) |" in second["report"]


def test_sweep_stopped_after_its_first_trial_resumes_with_the_rest(tmp_path, ray_local, tiny_udpos):
    """Ctrl-C (here: SIGINT to this process) once the first trial finished; the rerun does only the rest."""
    import os
    import signal
    import threading
    import time

    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP.format(search_space="seed: {grid: [1, 2]}", storage=tmp_path / "sweeps"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.configure(uri)

    def stop_after_first_trial():
        client = MlflowClient()
        deadline = time.time() + 900
        while time.time() < deadline:
            try:
                exp = client.get_experiment_by_name("topro-sweep-resumable")
                runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'") if exp else []
            except Exception:  # the store is being created
                runs = []
            if any(r.data.tags.get("topro.kind") == "trial" for r in runs):
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(1)

    watcher = threading.Thread(target=stop_after_first_trial, daemon=True)
    watcher.start()
    code = main(["sweep", "--config", str(config), "--tracking-uri", uri, "max_concurrent_trials=1"])
    watcher.join()
    assert code == 130
    tracking.configure(uri)
    client = MlflowClient()
    parent = tracking.find_sweep_run("resumable")
    assert parent.info.status == "KILLED"
    finished = [r for r in tracking.child_runs(parent.info.run_id) if r.info.status == "FINISHED"]
    assert len(finished) == 1
    first = finished[0]
    trained_at = (tmp_path / "sweeps" / "resumable" / "trials" / first.data.tags[tracking.TRIAL_TAG] / "checkpoint" /
                  "model.safetensors").stat().st_mtime_ns

    code, summary = _sweep(config, uri, tmp_path / "resumed.json")
    assert code == 0 and summary["resumed"] and summary["parent_run_id"] == parent.info.run_id
    assert [t["status"] for t in summary["trials"]] == ["TERMINATED", "TERMINATED"]
    assert (tmp_path / "sweeps" / "resumable" / "trials" / first.data.tags[tracking.TRIAL_TAG] / "checkpoint" /
            "model.safetensors").stat().st_mtime_ns == trained_at  # not trained again
    assert len(client.get_metric_history(first.info.run_id, "dev_accuracy")) == 1
    children = tracking.child_runs(parent.info.run_id)
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_sweep_killed_at_any_point_finishes_when_rerun(tmp_path, tiny_udpos):
    """The sweep's driver process is SIGKILLed at one point per run, and the same command is run again:
    (1) when the first trial's Train run has registered its final checkpoint but Tune has not yet seen its
    result (before: every rerun failed with "Trial returned a result which did not include the specified
    metric(s) 'dev_score'"); (2) as a trial's TorchTrainer starts; (3) once the first checkpoint's
    evaluation is logged; (4) once the champion is registered. The fifth run finishes the sweep: no trial
    trained or evaluated twice, one registered version, no run left RUNNING."""
    import os
    import signal
    import subprocess
    import sys

    from topro.cluster.sweep_faults import KILL_DRIVER_ENV

    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP.format(search_space="seed: {grid: [1, 2]}", storage=tmp_path / "sweeps"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trials_dir = tmp_path / "sweeps" / "resumable" / "trials"

    def run(point: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != KILL_DRIVER_ENV}
        if point:
            env[KILL_DRIVER_ENV] = point
        with open(tmp_path / f"driver-{point}.log", "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "topro.cli", "sweep", "--config", str(config),
                                     "--tracking-uri", uri, "--summary", str(tmp_path / "summary.json"),
                                     "max_concurrent_trials=1", "register_alias=champion"],
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            code = proc.wait(timeout=900)
        try:  # what the killed driver's local Ray left behind
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return code

    def trained_at() -> dict[str, int]:
        return {p.name: (p / "checkpoint" / "model.safetensors").stat().st_mtime_ns for p in trials_dir.iterdir()
                if (p / "checkpoint" / "model.safetensors").is_file()}

    outcomes, checkpoints = {}, []
    for point in ("report", "fit", "evaluated", "registered", None):
        outcomes[point] = run(point)
        checkpoints.append(trained_at())
    log = (tmp_path / "driver-None.log").read_text()
    assert outcomes == {"report": -signal.SIGKILL, "fit": -signal.SIGKILL, "evaluated": -signal.SIGKILL,
                        "registered": -signal.SIGKILL, None: 0}, log[-3000:]
    # Both trials were trained by the third run, and never again after it.
    assert len(checkpoints[2]) == 2 and checkpoints[2] == checkpoints[3] == checkpoints[4]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["TERMINATED", "TERMINATED"] and summary["resumed"]
    tracking.configure(uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("topro-sweep-resumable")
    assert client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") == []
    assert client.get_run(summary["parent_run_id"]).info.status == "FINISHED"
    finished = [c for c in tracking.child_runs(summary["parent_run_id"]) if c.info.status == "FINISHED"]
    assert sorted(c.data.tags[tracking.TRIAL_TAG] for c in finished) == sorted(t["trial_id"] for t in summary["trials"])
    for child in finished:  # one dev result and one evaluation each, whatever the kills interrupted
        assert len(client.get_metric_history(child.info.run_id, "dev_accuracy")) >= 1
        assert len(client.get_metric_history(child.info.run_id, "accuracy.de")) == 1
    assert len(client.search_model_versions("name = 'topro-udpos-vanilla'")) == 1
    assert [r["alias"] for r in summary["registered"]] == ["champion"]


@pytest.mark.slow
def test_sweep_survives_a_tracking_server_outage(tmp_path, ray_local, tiny_udpos, caplog):
    """A real ``mlflow server`` on loopback is killed once the first of two trials finished and started again
    25 s later, while the second trial trains: the sweep neither stalls nor fails, the writes of the outage
    are kept in the spool and replayed, every trial's metrics end up in MLflow, and no run stays RUNNING."""
    import logging
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    server_log = open(tmp_path / "mlflow-server.log", "a")

    def start_server():
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                                 "--artifacts-destination", str(tmp_path / "artifacts")],
                                env=env, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if requests.get(f"{uri}/health", timeout=5).status_code == 200:
                    return proc
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError("mlflow server did not come up: " + (tmp_path / "mlflow-server.log").read_text()[-2000:])

    def stop_server(proc):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    server = {"proc": start_server()}
    outage = {}

    def outage_after_first_trial():
        client = MlflowClient(uri)
        deadline = time.time() + 900
        while time.time() < deadline:
            try:
                exp = client.get_experiment_by_name("topro-sweep-resumable")
                runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'") if exp else []
            except Exception:
                runs = []
            if any(r.data.tags.get("topro.kind") == "trial" for r in runs):
                stop_server(server["proc"])
                outage["start"] = time.time()
                time.sleep(25)
                server["proc"] = start_server()
                outage["end"] = time.time()
                return
            time.sleep(1)

    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP.format(search_space="seed: {grid: [1, 2]}", storage=tmp_path / "sweeps"))
    watcher = threading.Thread(target=outage_after_first_trial, daemon=True)
    watcher.start()
    caplog.set_level(logging.INFO, logger="topro")
    try:
        started = time.time()
        code = main(["sweep", "--config", str(config), "--tracking-uri", uri, "--summary", str(tmp_path / "summary.json"),
                     "max_concurrent_trials=1"])
        summary = json.loads((tmp_path / "summary.json").read_text())
        wall = time.time() - started
        watcher.join(timeout=300)
        assert code == 0 and outage.get("end"), (code, outage)
        print(f"sweep {wall:.0f}s; MLflow down for {outage['end'] - outage['start']:.0f}s")
        print(*[r.getMessage() for r in caplog.records if "MLflow" in r.getMessage()], sep="\n")
        assert "keeping trial records" in caplog.text and "MLflow answers again" in caplog.text, caplog.text[-3000:]
        assert not (tmp_path / "sweeps" / "resumable" / "mlflow_spool.jsonl").exists()
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("topro-sweep-resumable")
        assert client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") == []
        tracking.configure(uri)
        children = tracking.child_runs(summary["parent_run_id"])
        assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
        for child in children:  # each trial's dev result and evaluation reached MLflow
            assert len(client.get_metric_history(child.info.run_id, "dev_accuracy")) == 1
            assert len(client.get_metric_history(child.info.run_id, "accuracy.de")) == 1
            assert child.data.params.get("seed") in ("1", "2")
    finally:
        stop_server(server["proc"])
        server_log.close()
