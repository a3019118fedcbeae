"""Prompt-Tuning (PT, Tu et al. 2022): deep prefix tuning in the P-tuning v2 style.

Trainable per-layer prefix keys/values (``prefix_length`` positions, dropout
``prefix_dropout``) steer a frozen encoder or decoder-only LM; a linear head
labels each word's first subword (an encoder's) or last (a decoder's), as
vanilla does. Encoding and batching are vanilla's. The
checkpoint holds the prefix table and the head only, plus a reference to the
backbone (``trained_only``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from topro.data.readers import Sentence
from topro.methods.base import Encoded, MethodSpec, scores_dtype
from topro.methods.prefix_attention import PREFIX_KWARG, PrefixEncoder, enable_prefix_attention
from topro.methods.trained_only import (from_pretrained_noting_fresh, load_backbone, load_trained_only, read_meta,
                                        save_trained_only, trained_only_meta)
from topro.methods.vanilla import Vanilla
from topro.methods.vanilla_causal import CausalVanilla, head_dropout


class PrefixTagger(nn.Module):
    """Frozen encoder + per-layer prefix + linear head on the labelled positions."""

    def __init__(self, backbone: nn.Module, n_labels: int, prefix_length: int, prefix_dropout: float):
        super().__init__()
        self.backbone = enable_prefix_attention(backbone)
        self.backbone.requires_grad_(False)
        cfg = backbone.config
        self.prefix = PrefixEncoder.for_backbone(cfg, prefix_length, prefix_dropout) if prefix_length > 0 else None
        self.dropout = nn.Dropout(head_dropout(cfg) if is_decoder_only(cfg) else cfg.hidden_dropout_prob)
        self.causal = is_decoder_only(cfg)
        self.classifier = nn.Linear(cfg.hidden_size, n_labels)
        nn.init.normal_(self.classifier.weight, std=getattr(cfg, "initializer_range", 0.02))
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids, attention_mask, label_rows, label_positions, token_type_ids=None) -> torch.Tensor:
        """Label logits [labelled words, n_labels] (a forward, so DDP wrappers see the whole computation)."""
        extra = {PREFIX_KWARG: self.prefix(input_ids.shape[0])} if self.prefix is not None else {}
        if self.causal:
            extra["use_cache"] = False
        else:
            extra["token_type_ids"] = token_type_ids
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return self.classifier(self.dropout(hidden[label_rows, label_positions]))


def tagger_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "token_type_ids", "label_rows", "label_positions")
    return {k: batch[k] for k in keys if k in batch}


def is_decoder_only(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return not getattr(config, "is_encoder_decoder", False) and config.model_type not in \
        MODEL_FOR_MASKED_LM_MAPPING_NAMES


class PromptTuning:
    name = "prompt_tuning"

    def __init__(self, spec: MethodSpec, tokenizer, causal: bool = False):
        self.spec = spec
        self.causal = causal
        # Vanilla's encoding and batching: first subword on encoders, last on decoder-only LMs.
        self.tagging = CausalVanilla(spec, tokenizer) if causal else Vanilla(spec, tokenizer)
        self.labels = self.tagging.labels
        self.tokenizer = tokenizer
        self.prefix_length = int(spec.prefix_length)
        self.prefix_dropout = float(spec.prefix_dropout)
        if self.prefix_length < 0:
            raise ValueError(f"prefix_length must be >= 0, got {self.prefix_length}")

    def _model_on(self, backbone: nn.Module) -> PrefixTagger:
        return PrefixTagger(backbone, len(self.labels), self.prefix_length, self.prefix_dropout)

    def _load_backbone(self, path: str) -> nn.Module:
        from transformers import AutoModel

        if self.causal:  # float32 master weights (a bf16 checkpoint would load as bf16)
            return from_pretrained_noting_fresh(AutoModel, path, dtype=torch.float32)
        return from_pretrained_noting_fresh(AutoModel, path, add_pooling_layer=False)  # the pooler is never used

    def build_model(self, model_path: str) -> PrefixTagger:
        return self._model_on(self._load_backbone(model_path))

    def load_model(self, checkpoint: str | Path) -> PrefixTagger:
        meta = read_meta(checkpoint)
        backbone = load_backbone(self.spec, checkpoint, self._load_backbone, meta.get("backbone_fingerprint"))
        return load_trained_only(self._model_on(backbone), checkpoint)

    def encode(self, sentences: list[Sentence]) -> list[Encoded]:
        return self.tagging.encode(sentences)

    def collate(self, examples: list[Encoded]) -> dict[str, torch.Tensor]:
        return self.tagging.collate(examples)

    def loss(self, model, batch) -> torch.Tensor:
        return F.cross_entropy(model(**tagger_inputs(batch)).float(), batch["labels"], ignore_index=-100)

    def label_log_probs(self, model, batch) -> torch.Tensor:
        return torch.log_softmax(scores_dtype(model(**tagger_inputs(batch))), dim=-1)

    def meta(self) -> dict[str, Any]:
        return self.spec.meta()

    def save(self, model: PrefixTagger, folder: str | Path) -> None:
        save_trained_only(model, folder, self.tokenizer, trained_only_meta(self.meta(), model, model.backbone))
        model.backbone.config.save_pretrained(folder)  # the backbone's kind (encoder or decoder), read on load


class CausalPromptTuning(PromptTuning):
    """Prompt-Tuning on a decoder-only LM (the registry's class for causal backbones)."""

    def __init__(self, spec: MethodSpec, tokenizer):
        super().__init__(spec, tokenizer, causal=True)
