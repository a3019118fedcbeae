"""Soft ToPro: ToPro with a continuous template (K trainable prompt vectors).

Same decomposition as ToPro (one prompt per word, sentence and question as a
segment pair, label-word logits at the mask), but the question's wording is
learned. ``soft_prompt_placement`` says where the K vectors go:

- ``replace`` (default): the template's text is dropped; each text span of the
  template (``The pos tag of`` | ``is a kind of:`` | ``.``) becomes a run of
  soft vectors, K split over the spans in proportion to their token counts, so
  the question keeps the template's shape: ``[soft] word [soft] <mask> [soft]``.
  Each vector starts as the embedding of its span's tokens (cycled), so with K
  equal to the template's token count training starts exactly at hand-written
  ToPro.
- ``prefix``: the hand-written question stays and K soft vectors go in front of
  it (initialised from the template's tokens, cycled).

The backbone is frozen (only the K x hidden prompt trains, plus any part the
pretrained checkpoint lacks, such as the MLM head of an encoder published
without one: a frozen random head would be noise) or fine-tuned with it
(``freeze_backbone``). Soft slots travel through encoding as negative token
ids (slot k is ``-1 - k``), so ToPro's encoding, trimming and mask bookkeeping
are reused unchanged; ``collate`` turns them into a ``soft_index`` map.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from topro.data.readers import Sentence
from topro.methods.base import Encoded, MethodSpec, scores_dtype, seen_label_logits
from topro.methods.packing import packed_hidden
from topro.methods.topro_mlm import ToProMLM, label_logits_at
from topro.methods.trained_only import (fresh_parameters, from_pretrained_noting_fresh, load_soft_prompt_checkpoint,
                                        save_trained_only, trained_names, trained_only_meta)
from topro.prompts import Template

PLACEMENTS = ("replace", "prefix")
SOFT_PROMPT = "soft_prompt"


def split_proportionally(total: int, weights: list[int]) -> list[int]:
    """``total`` split into integers proportional to ``weights`` (largest remainder; sums to ``total``)."""
    whole = sum(weights)
    shares = [total * w / whole for w in weights]
    counts = [int(s) for s in shares]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - shares[i], i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass
class SoftQuestion:
    """The question as a sequence of parts, and the token whose embedding initialises each soft slot."""

    placement: str
    parts: list[tuple[str, list[int]]] = field(default_factory=list)
    """``("soft", slots)``, ``("word", [])`` or ``("mask", [])`` (replace placement only)."""
    init_token_ids: list[int] = field(default_factory=list)

    @property
    def n_slots(self) -> int:
        return len(self.init_token_ids)


def soft_question(template: Template, tokenizer, n_prompts: int, placement: str) -> SoftQuestion:
    if placement not in PLACEMENTS:
        raise ValueError(f"soft_prompt_placement must be one of {PLACEMENTS}, got {placement!r}")
    if n_prompts < 0:
        raise ValueError(f"prefix_length (soft prompt vectors) must be >= 0, got {n_prompts}")
    pieces = [p for p in re.split(r"(\{word\}|\{mask\})", template.question)]
    spans = [tokenizer(p.strip(), add_special_tokens=False)["input_ids"] if p not in ("{word}", "{mask}") else None
             for p in pieces]
    text_spans = [ids for ids in spans if ids]
    if not text_spans and n_prompts:
        raise ValueError(f"template {template.name!r} has no text to turn into soft prompt vectors")
    if placement == "prefix":
        everything = [t for ids in text_spans for t in ids]
        return SoftQuestion("prefix", init_token_ids=[everything[k % len(everything)] for k in range(n_prompts)])
    counts = iter(split_proportionally(n_prompts, [len(ids) for ids in text_spans]))
    question = SoftQuestion("replace")
    for piece, ids in zip(pieces, spans):
        if piece in ("{word}", "{mask}"):
            question.parts.append((piece.strip("{}"), []))
        elif ids:
            n = next(counts)
            start = question.n_slots
            question.init_token_ids.extend(ids[k % len(ids)] for k in range(n))
            if n:
                question.parts.append(("soft", list(range(start, start + n))))
    return question


def slot_id(slot: int) -> int:
    """The placeholder token id of soft slot ``slot`` (negative, so it never clashes with the vocabulary)."""
    return -1 - slot


class SoftPromptMLM(nn.Module):
    """A masked LM whose inputs carry trainable prompt vectors at the soft slots."""

    def __init__(self, mlm: nn.Module, prompt_init: torch.Tensor, label_ids: torch.Tensor, freeze_backbone: bool,
                 packed_word_bias: float = 0.0):
        super().__init__()
        self.mlm = mlm
        self.packed_word_bias = packed_word_bias
        self.mlm.requires_grad_(not freeze_backbone)
        # A part the pretrained checkpoint lacks (e5 ships no MLM head) is random: frozen it would be noise,
        # so it trains with the prompt and is checkpointed with it.
        params = dict(mlm.named_parameters())
        for name in fresh_parameters(mlm):
            params[name].requires_grad_(True)
        self.soft_prompt = nn.Parameter(prompt_init.detach().clone())
        self.register_buffer("label_ids", label_ids.clone(), persistent=False)

    def forward(self, input_ids, soft_index, attention_mask, label_rows, label_positions,
                token_type_ids=None, position_ids=None, packing_blocks=None,
                packing_word_blocks=None) -> torch.Tensor:
        """Label-word logits at the masks [labelled words, n_labels] (packed rows: with their
        single-prompt ``position_ids`` and ``packing_blocks``, see ``methods/packing.py``)."""
        embeds = self.mlm.get_input_embeddings()(input_ids)
        if self.soft_prompt.shape[0]:
            soft = self.soft_prompt[soft_index.clamp(min=0)].to(embeds.dtype)
            embeds = torch.where((soft_index >= 0).unsqueeze(-1), soft, embeds)
        base = getattr(self.mlm, self.mlm.base_model_prefix)
        if packing_blocks is not None:
            packed = {"position_ids": position_ids, "packing_blocks": packing_blocks, "label_rows": label_rows,
                      "label_positions": label_positions, "packing_word_blocks": packing_word_blocks}
            if token_type_ids is not None:
                packed["token_type_ids"] = token_type_ids
            at_mask = packed_hidden(base, packed, embeds, self.packed_word_bias)
        else:
            hidden = base(inputs_embeds=embeds, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
            at_mask = hidden[label_rows, label_positions]
        return label_logits_at(self.mlm, at_mask, self.label_ids)


def soft_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "soft_index", "attention_mask", "token_type_ids", "label_rows", "label_positions",
            "position_ids", "packing_blocks", "packing_word_blocks")
    return {k: batch[k] for k in keys if k in batch}


class ToProSoft:
    name = "topro_soft"
    cloze_class: type[ToProMLM] = ToProMLM
    """The hand-written cloze method whose prompt layout the soft one reuses (a classification task's:
    ``methods/classification.TextCloze``, one prompt per text)."""

    def __init__(self, spec: MethodSpec, tokenizer):
        self.spec = spec
        self.cloze = self.cloze_class(spec, tokenizer)  # template, verbalizer, label ids and prompt layout
        self.labels = self.cloze.labels
        self.tokenizer = tokenizer
        self.freeze_backbone = bool(spec.freeze_backbone)
        self.question = soft_question(self.cloze.template, tokenizer, int(spec.prefix_length),
                                      spec.soft_prompt_placement)

    # -- encoding ---------------------------------------------------------------------------------------------
    def question_ids(self, sentence: Sentence, pieces: list[list[int]]) -> list[list[int]]:
        if self.question.placement == "prefix":
            slots = [slot_id(k) for k in range(self.question.n_slots)]
            return [slots + q for q in self.cloze.question_ids(sentence, pieces)]
        mask_id = self.tokenizer.mask_token_id
        out = []
        for word in pieces:
            ids: list[int] = []
            for kind, slots in self.question.parts:
                ids.extend(word if kind == "word" else [mask_id] if kind == "mask" else [slot_id(k) for k in slots])
            out.append(ids)
        return out

    def encode(self, sentences: list[Sentence]) -> list[Encoded]:
        return self.cloze.encode_with(sentences, self.question_ids)

    def collate(self, examples: list[Encoded]) -> dict[str, torch.Tensor]:
        batch = self.cloze.collate(examples)  # per-word or packed, as the spec says
        ids = batch["input_ids"]
        soft = ids < 0
        batch["soft_index"] = torch.where(soft, -ids - 1, torch.full_like(ids, -1))
        batch["input_ids"] = torch.where(soft, torch.full_like(ids, self.cloze.layout.pad_id), ids)
        return batch

    # -- model ------------------------------------------------------------------------------------------------
    @staticmethod
    def _load_mlm(path: str) -> nn.Module:
        from transformers import AutoModelForMaskedLM

        return from_pretrained_noting_fresh(AutoModelForMaskedLM, path)

    def _model_on(self, mlm: nn.Module, prompt: torch.Tensor | None = None) -> SoftPromptMLM:
        mlm = self.cloze.ready(mlm)
        if prompt is None:  # start from the template's own token embeddings
            table = mlm.get_input_embeddings().weight
            prompt = table[torch.tensor(self.question.init_token_ids, dtype=torch.long)].detach()
        return SoftPromptMLM(mlm, prompt, self.cloze.label_ids, self.freeze_backbone,
                             float(self.spec.packed_word_bias))

    def build_model(self, model_path: str) -> SoftPromptMLM:
        return self._model_on(self._load_mlm(model_path))

    def load_model(self, checkpoint: str | Path) -> SoftPromptMLM:
        return load_soft_prompt_checkpoint(self.spec, checkpoint, self._load_mlm, self._model_on,
                                           self.question.n_slots, [SOFT_PROMPT])

    # -- training and inference -------------------------------------------------------------------------------
    def loss(self, model, batch) -> torch.Tensor:
        logits = seen_label_logits(model(**soft_inputs(batch)).float(), self.cloze.unseen_index)
        return F.cross_entropy(logits, batch["labels"], ignore_index=-100)

    def label_log_probs(self, model, batch) -> torch.Tensor:
        return torch.log_softmax(scores_dtype(model(**soft_inputs(batch))), dim=-1)

    def meta(self) -> dict[str, Any]:
        return {**self.cloze.meta(), "method": self.name,
                "soft_prompt": {"placement": self.question.placement, "n_vectors": self.question.n_slots,
                                "init_tokens": self.tokenizer.convert_ids_to_tokens(self.question.init_token_ids)}}

    def save(self, model: SoftPromptMLM, folder: str | Path) -> None:
        # Frozen: the prompt and any freshly initialised head; fine-tuned: the prompt (the model goes whole).
        names = trained_names(model) if self.freeze_backbone else [SOFT_PROMPT]
        meta = trained_only_meta({**self.meta(), "backbone_in_checkpoint": not self.freeze_backbone,
                                  "trained_tensors": names}, model, model.mlm if self.freeze_backbone else None)
        if not self.freeze_backbone:
            model.mlm.save_pretrained(folder, safe_serialization=True)
        save_trained_only(model, folder, self.tokenizer, meta, names=names)
