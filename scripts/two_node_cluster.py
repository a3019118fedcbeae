"""Two Ray nodes on this machine's loopback, and topro's cluster paths run across them.

Starts a head (``head``) and a second node (``node2``, custom resource
``{"node2": 1}``) with ``topro.cluster.local_cluster``, each with 1 CPU, its
own temp dir and free ports, and then, every step a separate driver process:

1. ``ray job submit``: DDP, 2 workers placed ``SPREAD`` (one per node); the
   worker on node2 is SIGKILLed at step 6 and the run finishes from its step-4
   checkpoint;
2. ``RAY_ADDRESS``: DeepSpeed ZeRO-2, the same layout and kill;
3. ``RAY_ADDRESS``: a small sweep (2 trials at once, one Train worker each)
   whose trials run on both nodes, recorded in MLflow with their nodes;
4. ``topro evaluate --parallel --address``: per-language evaluation whose
   actors run on both nodes, compared with a one-process run.

Every record names the node of each worker, trial and actor; the script
prints them, checks them, and stops the cluster it started (and nothing else).

    python scripts/two_node_cluster.py [--parts ddp,deepspeed,sweep,eval] [--keep]

Tiny model, tens of sentences: about 8 minutes on a loaded 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "platform"))

from topro.cluster.local_cluster import NodeSpec, node_env, start_local_cluster  # noqa: E402

# Small enough for a shared 2-core machine; vanilla learns visibly in these steps with the tiny model.
SMALL = ["max_train_sentences=80", "max_dev_sentences=20", "epochs=1", "max_length=64", "batch_size=8",
         "learning_rate=3e-3", "eval_langs=[]", "progress=false", "num_threads=1"]
# 0.6 CPU per worker on 1-CPU nodes: two workers cannot share a node, so they land on both.
# (Options first, then key=value overrides: argparse takes the overrides as one run of positionals.)
SPREAD_TWO = ["--workers", "2", "placement_strategy=SPREAD", "cpus_per_worker=0.6", "eval_every_steps=4",
              "fault_step=6", "fault_node=node2", "max_failures=1", "patience=100"]


def run(cmd: list[str], env: dict[str, str], log: Path) -> str:
    print("$", " ".join(cmd), flush=True)
    started = time.time()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    print(f"  ({time.time() - started:.0f}s, log {log})", flush=True)
    if proc.returncode != 0:
        print((proc.stdout + proc.stderr)[-4000:])
        raise SystemExit(f"failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return proc.stdout + proc.stderr


def show_train(name: str, out: Path, output: str) -> dict:
    summary = json.loads((out / "metrics.json").read_text())
    nodes = {w["rank"]: w["node"] for w in summary["workers"]}
    fault = summary.get("fault_injected") or {}
    print(f"[{name}] workers: " + ", ".join(f"rank {r} on {n}" for r, n in sorted(nodes.items())))
    for line in output.splitlines():
        if "fault injection: killing" in line or "resumed from step" in line:
            print(f"[{name}]   {line.strip()[-160:]}")
    print(f"[{name}] killed rank {fault.get('rank')} on {fault.get('node')} at step {fault.get('step')}; "
          f"resumed from step {summary['resumed_from_step']}; finished {summary['steps']} steps, "
          f"best dev accuracy {summary['best_dev_accuracy']:.4f} at step {summary['best_step']}")
    assert set(nodes.values()) == {"head", "node2"}, nodes
    assert fault.get("node") == "node2" and summary["resumed_from_step"] == 4, (fault, summary["resumed_from_step"])
    assert summary["steps"] == summary["steps_per_epoch"]
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="ddp,deepspeed,sweep,eval")
    parser.add_argument("--work", help="work folder (default: a new one under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    parts = args.parts.split(",")
    work = Path(args.work or tempfile.mkdtemp(prefix="topro-two-nodes-")).resolve()
    data_dir = os.environ.get("TOPRO_DATA_DIR", str(REPO.parent / "shared" / "data" / "xtreme"))
    python = sys.executable
    started = time.time()
    # The tiny model is built once here: workers that find no cached copy each build one into the same
    # cache folder, and one of two building at once read the other's half-written config (seen).
    os.environ.setdefault("TOPRO_CACHE", str(REPO / ".cache" / "topro"))
    from topro.models import build_tiny_model

    build_tiny_model("udpos", data_dir)
    cluster = start_local_cluster(work / "cluster", [NodeSpec("head", 1), NodeSpec("node2", 1)])
    print(f"cluster up in {time.time() - started:.0f}s: GCS {cluster.address}, dashboard {cluster.dashboard_url}")
    env = {**node_env(), "TOPRO_DATA_DIR": data_dir, "PYTHONPATH": f"{REPO / 'platform'}{os.pathsep}{REPO}",
           "HF_HUB_OFFLINE": "1", "TOPRO_CACHE": os.environ.get("TOPRO_CACHE", str(REPO / ".cache" / "topro"))}
    driver_env = {**env, "RAY_ADDRESS": cluster.address}
    try:
        if "ddp" in parts:
            out = work / "ddp"
            runtime_env = {"py_modules": [str(REPO / "platform" / "topro")],
                           "env_vars": {k: env[k] for k in ("TOPRO_DATA_DIR", "TOPRO_CACHE", "HF_HUB_OFFLINE")}}
            output = run([str(Path(python).parent / "ray"), "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO),
                          "--runtime-env-json", json.dumps(runtime_env), "--",
                          "python", "-m", "topro.cli", "train", "--config", "configs/train/udpos-vanilla.yaml",
                          "--data-dir", data_dir, "--output", str(out), "--strategy", "ddp", *SPREAD_TWO, *SMALL],
                         env, work / "ddp.log")
            show_train("ddp, ray job submit", out, output)
        if "deepspeed" in parts:
            out = work / "zero2"
            output = run([python, "-m", "topro.cli", "train", "--config", "configs/train/udpos-vanilla.yaml",
                          "--data-dir", data_dir, "--output", str(out), "--strategy", "deepspeed",
                          *SPREAD_TWO, "deepspeed_config=zero2", *SMALL], driver_env, work / "zero2.log")
            show_train("deepspeed zero2, RAY_ADDRESS", out, output)
        if "sweep" in parts:
            tracking = f"sqlite:///{work / 'mlflow.db'}"
            run([python, "jobs/sweep.py", "--config", "configs/sweeps/demo.yaml", "--tracking-uri", tracking,
                 "name=two-nodes", f"storage_path={work / 'sweeps'}", "max_train_sentences=30",
                 "max_dev_sentences=10", "base.epochs=1", "base.cpus_per_worker=0.6", "max_concurrent_trials=2",
                 "search_space.learning_rate.grid=[1e-3]", "eval_langs=[de,ru,fr,id]", "max_sentences=10",
                 "eval_cpus_per_worker=0.6", "eval_workers=2"], driver_env, work / "sweep.log")
            show_sweep(tracking)
        if "eval" in parts:
            checkpoint = work / "ddp" / "checkpoint"
            if not checkpoint.is_dir():
                raise SystemExit("the eval part needs the ddp part's checkpoint")
            # fp64: the results then agree whatever order each process sums in (threads differ)
            common = ["--checkpoint", str(checkpoint), "--langs", "de,ru,fr,id,ja,ar", "--max-sentences", "20",
                      "--data-dir", data_dir, "--dtype", "fp64"]
            run([python, "-m", "topro.cli", "evaluate", *common, "--parallel", "--address", cluster.address,
                 "--output", str(work / "eval-two-nodes.json")], driver_env, work / "eval-two-nodes.log")
            run([python, "-m", "topro.cli", "evaluate", *common, "--output", str(work / "eval-one-process.json")],
                {k: v for k, v in env.items() if k != "RAY_ADDRESS"}, work / "eval-one-process.log")
            two = json.loads((work / "eval-two-nodes.json").read_text())
            one = json.loads((work / "eval-one-process.json").read_text())
            print("[eval] language -> node: " + ", ".join(f"{k} on {v}" for k, v in two["nodes"].items()))
            same = two["languages"] == one["languages"] and (  # the scores, then the per-sentence predictions
                json.loads((work / "eval-two-nodes.predictions.json").read_text())
                == json.loads((work / "eval-one-process.predictions.json").read_text()))
            print(f"[eval] results identical to the one-process run: {same} "
                  f"(mean accuracy {two['average']['accuracy']:.4f} vs {one['average']['accuracy']:.4f})")
            assert same and set(two["nodes"].values()) == {"head", "node2"}, two["nodes"]
    finally:
        cluster.stop()
        print(f"cluster stopped; total {time.time() - started:.0f}s; work folder {work}"
              + ("" if args.keep else " (removed)"))
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)])
    return 0


def show_sweep(tracking: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("topro-sweep-two-nodes")
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    nodes = set()
    for r in sorted(trials, key=lambda r: r.info.run_name):
        tags = r.data.tags
        nodes.update(tags.get("topro.worker_nodes", "").split(","))
        print(f"[sweep] {r.info.run_name}: {r.info.status}, trial driver on {tags.get('topro.trial_node')}, "
              f"Train worker on {tags.get('topro.worker_nodes')}, evaluated on {tags.get('topro.eval_nodes', '-')}")
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    assert nodes == {"head", "node2"}, nodes


if __name__ == "__main__":
    sys.exit(main())
