"""Tagging pace by forward-pass token budget and call size, side by side in one run.

    python benchmarks/token_budget.py --model runs/methods_e5/topro/checkpoint --sentences 64
    python benchmarks/token_budget.py --model CKPT --budgets 1024,2048,4096,8192 --chunks 1,32,64

For every ``max_tokens_per_batch`` budget a ``Tagger`` tags the same sentences in calls of
``chunk`` sentences each (1 = one request at a time; the whole set = offline batch
inference), with ``--threads`` torch threads. Printed per cell: sentences/s, system
CPU seconds and minor page faults, which show when a pass's buffers stop fitting and
are faulted in afresh each time. This is what ``topro.batching.default_max_tokens_per_batch``
(2048 on CPU) rests on.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder or models:/ URI")
    parser.add_argument("--budgets", default="1024,2048,4096,8192", help="max_tokens_per_batch values")
    parser.add_argument("--chunks", default="1,32,64", help="sentences per tag call")
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--task", default="udpos")
    parser.add_argument("--lang", default="de")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: what a Serve replica gets)")
    args = parser.parse_args(argv)

    import torch

    from topro.data import load_split
    from topro.data.readers import Sentence
    from topro.serving import Tagger

    torch.set_num_threads(args.threads)
    sentences = [Sentence(s.words, []) for s in load_split(args.task, args.lang, args.split, args.data_dir,
                                                           limit=args.sentences)]
    budgets = [int(b) for b in args.budgets.split(",") if b]
    chunks = [int(c) for c in args.chunks.split(",") if c]
    print(f"{len(sentences)} {args.task} {args.lang}/{args.split} sentences, {args.threads} thread(s), "
          f"model {args.model}\n", flush=True)
    rows = []
    for budget in budgets:
        tagger = Tagger.load(args.model, device="cpu", max_tokens_per_batch=budget)
        tagger.tag(sentences[:4])  # warm-up
        for chunk in chunks:
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for i in range(0, len(sentences), chunk):
                tagger.tag(sentences[i:i + chunk])
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            rows.append((budget, chunk, len(sentences) / seconds, after.ru_stime - before.ru_stime,
                         after.ru_minflt - before.ru_minflt))
            print(f"max_tokens_per_batch {budget}, {chunk} per call: {rows[-1][2]:.2f} sentences/s", flush=True)
    print("\n| max_tokens_per_batch | sentences per call | sentences/s | system CPU s | minor faults |")
    print("|---|---|---|---|---|")
    for budget, chunk, pace, sys_s, faults in rows:
        print(f"| {budget} | {chunk} | {pace:.2f} | {sys_s:.1f} | {faults} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
