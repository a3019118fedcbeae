"""The fast tier's real-component smokes: one of each part that the full tier tests in depth, on one local Ray.

- Ray Train: a 2-worker DDP run over gloo on 127.0.0.1 (the tiny model, a few steps).
- Ray Serve: the tagging app answering real HTTP on 127.0.0.1.
- A sweep: Tune over Ray Train with MLflow in SQLite, one trial, evaluated on one language and registered.

Each asserts what a broken component would change (the run's world size and steps, a tagged sentence with
the checkpoint's own tags, the MLflow runs and the registered champion), not only that nothing raised.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from topro.cli import main

pytestmark = pytest.mark.smoke

REPO = Path(__file__).resolve().parent.parent


def test_ray_train_two_workers_ddp(tmp_path, data_dir, tiny_udpos, ray_local):
    args = ["train", "--config", "configs/train/udpos-vanilla.yaml", "--data-dir", str(data_dir),
            "--output", str(tmp_path / "run"), "--workers", "2", "--strategy", "ddp", "max_train_sentences=16",
            "max_dev_sentences=8", "epochs=1", "max_length=48", "batch_size=8", "eval_langs=[]", "progress=false",
            "num_threads=1"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # 16 sentences in batches of 8 within length buckets: 2 or 3 steps, the same on 1 or 2 workers
    assert metrics["world_size"] == 2 and metrics["steps"] == metrics["steps_per_epoch"] >= 2
    assert [h["step"] for h in metrics["history"]] == [metrics["steps"]]
    assert (Path(metrics["checkpoint"]) / "topro.json").is_file()


def test_serve_tagging_app_answers_http(ray_local, tiny_topro_checkpoint):
    from ray import serve as ray_serve

    from topro.data.readers import Sentence
    from topro.endpoint.tagging import make_app
    from topro.serving import Tagger
    from net import serve_on_free_port

    app = make_app({"model": str(tiny_topro_checkpoint), "max_batch_size": 4},
                   {"Tagger": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}})
    url = serve_on_free_port(lambda port: ray_serve.run(app, name="smoke", route_prefix="/"))
    try:
        answer = requests.post(f"{url}/tag", json={"text": "Das ist ein Haus ."}, timeout=120)
        assert answer.status_code == 200, answer.text
        [sentence] = answer.json()["sentences"]
        [expected] = Tagger.load(str(tiny_topro_checkpoint)).tag([Sentence(["Das", "ist", "ein", "Haus", "."], [])])
        assert [(w["word"], w["tag"]) for w in sentence["words"]] == [(w.word, w.tag) for w in expected.words]
        assert requests.post(f"{url}/tag", json={"text": ""}, timeout=60).status_code == 422
    finally:
        ray_serve.shutdown()


SWEEP = """name: smoke
base: {{task: udpos, model: tiny, method: vanilla, max_train_sentences: 12, max_dev_sentences: 6, epochs: 1,
        learning_rate: 3e-3, max_length: 48, batch_size: 8, strategy: ddp, workers: 1, cpus_per_worker: 0.9,
        num_threads: 1, max_failures: 0}}
search_space:
  seed: {{grid: [1]}}
eval_langs: [de]
max_sentences: 5
storage_path: {storage}
"""


def test_sweep_with_mlflow(tmp_path, ray_local, tiny_udpos):
    from mlflow import MlflowClient

    from topro import tracking

    config = tmp_path / "smoke.yaml"
    config.write_text(SWEEP.format(storage=tmp_path / "sweeps"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["sweep", "--config", str(config), "--tracking-uri", uri, "--summary", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    [trial] = summary["trials"]
    assert trial["status"] == "TERMINATED" and trial["average"]["n_languages"] == 1
    tracking.configure(uri)
    parent = tracking.find_sweep_run("smoke")
    [child] = tracking.child_runs(parent.info.run_id)
    assert parent.info.status == child.info.status == "FINISHED"
    assert "accuracy.de" in child.data.metrics and child.data.params["method"] == "vanilla"
    assert [r["name"] for r in summary["registered"]] == ["topro-udpos-vanilla"]
    assert MlflowClient().get_model_version_by_alias("topro-udpos-vanilla", "champion").run_id == child.info.run_id
