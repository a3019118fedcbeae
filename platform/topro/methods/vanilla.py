"""Vanilla token classification: a linear head labels each word's first subword."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from topro.data.readers import Sentence
from topro.methods.base import (META_FILE, Encoded, MethodSpec, collate_common, model_inputs, pair_layout,
                                word_pieces)


class Vanilla:
    name = "vanilla"

    def __init__(self, spec: MethodSpec, tokenizer):
        self.spec = spec
        self.labels = list(spec.labels)
        self.label_index = {label: i for i, label in enumerate(self.labels)}
        self.tokenizer = tokenizer
        self.layout = pair_layout(tokenizer)

    def build_model(self, model_path: str) -> torch.nn.Module:
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification.from_pretrained(
            model_path, num_labels=len(self.labels), id2label=dict(enumerate(self.labels)),
            label2id=self.label_index)

    def load_model(self, checkpoint: str | Path) -> torch.nn.Module:
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification.from_pretrained(checkpoint, use_safetensors=True)

    def encode(self, sentences: list[Sentence]) -> list[Encoded]:
        budget = self.spec.max_length - self.layout.single_overhead
        out = []
        for s_index, sentence in enumerate(sentences):
            ids = list(self.layout.prefix)
            words, positions, labels = [], [], []
            truncated = 0
            for w_index, pieces in enumerate(word_pieces(self.tokenizer, sentence.words)):
                if len(ids) - len(self.layout.prefix) + len(pieces) > budget:
                    truncated = len(sentence.words) - w_index  # this word and every later one
                    break
                words.append(w_index)
                positions.append(len(ids))
                labels.append(self.label_index.get(sentence.tags[w_index], -100) if sentence.tags else -100)
                ids.extend(pieces)
            ids.extend(self.layout.single_suffix)
            types = [self.layout.type_a] * len(ids) if self.layout.uses_token_types else None
            out.append(Encoded(ids, s_index, words, positions, labels, types, truncated_words=truncated))
        return out

    def collate(self, examples: list[Encoded]) -> dict[str, torch.Tensor]:
        return collate_common(examples, self.layout)

    def _logits(self, model, batch) -> torch.Tensor:
        hidden = model(**model_inputs(batch)).logits  # [B, T, L]: the head is tiny, no need to gather first
        return hidden[batch["label_rows"], batch["label_positions"]]

    def loss(self, model, batch) -> torch.Tensor:
        return F.cross_entropy(self._logits(model, batch).float(), batch["labels"], ignore_index=-100)

    def label_log_probs(self, model, batch) -> torch.Tensor:
        return torch.log_softmax(self._logits(model, batch).float(), dim=-1)

    def meta(self) -> dict[str, Any]:
        return {**self.spec.__dict__}

    def save(self, model, folder: str | Path) -> None:
        folder = Path(folder)
        model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        (folder / META_FILE).write_text(json.dumps(self.meta(), indent=2))
