"""Shared-prefix label scoring vs. naive per-prompt scoring, same sentences, one run.

  python benchmarks/llm_prefix_scoring.py --model ~/.cache/offline-models/gemma-3-270m \\
      --sentences 5 --task panx --lang de --shots 0

All run through the same HFBackend code and model object: `naive` runs
every (word, label) prompt in full (batched, right padding); `shared`
encodes the run's context once and then each sentence with all its
questions x labels as one tree-masked forward; `packed` is `shared` with
`--pack` sentences per forward (what `topro eval-llm` does). All compute
logits only where a label token is predicted. They take turns group by
group, so load from other processes hits all alike. Prints tokens through
the model and wall time for each, checks that the predictions are identical
to naive's (and the largest score difference), and ends with
`speedup <naive seconds / shared seconds>` (one sentence per forward).
"""
from __future__ import annotations

import argparse
import os
import time
from collections import OrderedDict

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
    parser.add_argument("--pack", type=int, default=4, help="sentences per score_many call (packed)")
    parser.add_argument("--data-dir", default=os.environ.get("TOPRO_DATA_DIR", "/work/shared/data/xtreme"))
    args = parser.parse_args()

    from topro.data import load_split
    from topro.llm.backends import HFBackend
    from topro.llm.evaluate import LLMEvalConfig, prepare
    from topro.prompts.formats import render_topro

    torch.set_num_threads(args.threads)
    cfg = LLMEvalConfig(task=args.task, model=args.model, format=args.format, shots=args.shots,
                        data_dir=args.data_dir)
    setup = prepare(cfg)
    sentences = [s for s in load_split(setup.task, args.lang, "dev", args.data_dir, limit=args.sentences * 5)
                 if len(s) <= args.max_words][:args.sentences]
    shared = HFBackend(args.model, scoring="shared", threads=args.threads)

    def twin(scoring: str) -> HFBackend:  # the same model object, its own counters and cache
        other = HFBackend.__new__(HFBackend)
        other.__dict__.update(shared.__dict__, scoring=scoring, _contexts=OrderedDict())
        other.counts = type(shared.counts)()
        return other

    backends = {"naive": twin("naive"), "shared": shared, "packed": twin("shared")}
    labels = setup.task.labels
    rendered = [render_topro(setup.fmt, setup.task.name, setup.label_words, setup.context, s.words)
                for s in sentences]
    answers = [rendered[0].answers[t] for t in labels]
    seconds = {name: 0.0 for name in backends}
    scores: dict[str, list] = {name: [] for name in backends}

    def run(name: str, group: list) -> list:
        backend = backends[name]
        if name == "packed":
            return [r.logprobs for r in backend.score_many(setup.context, [(p.sentence, p.questions)
                                                                           for p in group], answers)]
        return [backend.score(p.context, p.sentence, p.questions, answers).logprobs for p in group]

    names = list(backends)
    for g, start in enumerate(range(0, len(rendered), args.pack)):
        group = rendered[start:start + args.pack]
        for name in names[g % 3:] + names[:g % 3]:  # rotate the order: load hits all alike
            t0 = time.perf_counter()
            scores[name].extend(run(name, group))
            seconds[name] += time.perf_counter() - t0
    words = sum(len(s) for s in sentences)
    print(f"model {args.model}; task {args.task} {args.lang}; format {args.format}, {args.shots}-shot; "
          f"{len(sentences)} sentences, {words} words x {len(labels)} labels; {args.threads} threads; "
          f"packed: {args.pack} sentences per call")
    for name, backend in backends.items():
        c = backend.counts
        print(f"{name:6s}  tokens {c.tokens:8d}  padded {c.padded:8d}  forwards {c.forwards:5d}  "
              f"seconds {seconds[name]:8.2f}")
    for name in ("shared", "packed"):
        same = sum(int((a.argmax(1) == b.argmax(1)).sum()) for a, b in zip(scores["naive"], scores[name]))
        diff = max(float((a - b).abs().max()) for a, b in zip(scores["naive"], scores[name]))
        print(f"{name}: identical predictions {same}/{words} words; max |score difference| {diff:.2e}")
    print(f"token ratio naive/shared {backends['naive'].counts.tokens / max(shared.counts.tokens, 1):.1f}")
    print(f"speedup packed {seconds['naive'] / seconds['packed']:.2f}")
    print(f"speedup {seconds['naive'] / seconds['shared']:.2f}")

if __name__ == "__main__":
    main()
