"""Training steps of packed vs per-word ToPro, timed (and with ``--profile`` the top operators).

Runs ``topro train``'s step (forward, backward, clipping, fused AdamW; word embeddings frozen) on
batches of the first ``--sentences`` English training sentences of ``--task``, after one warm-up step,
and prints seconds per step, questions and real tokens per second for each ``--modes`` entry.
``--profile`` adds torch's profiler table (self CPU time) per mode: where a packed step's time goes.

    python benchmarks/packed_step.py --model ~/.cache/offline-models/multilingual-e5-small --threads 2
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from topro.batching import token_budget_batches
from topro.config import TrainConfig
from topro.data import load_split
from topro.methods import build_method
from topro.models import resolve_model_path
from topro.train import build_optimizer, freeze_input_embeddings, method_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--task", default="udpos", choices=["udpos", "panx"])
    parser.add_argument("--modes", default="per_word,sentence")
    parser.add_argument("--sentences", type=int, default=120)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--packed-word-bias", type=float, default=0.0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--data-dir", default=os.environ.get("TOPRO_DATA_DIR"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sentences = load_split(args.task, "en", "train", args.data_dir, limit=args.sentences)
    path = resolve_model_path(args.model, args.task, args.data_dir)
    for mode in args.modes.split(","):
        cfg = TrainConfig(task=args.task, method="topro", model=args.model, data_dir=args.data_dir, batch_size=32,
                          prompt_packing=mode,
                          packed_word_bias=args.packed_word_bias if mode == "sentence" else 0.0)
        method = build_method(method_spec(cfg, path), path)
        examples = method.encode(sentences)
        batches = token_budget_batches([e.length for e in examples], cfg.max_tokens_per_batch, cfg.batch_size,
                                       shuffle=True, seed=0, sizes=[e.batch_units for e in examples])
        torch.manual_seed(0)
        model = method.build_model(path)
        freeze_input_embeddings(model)
        model.train()
        optimizer = build_optimizer(cfg, model, len(batches))[0]
        params = [p for p in model.parameters() if p.requires_grad]

        def step(ids: list[int]) -> tuple[int, int]:
            batch = method.collate([examples[i] for i in ids])
            method.loss(model, batch).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return sum(len(examples[i].words) for i in ids), int(batch["attention_mask"].sum())

        step(batches[0])
        timed = batches[1:1 + args.steps]
        profiler = profile(activities=[ProfilerActivity.CPU]) if args.profile else None
        if profiler:
            profiler.__enter__()
        start = time.perf_counter()
        questions = tokens = 0
        for ids in timed:
            q, t = step(ids)
            questions, tokens = questions + q, tokens + t
        seconds = time.perf_counter() - start
        if profiler:
            profiler.__exit__(None, None, None)
        print(f"{args.task} {mode:<9} threads {torch.get_num_threads()}: {len(timed)} steps {seconds:.1f} s, "
              f"{seconds / len(timed):.3f} s/step, {questions / len(timed):.1f} questions/step, "
              f"{questions / seconds:.1f} questions/s, {tokens / seconds:.0f} real tokens/s", flush=True)
        if profiler:
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
