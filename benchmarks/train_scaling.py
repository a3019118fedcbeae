"""Training throughput on Ray Train with 1 and N workers for the same config, side by side.

    python benchmarks/train_scaling.py --config configs/train/udpos-topro.yaml --workers 1,2 \
        max_train_sentences=200 epochs=1

Every run goes through the same path (``train_on_ray`` with the chosen
strategy), so only the number of workers changes; the global batch is the
same for all (see ``topro.train``). Throughput is training examples (prompts
for ToPro, sentences for vanilla) over all workers per second of the training
loop (forward, backward, optimizer step; evaluation, checkpointing and Ray
start-up excluded); wall time includes everything.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


from topro.cluster.runtime import init_ray
from topro.cluster.trainer import train_on_ray
from topro.config import TrainConfig, load_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/train/udpos-topro.yaml")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "deepspeed"])
    parser.add_argument("--output", help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    args = parser.parse_args()

    root = Path(args.output or tempfile.mkdtemp(prefix="topro-train-scaling-"))
    init_ray()
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        cfg = load_config(TrainConfig, args.config, [*args.overrides, f"workers={workers}",
                                                     f"strategy={args.strategy}", "eval_langs=[]",
                                                     f"output_dir={root / f'workers-{workers}'}"])
        start = time.perf_counter()
        summary = train_on_ray(cfg)
        wall = time.perf_counter() - start
        metric = next(k for k in summary if k.startswith("best_dev_"))
        rows.append({"workers": workers, "strategy": args.strategy,
                     "examples_per_second": summary["examples_per_second"],
                     "train_seconds": summary["train_seconds"], "wall_seconds": wall, "steps": summary["steps"],
                     "n_train_examples": summary["n_train_examples"], metric: summary[metric]})
    base = rows[0]["examples_per_second"]
    print(f"\nconfig {args.config} {' '.join(args.overrides)} | strategy {args.strategy} | "
          f"{os.cpu_count()} CPUs | load average {os.getloadavg()[0]:.1f}")
    print(f"| workers | examples/s | speed-up | train s | wall s | steps | {metric} |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['examples_per_second']:.1f} | {r['examples_per_second'] / base:.2f}x "
              f"| {r['train_seconds']:.1f} | {r['wall_seconds']:.1f} | {r['steps']} | {r[metric]:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
