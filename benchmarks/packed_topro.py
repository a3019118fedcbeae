"""Packed ToPro vs per-word ToPro: tokens, training and evaluation pace, same model and sentences, one run.

per_word: the paper's layout, one prompt per word, each holding the whole sentence.
sentence: ``prompt_packing: sentence`` (methods/packing.py), one row per sentence
          window holding every word's question behind a block attention mask.

Both train with real steps (forward, backward, clipping, ``topro train``'s AdamW; word embeddings
frozen as ``topro train`` does for pretrained models) on the first
``--sentences`` English training sentences of ``--task`` (UDPOS or PAN-X), batched as ``topro train``
batches them (``--batch-size`` questions, ``--max-tokens`` padded tokens per
micro-batch), from the same initial weights; then predict the first
``--sentences`` English dev sentences as ``topro evaluate`` does. The two modes
run interleaved in ``--rounds`` rounds (a slice of one, then the same slice of
the other), so a change in machine load hits both alike. Prints tokens per
sentence, training prompts (questions) per second and evaluation words per
second for each; the last two lines are ``train_speedup <ratio>`` and
``eval_speedup <ratio>`` (sentence over per_word). ``--variants`` times other layouts in the same run:
``MODE:ANSWER_END`` pairs (``answer_end_scored`` of a causal LM: ``always``, ``when_needed``, ``per_answer``), each
reported as a speedup over the first; the last two lines are then the last variant's over the first.

    python benchmarks/packed_topro.py --model /work/models/multilingual-e5-small --sentences 40
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from topro.batching import token_budget_batches
from topro.config import TrainConfig
from topro.data import load_split
from topro.evaluate import predict
from topro.methods import build_method
from topro.models import resolve_model_path
from topro.train import build_optimizer, embeddings_frozen, freeze_input_embeddings, method_spec

MODES = ("per_word", "sentence")
ANSWER_END = ("always", "when_needed", "per_answer")


def variant(text: str) -> tuple[str, str]:
    """``MODE`` or ``MODE:ANSWER_END`` (``--variants``) as (prompt_packing, answer_end_scored)."""
    mode, _, end = text.partition(":")
    if mode not in MODES or (end or "always") not in ANSWER_END:
        raise argparse.ArgumentTypeError(f"{text!r}: not MODE[:ANSWER_END] with MODE in {MODES}, "
                                         f"ANSWER_END in {ANSWER_END}")
    return mode, end or "always"


def rounds_of(items: list, rounds: int) -> list[list]:
    size = -(-len(items) // rounds)
    return [items[i:i + size] for i in range(0, len(items), size)]


def build_parser(description: str = __doc__, model_default: str | None = "tiny") -> argparse.ArgumentParser:
    """The options (``causal_topro.py`` takes the same ones, with a causal LM's defaults)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=model_default, required=model_default is None,
                        help=f"LM folder or id (default: {model_default})")
    parser.add_argument("--task", default="udpos", choices=["udpos", "panx"])
    parser.add_argument("--sentences", type=int, default=40, help="English sentences (train and dev)")
    parser.add_argument("--batch-size", type=int, default=32, help="questions per micro-batch")
    parser.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per training micro-batch")
    parser.add_argument("--eval-max-tokens", type=int, default=8192, help="padded tokens per evaluation batch")
    parser.add_argument("--max-packed-length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--data-dir", default=os.environ.get("TOPRO_DATA_DIR"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=128, help="max_length of one prompt")
    parser.add_argument("--variants", type=variant, nargs="+", default=[(m, "always") for m in MODES],
                        metavar="MODE[:ANSWER_END]",
                        help="layouts timed, the first the baseline (default: per_word sentence); ANSWER_END: "
                             "answer_end_scored on a causal LM: always (default), when_needed or per_answer")
    return parser


def main(parser: argparse.ArgumentParser | None = None) -> None:
    args = (parser or build_parser()).parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_sentences = load_split(args.task, "en", "train", args.data_dir, limit=args.sentences)
    dev_sentences = load_split(args.task, "en", "dev", args.data_dir, limit=args.sentences)
    n_train_words = sum(len(s) for s in train_sentences)
    n_dev_words = sum(len(s) for s in dev_sentences)
    path = resolve_model_path(args.model, args.task, args.data_dir)

    setups = {}
    for mode, answer_end in args.variants:
        name = mode if answer_end == "always" else f"{mode}:{answer_end}"
        cfg = TrainConfig(task=args.task, method="topro", model=args.model, data_dir=args.data_dir,
                          batch_size=args.batch_size, max_tokens_per_batch=args.max_tokens, prompt_packing=mode,
                          max_packed_length=args.max_packed_length, max_length=args.max_length,
                          answer_end_scored=answer_end)
        method = build_method(method_spec(cfg, path), path)
        examples = method.encode(train_sentences)
        batches = token_budget_batches([e.length for e in examples], args.max_tokens, args.batch_size,
                                       shuffle=True, seed=0, sizes=[e.batch_units for e in examples])
        torch.manual_seed(0)
        model = method.build_model(path)
        if embeddings_frozen(cfg):
            freeze_input_embeddings(model)
        params = [p for p in model.parameters() if p.requires_grad]
        setups[name] = {"method": method, "model": model, "params": params, "examples": examples,
                        "optimizer": build_optimizer(cfg, model, len(batches))[0], "batches": batches,
                        "train_s": 0.0, "eval_s": 0.0, "prompts": 0}
        tokens = sum(e.length for e in examples)
        print(f"{name:<9} {len(examples):>6} inputs for {n_train_words} words, {tokens / len(train_sentences):8.1f} "
              f"tokens per sentence, {len(batches)} micro-batches", flush=True)
    print(f"model {args.model}, {args.task}, {len(train_sentences)} train / {len(dev_sentences)} dev sentences, batch "
          f"{args.batch_size} questions, torch threads {torch.get_num_threads()}", flush=True)

    def train_step(s, batch_ids):
        chunk = [s["examples"][i] for i in batch_ids]
        batch = s["method"].collate(chunk)
        start = time.perf_counter()
        loss = s["method"].loss(s["model"], batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s["params"], 1.0)
        s["optimizer"].step()
        s["optimizer"].zero_grad(set_to_none=True)
        return time.perf_counter() - start, sum(len(e.words) for e in chunk)

    for s in setups.values():  # one warm-up step each: one-off allocation costs
        s["model"].train()
        train_step(s, s["batches"][0])
    slices = {mode: rounds_of(s["batches"], args.rounds) for mode, s in setups.items()}
    for r in range(args.rounds):
        for mode, s in setups.items():
            for batch_ids in slices[mode][r] if r < len(slices[mode]) else []:
                seconds, n = train_step(s, batch_ids)
                s["train_s"] += seconds
                s["prompts"] += n
    dev_rounds = rounds_of(dev_sentences, args.rounds)
    for r, part in enumerate(dev_rounds):
        for mode, s in setups.items():
            start = time.perf_counter()
            predict(s["method"], s["model"], part, max_tokens_per_batch=args.eval_max_tokens, max_examples=128)
            s["eval_s"] += time.perf_counter() - start

    rates = {}
    for mode, s in setups.items():
        rates[mode] = (s["prompts"] / s["train_s"], n_dev_words / s["eval_s"])
        slots = sum(len(getattr(e, "slots", ())) for e in s["examples"])
        if slots:  # causal rows: full-vocabulary logit rows read
            print(f"{mode:<9} {slots / n_train_words:.1f} logit rows per word", flush=True)
        print(f"{mode:<9} train {s['prompts']:>6} prompts {s['train_s']:8.1f} s {rates[mode][0]:8.1f} prompts/s | "
              f"eval {n_dev_words} words {s['eval_s']:7.1f} s {rates[mode][1]:8.1f} words/s", flush=True)
    names = list(rates)
    for name in names[1:-1]:
        print(f"{name} over {names[0]}: train {rates[name][0] / rates[names[0]][0]:.2f}x, "
              f"eval {rates[name][1] / rates[names[0]][1]:.2f}x")
    print(f"train_speedup {rates[names[-1]][0] / rates[names[0]][0]:.2f}")
    print(f"eval_speedup {rates[names[-1]][1] / rates[names[0]][1]:.2f}")


if __name__ == "__main__":
    main()
