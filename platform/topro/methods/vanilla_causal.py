"""Vanilla token classification on a decoder-only LM (Llama, Gemma, Qwen, BLOOM).

A linear head reads the hidden state of each word's *last* subword. A causal
model's hidden state at a position has seen only the tokens to its left: at a
word's first subword it has not yet read the rest of the word (for a word of
several pieces, not even most of it), at its last subword it has read the whole
word and everything before it. Right context is never seen, so a long sentence's
windows label each word in the window that gives it the most *left* context
(``Vanilla._windows``).

The sentence is tokenized as running text (``" ".join(words)``, words found
again by character offsets), the way the LM read text in pretraining, rather
than word by word: decoder tokenizers mark a word's leading space inside its
first token, which word-by-word encoding loses.

Transformers has no token-classification class for every decoder family (none
for Gemma 3), so the model is the family's bare decoder (``AutoModel``) plus a
linear head of our own, gathered at the labelled positions only. The checkpoint
is the decoder (``save_pretrained``) beside the head (``trained.safetensors``).
"""
from __future__ import annotations

from bisect import bisect_right
from pathlib import Path
from typing import Any

import torch
from torch import nn

from topro.data.readers import Sentence
from topro.methods.base import word_pieces
from topro.methods.trained_only import from_pretrained_noting_fresh, load_trained_only, save_trained_only
from topro.methods.vanilla import Vanilla

HEAD_TENSORS = ["classifier.weight", "classifier.bias"]


def running_text_pieces(tokenizer, words: list[str]) -> list[list[int]]:
    """Each word's token ids when the sentence is tokenized as one text, words joined by spaces.

    A token belongs to the word holding its last character (a lone space token to the word after it).
    Falls back to word-by-word pieces if a token straddles two words and leaves one without a token.
    """
    text = " ".join(words)
    starts, at = [], 0
    for word in words:
        starts.append(at)
        at += len(word) + 1
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    pieces: list[list[int]] = [[] for _ in words]
    for token_id, (begin, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        char = max(end - 1, begin)
        if char < len(text) and text[char] == " ":
            char += 1
        pieces[max(bisect_right(starts, char) - 1, 0)].append(token_id)
    if any(not p for p in pieces):
        return word_pieces(tokenizer, words)
    return pieces


def head_dropout(config) -> float:
    """The classifier dropout transformers' decoder token classifiers use (``classifier_dropout``, else
    ``hidden_dropout``, else 0.1)."""
    for name in ("classifier_dropout", "hidden_dropout"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    return 0.1


class CausalTagger(nn.Module):
    """A decoder-only backbone and a linear head on the hidden states of the labelled positions."""

    def __init__(self, backbone: nn.Module, n_labels: int):
        super().__init__()
        self.backbone = backbone
        cfg = backbone.config
        hidden_size = getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size
        self.dropout = nn.Dropout(head_dropout(cfg))
        self.classifier = nn.Linear(hidden_size, n_labels)
        nn.init.normal_(self.classifier.weight, std=getattr(cfg, "initializer_range", 0.02))
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids, attention_mask, label_rows, label_positions) -> torch.Tensor:
        """Label logits [labelled words, n_labels]."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.classifier(self.dropout(hidden[label_rows, label_positions]))


def tagger_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "label_rows", "label_positions")}


class CausalVanilla(Vanilla):
    """Vanilla's encoding and windows with the label on the last subword; the model is a ``CausalTagger``."""

    causal = True

    def word_pieces(self, sentence: Sentence) -> list[list[int]]:
        return running_text_pieces(self.tokenizer, sentence.words)

    @staticmethod
    def _load_backbone(path: str) -> nn.Module:
        from transformers import AutoModel

        # float32 master weights (transformers 5 would load a bf16 checkpoint as bf16); bf16 is autocast.
        return from_pretrained_noting_fresh(AutoModel, path, dtype=torch.float32)

    def build_model(self, model_path: str) -> CausalTagger:
        return CausalTagger(self._load_backbone(model_path), len(self.labels))

    def load_model(self, checkpoint: str | Path) -> CausalTagger:
        model = CausalTagger(self._load_backbone(str(checkpoint)), len(self.labels))
        return load_trained_only(model, checkpoint, names=HEAD_TENSORS)

    def _logits(self, model, batch) -> torch.Tensor:
        return model(**tagger_inputs(batch))

    def meta(self) -> dict[str, Any]:
        return {**self.spec.meta(), "backbone_in_checkpoint": True, "trained_tensors": HEAD_TENSORS}

    def save(self, model: CausalTagger, folder: str | Path) -> None:
        folder = Path(folder)
        model.backbone.save_pretrained(folder, safe_serialization=True)
        save_trained_only(model, folder, self.tokenizer, self.meta(), names=HEAD_TENSORS)
