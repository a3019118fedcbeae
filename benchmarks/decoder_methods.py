"""Training throughput of every method on a decoder-only LM, side by side with the machine's fp32 matmul, one run.

For each method (its ``configs/train/udpos-*.yaml`` with the ``--model`` and the overrides below) the
benchmark builds what ``topro train`` builds (``train.prepare``: method, model, frozen word embeddings,
LoRA, AdamW, schedule) on the first ``--sentences`` English UDPOS training sentences, then runs one
warm-up step and ``--steps`` timed steps through ``LocalStrategy.train_micro_batch`` (forward, backward,
clipping, AdamW step: ``topro train``'s own step), micro-batches as ``topro train`` draws them for epoch 1
(cycled when there are fewer). Each timed step runs under ``torch.utils.flop_counter.FlopCounterMode``,
which counts the FLOPs of every matmul, convolution and attention op dispatched (forward and backward; the
optimizer's elementwise update and the softmax/normalisation ops are not counted: they are a few percent
at most). Its overhead (Python dispatch per op) is inside the timing.

Per method it prints: trainable parameters, encoded examples (rows as batched: a word's prompt per word,
a sentence's packed row, a sentence window for vanilla), labelled words and tokens per second, counted
GFLOP per step, achieved GFLOP/s and that as a fraction of the fp32 matmul rate: a ``torch.mm`` of
[``--mm-rows``, hidden] x [hidden, intermediate] (the shape of the model's MLP input projection), timed
before and after the methods in the same process with the same threads (the higher of the two is the
baseline).

    python benchmarks/decoder_methods.py --model ~/.cache/offline-models/gemma-3-270m --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from topro.config import TrainConfig, load_config
from topro.train import LocalStrategy, epoch_batches, prepare

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "train"

# name -> (config file, overrides): each config's own settings, same sentences for all.
METHODS: dict[str, tuple[str, list[str]]] = {
    "topro per-word": ("udpos-topro.yaml", ["prompt_packing=per_word"]),
    "topro packed": ("udpos-topro.yaml", ["prompt_packing=sentence"]),
    "vanilla": ("udpos-vanilla.yaml", []),
    "prompt_tuning": ("udpos-prompt_tuning.yaml", []),
    "topro_soft": ("udpos-topro_soft.yaml", []),
    # RoSPrompt's config trains few-shot with unseen labels; here on the same first sentences as the rest.
    "rosprompt": ("udpos-rosprompt.yaml", ["unseen_labels=[]", "shots_per_label=null"]),
    "topro packed + LoRA": ("udpos-topro.yaml", ["prompt_packing=sentence", "adapter=lora"]),
}


@dataclass
class Result:
    name: str
    trainable: int
    examples: int
    words: int
    tokens: int
    seconds: float
    flops: int
    steps: int


def matmul_flops_per_s(rows: int, inner: int, outer: int, repeats: int = 20) -> float:
    """FLOP/s of an fp32 ``torch.mm`` [rows, inner] x [inner, outer] (median of ``repeats`` after a warm-up)."""
    a, b = torch.randn(rows, inner), torch.randn(inner, outer)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * rows * inner * outer / statistics.median(times)


def model_shape(model_dir: str) -> tuple[int, int]:
    """(hidden size, MLP intermediate size) from the model's ``config.json``."""
    config = json.loads((Path(model_dir).expanduser() / "config.json").read_text())
    config = config.get("text_config", config)
    return config["hidden_size"], config.get("intermediate_size") or 4 * config["hidden_size"]


def config_for(name: str, args: argparse.Namespace, output: str) -> TrainConfig:
    file, overrides = METHODS[name]
    common = [f"model={args.model}", f"max_train_sentences={args.sentences}", "max_dev_sentences=1", "eval_langs=[]",
              f"max_length={args.max_length}", f"max_packed_length={args.max_packed_length}",
              f"max_tokens_per_batch={args.max_tokens}", "progress=false", "device=cpu", "dtype=fp32",
              f"output_dir={output}", "grad_accum=1"]
    if args.data_dir:
        common.append(f"data_dir={args.data_dir}")
    return load_config(TrainConfig, CONFIGS / file, common + overrides)


def measure(name: str, args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory() as output:
        cfg = config_for(name, args, output)
        strategy = LocalStrategy(cfg)
        run = prepare(cfg, strategy)
        strategy.wrap(run.module, run.optimizer, run.scheduler)
        strategy.wrapped.train()
        batches = epoch_batches(cfg, run.lengths, 0, 0, 1, run.sizes)
        order = [batches[i % len(batches)] for i in range(args.steps + 1)]

        def step(batch_ids):
            chunk = [run.examples[i] for i in batch_ids]
            batch = run.method.collate(chunk)
            strategy.train_micro_batch(batch, True, None)
            return len(chunk), sum(len(e.words) for e in chunk), sum(e.length for e in chunk)

        step(order[0])  # warm-up: one-off allocations
        result = Result(name, run.summary["n_trainable_params"], 0, 0, 0, 0.0, 0, args.steps)
        for batch_ids in order[1:]:
            counter = FlopCounterMode(display=False)
            start = time.perf_counter()
            with counter:
                examples, words, tokens = step(batch_ids)
            result.seconds += time.perf_counter() - start
            result.flops += counter.get_total_flops()
            result.examples += examples
            result.words += words
            result.tokens += tokens
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="decoder-only LM folder (e.g. gemma-3-270m)")
    parser.add_argument("--sentences", type=int, default=4, help="first English UDPOS training sentences")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per method (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=1024, help="max_tokens_per_batch (padded tokens)")
    parser.add_argument("--max-length", type=int, default=512, help="max_length of one prompt")
    parser.add_argument("--max-packed-length", type=int, default=2048)
    parser.add_argument("--mm-rows", type=int, default=1024, help="rows of the baseline matmul")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS), metavar="NAME",
                        help=f"subset of: {', '.join(METHODS)}")
    parser.add_argument("--data-dir", default=os.environ.get("TOPRO_DATA_DIR"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hidden, intermediate = model_shape(args.model)
    before = matmul_flops_per_s(args.mm_rows, hidden, intermediate)
    results = [measure(name, args) for name in args.methods]
    after = matmul_flops_per_s(args.mm_rows, hidden, intermediate)
    peak = max(before, after)
    print(f"model {args.model}, {args.sentences} sentences, {args.steps} timed steps per method, "
          f"max_tokens_per_batch {args.max_tokens}, torch threads {torch.get_num_threads()}, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"fp32 torch.mm [{args.mm_rows}x{hidden}] x [{hidden}x{intermediate}]: {before / 1e9:.1f} GFLOP/s before, "
          f"{after / 1e9:.1f} after; baseline {peak / 1e9:.1f}")
    print("| method | trainable params | examples/s | words/s | tokens/s | GFLOP/step | GFLOP/s | of matmul |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        rate = r.flops / r.seconds
        print(f"| {r.name} | {r.trainable:,} | {r.examples / r.seconds:.2f} | {r.words / r.seconds:.2f} | "
              f"{r.tokens / r.seconds:.0f} | {r.flops / r.steps / 1e9:.1f} | {rate / 1e9:.1f} | {rate / peak:.2f} |")


if __name__ == "__main__":
    main()
