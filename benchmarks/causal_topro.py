"""Packed vs per-word ToPro on a causal (decoder-only) LM: tokens, training and evaluation pace, one run.

The measurement of ``benchmarks/packed_topro.py`` (its loop: real training steps from the same initial
weights, interleaved in rounds, then ``topro evaluate``'s prediction of the dev sentences) on a causal LM,
where ToPro's prompt is eval-llm's (``methods/topro_causal.py``):

per_word: one prompt tree per word (the instruction, the sentence, the word's question, every label).
sentence: ``prompt_packing: sentence``, one tree per sentence holding every word's question (the same
          scores and gradients: each question sees the sentence before it either way).

Prints tokens per sentence for each mode, training prompts (questions) per second and evaluation words
per second side by side, then ``train_speedup`` and ``eval_speedup`` (sentence over per_word).

    python /work/shared/tools/offline_models.py gemma
    python benchmarks/causal_topro.py --model ~/.cache/offline-models/gemma-3-270m --sentences 20 --threads 1
    # also without the answer end where the label words are prefix-free (answer_end_scored: when_needed)
    python benchmarks/causal_topro.py --model ~/.cache/offline-models/gemma-3-270m --sentences 6 --threads 1 \
        --variants per_word sentence per_word:when_needed sentence:when_needed
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from packed_topro import build_parser, main  # noqa: E402

if __name__ == "__main__":
    parser = build_parser(__doc__, model_default=None)
    # eval-llm's prompt (instruction with the label list, sentence, question) outgrows 128 tokens
    parser.set_defaults(max_length=512, max_packed_length=2048, max_tokens=8192, eval_max_tokens=16384)
    main(parser)
