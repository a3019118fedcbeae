"""Vanilla token classification: a linear head labels each word's first subword (encoders) or its last
(decoder-only LMs, ``vanilla_causal``: a causal model's hidden state at a position has read only what lies to
its left, so only a word's last subword has read the whole word).

A sentence longer than ``max_length`` is encoded in overlapping windows of
whole words (consecutive windows share about ``window_stride`` tokens, as HF
tokenizers' ``return_overflowing_tokens`` with a stride do), and each word is
labelled by the one window where it has the most context on its shorter side (for a causal LM, which
never sees right context: the most context on its left, i.e. the first window holding it).
So every word gets a prediction, as ToPro's per-word prompts give it, and the
methods are compared on the same words (``long_sentences: truncate`` restores
cutting the sentence off, its lost words counted in ``n_truncated_words``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from topro.data.readers import Sentence
from topro.methods.base import Encoded, collate_common, model_inputs, scores_dtype, word_pieces
from topro.methods.trained_only import from_pretrained_noting_fresh
from topro.methods.whole_model import WholeModelMethod


LABEL_SUBWORDS = ("auto", "first", "last")


class Vanilla(WholeModelMethod):
    name = "vanilla"
    auto_class = "AutoModelForTokenClassification"
    causal = False
    """A decoder-only backbone: attention looks left only (sets the default label subword and window choice)."""

    def __init__(self, spec, tokenizer):
        super().__init__(spec, tokenizer)
        if spec.label_subword not in LABEL_SUBWORDS:
            raise ValueError(f"label_subword must be one of {LABEL_SUBWORDS}, got {spec.label_subword!r}")
        if spec.label_subword == "auto":  # recorded resolved, so a checkpoint reads as it was trained
            spec.label_subword = "last" if self.causal else "first"
        self.label_last = spec.label_subword == "last"

    def word_pieces(self, sentence: Sentence) -> list[list[int]]:
        """Each word's subword ids (a hook: decoder-only LMs tokenize the sentence as running text)."""
        return word_pieces(self.tokenizer, sentence.words)

    def build_model(self, model_path: str) -> torch.nn.Module:
        return from_pretrained_noting_fresh(
            self.auto_model(), model_path, num_labels=len(self.labels), id2label=dict(enumerate(self.labels)),
            label2id=self.label_index)

    def encode(self, sentences: list[Sentence]) -> list[Encoded]:
        budget = self.spec.max_length - self.layout.single_overhead
        if budget < 1:
            raise ValueError(f"max_length {self.spec.max_length} leaves no room for words after the "
                             f"{self.layout.single_overhead} special tokens")
        mode = self.spec.long_sentences
        stride = self.spec.window_stride
        stride = budget // 2 if stride is None else int(stride)
        if not 0 <= stride < budget:
            raise ValueError(f"window_stride {stride} must be at least 0 and below the {budget} word tokens "
                             f"max_length {self.spec.max_length} leaves")
        out = []
        for s_index, sentence in enumerate(sentences):
            # A word longer than the whole budget keeps its first pieces (its label sits on the first or last kept).
            pieces = [p[:budget] for p in self.word_pieces(sentence)]
            if mode == "truncate" or sum(len(p) for p in pieces) <= budget:
                out.append(self._truncated(s_index, sentence, pieces, budget))
            else:
                out += self._windows(s_index, sentence, pieces, budget, stride)
        return out

    def _example(self, s_index: int, sentence: Sentence, pieces: list[list[int]], span: range,
                 labelled: list[int], truncated: int = 0) -> Encoded:
        ids = list(self.layout.lead)
        positions, labels = [], []
        wanted = set(labelled)
        for w_index in span:
            if w_index in wanted:
                positions.append(len(ids) + (len(pieces[w_index]) - 1 if self.label_last else 0))
                labels.append(self.label_index.get(sentence.tags[w_index], -100) if sentence.tags else -100)
            ids.extend(pieces[w_index])
        ids.extend(self.layout.single_suffix)
        types = [self.layout.type_a] * len(ids) if self.layout.uses_token_types else None
        return Encoded(ids, s_index, list(labelled), positions, labels, types, truncated_words=truncated)

    def _truncated(self, s_index: int, sentence: Sentence, pieces: list[list[int]], budget: int) -> Encoded:
        """The sentence cut off at ``max_length``: later words get no prediction (and are counted)."""
        used, end = 0, 0
        while end < len(pieces) and used + len(pieces[end]) <= budget:
            used += len(pieces[end])
            end += 1
        return self._example(s_index, sentence, pieces, range(end), list(range(end)),
                             truncated=len(pieces) - end)

    def _windows(self, s_index: int, sentence: Sentence, pieces: list[list[int]], budget: int,
                 stride: int) -> list[Encoded]:
        """Overlapping windows of whole words; each word labelled in the window giving it most context."""
        offsets = [0]
        for p in pieces:
            offsets.append(offsets[-1] + len(p))
        n = len(pieces)
        spans, start = [], 0
        while True:
            end = start
            while end < n and offsets[end + 1] - offsets[start] <= budget:
                end += 1
            spans.append((start, end))
            if end >= n:
                break
            # The next window starts where it still shares about `stride` tokens with this one.
            nxt = start + 1
            while nxt < end and offsets[end] - offsets[nxt] > stride:
                nxt += 1
            start = max(nxt, start + 1)
        owner: dict[int, int] = {}
        for w in range(n):
            best, best_context = None, -1
            for i, (a, b) in enumerate(spans):
                if a <= w < b:
                    left = offsets[w] - offsets[a]
                    context = left if self.causal else min(left, offsets[b] - offsets[w + 1])
                    if context > best_context:
                        best, best_context = i, context
            owner[w] = best
        out = []
        for i, (a, b) in enumerate(spans):
            labelled = [w for w in range(a, b) if owner[w] == i]
            if labelled:
                out.append(self._example(s_index, sentence, pieces, range(a, b), labelled))
        return out

    def collate(self, examples: list[Encoded]) -> dict[str, torch.Tensor]:
        return collate_common(examples, self.layout)

    def _logits(self, model, batch) -> torch.Tensor:
        hidden = model(**model_inputs(batch)).logits  # [B, T, L]: the head is tiny, no need to gather first
        return hidden[batch["label_rows"], batch["label_positions"]]

    def loss(self, model, batch) -> torch.Tensor:
        return F.cross_entropy(self._logits(model, batch).float(), batch["labels"], ignore_index=-100)

    def label_log_probs(self, model, batch) -> torch.Tensor:
        return torch.log_softmax(scores_dtype(self._logits(model, batch)), dim=-1)

