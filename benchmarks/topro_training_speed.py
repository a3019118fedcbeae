"""ToPro training throughput: the published code's way vs ours, same model, same prompts, one run.

published: every prompt padded to ``--pad-to`` (128) tokens, full-vocabulary MLM
           logits at every position, then the mask row and label columns picked.
ours-all:  length-bucketed dynamic padding under a token budget, encoder output
           gathered at the mask, MLM head applied to label-word rows only; every
           parameter trained, as in the published code (same optimisation problem).
ours:      the same, with our training default for pretrained models: the word-
           embedding matrix frozen (``freeze_embeddings``), which removes the dense
           250k x d embedding gradient and its AdamW update from every step.

All run real training steps (forward, backward, clipping, AdamW) over the same
prompts from the first ``--sentences`` English UDPOS training sentences, with
the same number of prompts per batch. Prints prompts/s for each; the last line
is ``speedup <ratio>`` (ours vs published).

    python benchmarks/topro_training_speed.py --model ~/.cache/offline-models/multilingual-e5-small --sentences 40
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from topro.batching import token_budget_batches
from topro.config import TrainConfig
from topro.data import load_split
from topro.methods import build_method
from topro.methods.topro_mlm import full_vocab_label_logits
from topro.models import resolve_model_path
from topro.train import embeddings_frozen, freeze_input_embeddings, method_spec


def published_batches(examples, batch_size, pad_to, pad_id):
    """Fixed-size batches in data order, each prompt right-padded to ``pad_to`` tokens."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        ids = torch.full((len(chunk), pad_to), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        types = torch.zeros_like(ids)
        for row, e in enumerate(chunk):
            n = min(e.length, pad_to)
            ids[row, :n] = torch.tensor(e.input_ids[:n])
            mask[row, :n] = 1
            if e.token_type_ids:
                types[row, :n] = torch.tensor(e.token_type_ids[:n])
        yield {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
               "label_rows": torch.arange(len(chunk)),
               "label_positions": torch.tensor([e.positions[0] for e in chunk]),
               "labels": torch.tensor([e.labels[0] for e in chunk])}, len(chunk)


def run(name, model, batches, step_loss, warmup=2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    prompts, seconds = 0, 0.0
    for i, (batch, n) in enumerate(batches):
        start = time.perf_counter()
        loss = step_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:  # first steps pay one-off allocation costs
            seconds += time.perf_counter() - start
            prompts += n
    rate = prompts / seconds
    print(f"{name:<10} {prompts:>6} prompts  {seconds:8.1f} s  {rate:8.1f} prompts/s", flush=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="masked LM folder or id (default: tiny)")
    parser.add_argument("--sentences", type=int, default=40, help="English UDPOS training sentences")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (the paper's 8)")
    parser.add_argument("--pad-to", type=int, default=128)
    parser.add_argument("--data-dir", default=os.environ.get("TOPRO_DATA_DIR"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(task="udpos", method="topro", model=args.model, max_length=args.pad_to, data_dir=args.data_dir)
    path = resolve_model_path(args.model, "udpos", args.data_dir)
    method = build_method(method_spec(cfg, path), path)
    sentences = load_split("udpos", "en", "train", args.data_dir, limit=args.sentences)
    examples = method.encode(sentences)
    vocab = method.tokenizer.vocab_size if hasattr(method.tokenizer, "vocab_size") else len(method.tokenizer)
    mean_len = sum(e.length for e in examples) / len(examples)
    print(f"model {args.model} (vocab {vocab}), {len(sentences)} sentences -> {len(examples)} prompts, "
          f"mean prompt length {mean_len:.1f} tokens (published pads to {args.pad_to}), "
          f"batch {args.batch_size} prompts, torch threads {torch.get_num_threads()}", flush=True)
    label_ids = method.label_ids

    def published_loss(model, batch):
        logits = full_vocab_label_logits(model, batch, label_ids)
        return F.cross_entropy(logits, batch["labels"])

    torch.manual_seed(0)
    model = method.build_model(path)
    baseline = run("published", model, published_batches(examples, args.batch_size, args.pad_to,
                                                         method.layout.pad_id), published_loss)
    ours_batches = token_budget_batches([e.length for e in examples], args.batch_size * args.pad_to,
                                        args.batch_size, shuffle=True, seed=0)
    rates = {}
    for name, freeze in (("ours-all", False), ("ours", embeddings_frozen(cfg))):
        torch.manual_seed(0)
        model = method.build_model(path)
        if freeze:
            freeze_input_embeddings(model)
        rates[name] = run(name, model, ((method.collate([examples[i] for i in b]), len(b)) for b in ours_batches),
                          method.loss)
    print(f"speedup (ours-all vs published) {rates['ours-all'] / baseline:.2f}")
    print(f"speedup {rates['ours'] / baseline:.2f}")


if __name__ == "__main__":
    main()
