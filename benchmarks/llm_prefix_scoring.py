"""Shared-prefix label scoring vs. naive per-prompt scoring, same sentences, one run.

  python benchmarks/llm_prefix_scoring.py --model ~/.cache/offline-models/gemma-3-270m \\
      --sentences 5 --task panx --lang de --shots 0

Both methods run through the same HFBackend code path and model: `naive`
runs every (word, label) prompt in full, `shared` encodes the run's context
once, each sentence once, and all questions x labels of a sentence in one
tree-masked batch. Both compute logits only where a label token is
predicted. The two alternate sentence by sentence, so load from other
processes hits both alike. Prints tokens through the model and wall time for
each, checks that the predictions are identical (and the largest score
difference), and ends with `speedup <naive seconds / shared seconds>`.
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--sentences", type=int, default=5)
    parser.add_argument("--task", default="panx")
    parser.add_argument("--lang", default="de")
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--format", default="topro")
    parser.add_argument("--max-words", type=int, default=30, help="skip longer sentences")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=os.environ.get("TOPRO_DATA_DIR", "/work/shared/data/xtreme"))
    args = parser.parse_args()

    from topro.data import load_split
    from topro.llm.backends import HFBackend
    from topro.llm.evaluate import LLMEvalConfig, prepare
    from topro.llm.formats import render_topro

    torch.set_num_threads(args.threads)
    cfg = LLMEvalConfig(task=args.task, model=args.model, format=args.format, shots=args.shots,
                        data_dir=args.data_dir)
    setup = prepare(cfg)
    sentences = [s for s in load_split(setup.task, args.lang, "dev", args.data_dir, limit=args.sentences * 5)
                 if len(s) <= args.max_words][:args.sentences]
    shared = HFBackend(args.model, scoring="shared", threads=args.threads)
    naive = HFBackend.__new__(HFBackend)  # same model object, naive scoring
    naive.__dict__.update(shared.__dict__, scoring="naive", _contexts={})
    naive.counts = type(shared.counts)()
    labels = setup.task.labels
    seconds = {"naive": 0.0, "shared": 0.0}
    same, max_diff, words = 0, 0.0, 0
    for n, sentence in enumerate(sentences):
        p = render_topro(setup.fmt, setup.task.name, setup.label_words, setup.context, sentence.words)
        answers = [p.answers[t] for t in labels]
        results = {}
        for name, backend in (("naive", naive), ("shared", shared)) if n % 2 == 0 else \
                (("shared", shared), ("naive", naive)):
            start = time.perf_counter()
            results[name] = backend.score(p.context, p.sentence, p.questions, answers).logprobs
            seconds[name] += time.perf_counter() - start
        same += int((results["naive"].argmax(1) == results["shared"].argmax(1)).sum())
        words += len(sentence)
        max_diff = max(max_diff, float((results["naive"] - results["shared"]).abs().max()))
    print(f"model {args.model}; task {args.task} {args.lang}; format {args.format}, {args.shots}-shot; "
          f"{len(sentences)} sentences, {words} words x {len(labels)} labels; {args.threads} threads")
    for name, backend in (("naive", naive), ("shared", shared)):
        c = backend.counts
        print(f"{name:6s}  tokens {c.tokens:8d}  padded {c.padded:8d}  forwards {c.forwards:5d}  "
              f"seconds {seconds[name]:8.2f}")
    print(f"identical predictions: {same}/{words} words; max |score difference| {max_diff:.2e}")
    print(f"token ratio {naive.counts.tokens / max(shared.counts.tokens, 1):.1f}")
    print(f"speedup {seconds['naive'] / seconds['shared']:.2f}")


if __name__ == "__main__":
    main()
