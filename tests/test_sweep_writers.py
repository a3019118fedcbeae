"""One writer per sweep, and two different sweeps on one SQLite MLflow store."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from topro.cli import main

REPO = Path(__file__).resolve().parent.parent

SWEEP = """
name: twice
storage_path: {storage}
base: {{task: udpos, method: vanilla, max_train_sentences: 8, epochs: 1}}
search_space: {{seed: {{grid: [1]}}}}
"""


@pytest.mark.slow  # 12 s: `topro sweep` imports Ray before it reaches the lock
def test_a_second_sweep_of_the_same_name_and_storage_is_refused_naming_the_first(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP.format(storage=tmp_path / "sweeps"))
    (tmp_path / "sweeps").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:  # what the first driver's lock holds: its pid and host
        (tmp_path / "sweeps" / ".twice.topro.lock").write_text(json.dumps(
            {"pid": holder.pid, "host": socket.gethostname(), "started": 0, "command": "topro sweep --config x"}))
        code = main(["sweep", "--config", str(config), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"topro sweep: error: {tmp_path / 'sweeps'} is in use by another topro sweep 'twice': "
                           f"pid {holder.pid} on host {socket.gethostname()}")
    assert not (tmp_path / "sweeps" / "twice").exists()  # refused before anything was written


WRITER = """
import sys
from mlflow import MlflowClient
from topro import tracking
tracking.configure(sys.argv[1])
client = MlflowClient()
experiment = tracking.experiment_id("topro-sweep-" + sys.argv[2])
for i in range(12):
    run = client.create_run(experiment, run_name=f"trial-{i}")
    for step in range(5):
        client.log_metric(run.info.run_id, "dev_accuracy", step / 10, step=step)
    client.set_terminated(run.info.run_id)
"""


@pytest.mark.slow
def test_two_sweeps_write_one_sqlite_store_at_once(tmp_path):
    """What two different sweeps' drivers do to one SQLite store (create the schema, runs, metrics), at the same
    time from two processes: both finish, nothing lost (SQLite's lock and busy timeout serialise them)."""
    from mlflow import MlflowClient

    from topro import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'platform'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, name], env=env, stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for e in errors]
    tracking.configure(uri)
    client = MlflowClient()
    for name in ("a", "b"):
        runs = client.search_runs([tracking.experiment_id(f"topro-sweep-{name}")])
        assert len(runs) == 12 and {r.info.status for r in runs} == {"FINISHED"}
        assert all(len(client.get_metric_history(r.info.run_id, "dev_accuracy")) == 5 for r in runs)
