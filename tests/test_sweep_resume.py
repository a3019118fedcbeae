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

from mlflow import MlflowClient

from topro import tracking
from topro.cli import main

SWEEP = """name: resumable
base: {{task: udpos, max_train_sentences: 30, max_dev_sentences: 10, epochs: 1, learning_rate: 1e-3, method: vanilla,
        strategy: ddp, workers: 1, cpus_per_worker: 0.9, num_threads: 1, max_failures: 0}}
search_space:
  {search_space}
eval_langs: [de, ru]
max_eval_sentences: 10
register_alias: null
storage_path: {storage}
"""


def _sweep(config, uri, summary):
    code = main(["sweep", "--config", str(config), "--tracking-uri", uri, "--summary", str(summary)])
    return code, json.loads(summary.read_text())


def test_interrupted_sweep_resumes_without_redoing_finished_trials(tmp_path, ray_local, tiny_udpos):
    broken = tmp_path / "model-not-there-yet"
    broken.mkdir()
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP.format(search_space=f"model: {{grid: [tiny, {broken}]}}", storage=tmp_path / "sweeps"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    code, first = _sweep(config, uri, tmp_path / "first.json")
    assert code == 1  # a trial failed
    status = {t["params"]["model"]: t["status"] for t in first["trials"]}
    assert status == {"tiny": "TERMINATED", str(broken): "ERROR"}
    done = next(t for t in first["trials"] if t["params"]["model"] == "tiny")
    tracking.configure(uri)
    client = MlflowClient()
    assert client.get_run(first["parent_run_id"]).info.status == "FAILED"
    assert "| vanilla (model=tiny) | 1 |" in first["report"]  # the finished trial is reported already
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
    assert "| vanilla (model=model-not-there-yet) | 1 |" in second["report"]


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
