"""Per-language evaluation of one checkpoint: one after another vs parallel Ray actors; same results?

    python benchmarks/parallel_evaluation.py --checkpoint models:/topro-udpos-topro@champion \\
        --langs all --max-sentences 100 [--workers N] [--tracking-uri URI] [--output result.json]

Ray is started before timing, as in a sweep where the cluster is already up;
the actors' start-up (process, imports, one model load each) counts in the
parallel time, as it does in a sweep. The sequential run uses torch's default
threads (all cores); the parallel run gives each actor ``--cpus-per-worker``
CPUs and as many torch threads.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="folder or models:/name@alias")
    parser.add_argument("--langs", default="all")
    parser.add_argument("--max-sentences", type=int, default=100)
    parser.add_argument("--data-dir")
    parser.add_argument("--workers", type=int, help="evaluator actors (default: the cluster's CPUs)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--tracking-uri")
    parser.add_argument("--address")
    parser.add_argument("--output")
    args = parser.parse_args()

    from topro import tracking
    from topro.cluster.evaluation import evaluate_checkpoint_parallel
    from topro.cluster.runtime import init_ray
    from topro.evaluate import evaluate_checkpoint

    tracking.configure(args.tracking_uri)
    checkpoint = str(tracking.resolve_checkpoint(args.checkpoint))
    ray = init_ray(args.address)
    cpus = ray.cluster_resources().get("CPU")

    start = time.perf_counter()
    sequential = evaluate_checkpoint(checkpoint, args.langs, data_dir=args.data_dir, max_sentences=args.max_sentences,
                                     progress=False)
    sequential_s = time.perf_counter() - start

    stats: dict = {}
    start = time.perf_counter()
    parallel = evaluate_checkpoint_parallel(checkpoint, args.langs, address=args.address, data_dir=args.data_dir,
                                            max_sentences=args.max_sentences, num_workers=args.workers,
                                            cpus_per_worker=args.cpus_per_worker, progress=False, stats=stats)
    parallel_s = time.perf_counter() - start

    metric = sequential["metric"]
    differences = {lang: (r[metric], parallel["languages"][lang][metric]) for lang, r in sequential["languages"].items()
                   if r != parallel["languages"].get(lang)}
    result = {"checkpoint": args.checkpoint, "languages": len(sequential["languages"]),
              "max_sentences": args.max_sentences, "cluster_cpus": cpus,
              "sequential_seconds": round(sequential_s, 1), "parallel_seconds": round(parallel_s, 1),
              "speedup": round(sequential_s / parallel_s, 2),
              "parallel_workers": stats["workers"], "model_loads": stats["model_loads"], "identical_records": parallel == sequential,
              "languages_that_differ": differences, f"average_{metric}": sequential["average"][metric]}
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if parallel == sequential else 1


if __name__ == "__main__":
    sys.exit(main())
