"""Where causal ToPro's time goes, per word vs packed: attention-mask build, transformer body, LM head.

On the first ``--sentences`` English training sentences of ``--task``, all of them in one batch per mode
(``per_word``: one prompt tree per word; ``sentence``: ``prompt_packing: sentence``), it runs the steps of
``methods.topro_causal.tree_scores`` one by one (checking that their scores are ``tree_scores``' own),
then a training loss and its backward, split at the last hidden state:

mask:  the tree visibility and the per-layer-type 4-D masks (``llm.scoring._attention_masks``);
body:  the decoder (embeddings, layers, final norm) over every token of the rows;
head:  the full-vocabulary logits of the read rows (``slots``), their log-sum-exp and the picked targets.

Prints per mode: tokens, read logit rows, FLOPs of body and head counted by
``torch.utils.flop_counter.FlopCounterMode`` (forward, and forward + backward of the loss), the seconds
of each part (forward; then backward of head and body), and the head's share. The last lines are the
per-word / packed ratios and the Amdahl bound: the speedup packing would give if the body cost nothing.

    python benchmarks/causal_topro_breakdown.py --model ~/.cache/offline-models/gemma-3-270m --sentences 1
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from topro.config import TrainConfig
from topro.data import load_split
from topro.llm.scoring import _attention_masks, tree_visibility
from topro.methods import build_method, method_spec
from topro.methods.topro_causal import lm_logits, tree_scores
from topro.models import resolve_model_path
from topro.train import freeze_input_embeddings

MODES = ("per_word", "sentence")


def counted(fn):
    """(result, FLOPs, seconds) of ``fn()``."""
    counter = FlopCounterMode(display=False)
    start = time.perf_counter()
    with counter:
        out = fn()
    return out, counter.get_total_flops(), time.perf_counter() - start


def parts(method, model, batch) -> dict[str, float]:
    """FLOPs and seconds of each part of one forward and one backward of the training loss."""
    base = getattr(model, model.base_model_prefix)
    start = time.perf_counter()
    visible = tree_visibility(batch["tree_sent"], batch["tree_group"], batch["tree_branch"])
    positions = batch["position_ids"]
    masks = _attention_masks(model.config, visible, positions, positions, base.get_input_embeddings().weight.dtype)
    mask_s = time.perf_counter() - start
    hidden, body_flops, body_s = counted(lambda: base(input_ids=batch["input_ids"], position_ids=positions,
                                                      attention_mask=masks, use_cache=False).last_hidden_state)
    cut = hidden.detach().requires_grad_(True)  # the backward is split here: head, then body

    def head():
        logits = lm_logits(model, cut.flatten(0, 1).index_select(0, batch["slot_index"])).float()
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits[batch["target_slot"], batch["target_token"]] - lse[batch["target_slot"]]
        n_words = batch["labels"].shape[0]
        scores = picked.new_zeros(n_words * method.n_scored).index_add(0, batch["target_cell"], picked)
        return scores.view(n_words, method.n_scored)

    scores, head_flops, head_s = counted(head)
    with torch.no_grad():
        reference = tree_scores(model, batch, method.n_scored)
    assert torch.allclose(scores, reference, atol=1e-4), float((scores - reference).abs().max())
    loss = F.cross_entropy(scores, batch["labels"], ignore_index=-100)
    _, head_back_flops, head_back_s = counted(loss.backward)
    _, body_back_flops, body_back_s = counted(lambda: hidden.backward(cut.grad))
    return {"tokens": batch["input_ids"].numel(), "rows": batch["slot_index"].numel(), "mask_s": mask_s,
            "body_flops": body_flops, "body_s": body_s, "head_flops": head_flops, "head_s": head_s,
            "body_back_flops": body_back_flops, "body_back_s": body_back_s,
            "head_back_flops": head_back_flops, "head_back_s": head_back_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", default="udpos", choices=["udpos", "panx"])
    parser.add_argument("--sentences", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--data-dir", default=os.environ.get("TOPRO_DATA_DIR"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sentences = load_split(args.task, "en", "train", args.data_dir, limit=args.sentences)
    path = resolve_model_path(args.model, args.task, args.data_dir)
    results = {}
    for mode in MODES:
        cfg = TrainConfig(task=args.task, method="topro", model=args.model, data_dir=args.data_dir,
                          prompt_packing=mode, max_length=args.max_length, max_packed_length=4096)
        method = build_method(method_spec(cfg, path), path)
        model = method.build_model(path)
        freeze_input_embeddings(model)  # as topro train does (tied: the LM head too)
        model.train()
        batch = method.collate(method.encode(sentences))
        results[mode] = r = parts(method, model, batch)
        vocab = model.config.vocab_size
        del model, batch  # one model in memory at a time
        fwd = r["body_flops"] + r["head_flops"]
        train = fwd + r["body_back_flops"] + r["head_back_flops"]
        head_train = r["head_flops"] + r["head_back_flops"]
        secs = r["mask_s"] + r["body_s"] + r["head_s"]
        train_s = secs + r["body_back_s"] + r["head_back_s"]
        print(f"{mode:<9} {r['tokens']} tokens (padded), {r['rows']} logit rows of {vocab} | "
              f"forward GFLOP body {r['body_flops'] / 1e9:.1f} head {r['head_flops'] / 1e9:.1f} "
              f"(head {r['head_flops'] / fwd:.0%}) | +backward GFLOP body {r['body_back_flops'] / 1e9:.1f} "
              f"head {r['head_back_flops'] / 1e9:.1f} (head {head_train / train:.0%} of {train / 1e9:.1f})", flush=True)
        print(f"{mode:<9} seconds: mask {r['mask_s']:.2f} body {r['body_s']:.2f} head {r['head_s']:.2f} "
              f"(head {r['head_s'] / secs:.0%} of forward) | backward body {r['body_back_s']:.2f} "
              f"head {r['head_back_s']:.2f} (head {(r['head_s'] + r['head_back_s']) / train_s:.0%} of "
              f"{train_s:.2f} s)", flush=True)
    w, p = results["per_word"], results["sentence"]
    fwd = {m: r["body_flops"] + r["head_flops"] for m, r in results.items()}
    train = {m: fwd[m] + r["body_back_flops"] + r["head_back_flops"] for m, r in results.items()}
    print(f"FLOP ratio per_word/sentence: forward {fwd['per_word'] / fwd['sentence']:.2f}, "
          f"training {train['per_word'] / train['sentence']:.2f}; body alone {w['body_flops'] / p['body_flops']:.2f}")
    print(f"Amdahl bound (packed body free, head as counted): forward {fwd['per_word'] / p['head_flops']:.2f}, "
          f"training {train['per_word'] / (p['head_flops'] + p['head_back_flops']):.2f}")


if __name__ == "__main__":
    main()
