"""What ``answer_end_scored`` costs a causal LM's prompt methods, counted (no timing): per setting and label-word
source, the answers scored per question, the packed row's tokens per sentence and the full-vocabulary logit rows
read per question (each costs about one token of the body in the LM head: 262k x 640 on gemma-3-270m).

Counts, not seconds, so they hold on any machine; ``rosprompt_ablation.py`` runs the trainings. With
``--time-steps N`` it also times N training passes (loss and backward, no optimizer) per row on one batch of
the first ``--batch-sentences`` sentences, the rows interleaved step by step so a change in machine load hits
all alike, and prints seconds per pass beside the counts (compare them within one run only).

    python benchmarks/answer_end_rows.py --model ~/.cache/offline-models/gemma-3-270m --sentences 20
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from topro.config import TrainConfig, load_config
from topro.data import load_split
from topro.methods import build_method
from topro.methods.base import hide_unseen_gold
from topro.models import load_tokenizer, resolve_model_path
from topro.train import method_spec
from topro.unseen import unseen_label_indices

# (method, verbalizer_expansion, answer_end_scored): RoSPrompt's seed words alone (the ablation's no_knn) and with
# the kNN words, under each setting.
DEFAULT_ROWS = ["rosprompt:none:always", "rosprompt:none:when_needed", "rosprompt:none:per_answer",
                "rosprompt:knn:always", "rosprompt:knn:per_answer"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--task", default="udpos", choices=["udpos", "panx"])
    p.add_argument("--unseen", default="NUM,PROPN,SCONJ", help="unseen labels (RoSPrompt's config)")
    p.add_argument("--sentences", type=int, default=20, help="first English training sentences")
    p.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, metavar="METHOD:EXPANSION:ANSWER_END")
    p.add_argument("--data-dir", default=os.environ.get("TOPRO_DATA_DIR"))
    p.add_argument("--time-steps", type=int, default=0, help="also time this many loss + backward passes per row")
    p.add_argument("--batch-sentences", type=int, default=4, help="sentences in the timed batch")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model, args.task, args.data_dir)
    tokenizer = load_tokenizer(path)
    sentences = load_split(args.task, "en", "train", args.data_dir, limit=args.sentences)
    print(f"{args.model}, {args.task}, first {len(sentences)} English training sentences "
          f"({sum(map(len, sentences))} words), packed per sentence", flush=True)
    print("| method | label words | answer_end_scored | answers | answers with the end | tokens per sentence "
          "| logit rows per question |\n| --- | --- | --- | ---: | ---: | ---: | ---: |")
    timed = []
    for row in args.rows:
        method_name, expansion, setting = row.split(":")
        overrides = [f"model={path}", "prompt_packing=sentence", f"answer_end_scored={setting}"]
        if method_name == "rosprompt":
            overrides += [f"unseen_labels=[{args.unseen}]", f"verbalizer_expansion={expansion}"]
        cfg = load_config(TrainConfig, f"configs/train/{args.task}-{method_name}.yaml", overrides)
        spec = method_spec(cfg, path)
        method = build_method(spec, path, tokenizer)
        # As topro train does: unseen-label gold words carry no loss.
        rows, _ = hide_unseen_gold(method.encode(sentences), unseen_label_indices(method.labels, spec.unseen_labels))
        questions = sum(len(r.words) for r in rows)
        with_end = sum(bool(end) for end in method.answer_ends)
        print(f"| {method_name} | {expansion} | {setting} | {method.n_scored} | {with_end} | "
              f"{sum(r.length for r in rows) / len(sentences):.1f} | "
              f"{sum(len(r.slots) for r in rows) / questions:.1f} |", flush=True)
        if args.time_steps:
            torch.manual_seed(0)
            model = method.build_model(path)
            model.train()
            timed.append((row, method, model, method.collate(rows[:args.batch_sentences])))
    seconds = [0.0] * len(timed)
    for _ in range(args.time_steps):
        for i, (_, method, model, batch) in enumerate(timed):
            start = time.perf_counter()
            method.loss(model, batch).backward()
            seconds[i] += time.perf_counter() - start
            model.zero_grad(set_to_none=True)
    if timed:
        print(f"\nloss + backward on the first {args.batch_sentences} sentences' rows, {args.time_steps} passes each, "
              f"interleaved, torch threads {torch.get_num_threads()}:")
        for (row, *_), total in zip(timed, seconds):
            print(f"{row:<32} {total / args.time_steps:8.2f} s per pass", flush=True)


if __name__ == "__main__":
    main()
