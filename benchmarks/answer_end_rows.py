"""What ``answer_end_scored`` costs a causal LM's prompt methods, counted (no timing): per setting and label-word
source, the answers scored per question, the packed row's tokens per sentence and the full-vocabulary logit rows
read per question (each costs about one token of the body in the LM head: 262k x 640 on gemma-3-270m).

Counts, not seconds, so they hold on any machine; ``rosprompt_ablation.py`` runs the trainings.

    python benchmarks/answer_end_rows.py --model ~/.cache/offline-models/gemma-3-270m --sentences 20
"""
from __future__ import annotations

import argparse
import os

from topro.config import TrainConfig, load_config
from topro.data import load_split
from topro.methods import build_method
from topro.models import load_tokenizer, resolve_model_path
from topro.train import method_spec

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
    args = p.parse_args()
    path = resolve_model_path(args.model, args.task, args.data_dir)
    tokenizer = load_tokenizer(path)
    sentences = load_split(args.task, "en", "train", args.data_dir, limit=args.sentences)
    print(f"{args.model}, {args.task}, first {len(sentences)} English training sentences "
          f"({sum(map(len, sentences))} words), packed per sentence", flush=True)
    print("| method | label words | answer_end_scored | answers | answers with the end | tokens per sentence "
          "| logit rows per question |\n| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for row in args.rows:
        method_name, expansion, setting = row.split(":")
        overrides = [f"model={path}", "prompt_packing=sentence", f"answer_end_scored={setting}"]
        if method_name == "rosprompt":
            overrides += [f"unseen_labels=[{args.unseen}]", f"verbalizer_expansion={expansion}"]
        cfg = load_config(TrainConfig, f"configs/train/{args.task}-{method_name}.yaml", overrides)
        method = build_method(method_spec(cfg, path), path, tokenizer)
        rows = method.encode(sentences)
        questions = sum(len(r.words) for r in rows)
        with_end = sum(bool(end) for end in method.answer_ends)
        print(f"| {method_name} | {expansion} | {setting} | {method.n_scored} | {with_end} | "
              f"{sum(r.length for r in rows) / len(sentences):.1f} | "
              f"{sum(len(r.slots) for r in rows) / questions:.1f} |", flush=True)


if __name__ == "__main__":
    main()
