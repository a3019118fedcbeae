"""Soft ToPro and RoSPrompt on causal (decoder-only) LMs: trainable prompt vectors over a frozen Llama,
Gemma 3, Qwen or BLOOM, scored as causal ToPro scores (``methods/topro_causal.py``).

The prompt is causal ToPro's (the ``llm_format``'s instruction, sentence and one question per word); the
question's template text becomes ``prefix_length`` soft vectors (``soft_prompt_placement``):

- ``replace``: the tokens of the text before the word and of the text after it (``Part-of-speech tag of
  the word`` | ``in the sentence is``) are found in each tokenized question and replaced by soft vectors,
  ``prefix_length`` split over the two spans in proportion to their token counts, each starting as the
  input embedding (the embedding module's output, so Gemma's sqrt(hidden) scaling included) of its span's
  tokens, cycled. With ``prefix_length`` equal to the template's token count (logged) training starts
  exactly at causal ToPro: the same inputs, the same scores (``tests/test_topro_soft_causal.py``).
- ``prefix``: the question stays and the soft vectors go in front of it.

Label words are scored as causal ToPro scores them: a continuation (the format's answer with the word, then
its answer end) by the sum of its token log-probabilities. The soft slots travel through encoding as
negative token ids (slot k is ``-1 - k``), so causal ToPro's prompt trees, packing and trimming are reused
unchanged. With the backbone frozen (``freeze_backbone``) the checkpoint holds the prompt only.

RoSPrompt (``methods/rosprompt.py`` for the ingredients) scores several words per label: ``none``, the
verbalizer's seed words; ``knn``, the text of the ``knn_k`` vocabulary tokens nearest the seeds in the input
embeddings, each as a whole answer word (a kNN token that is a word piece is scored as that piece's text).
``knn_aggregate`` combines a label's word log-probabilities (``mean``; ``max``; ``logsumexp`` minus
log |words|: the log of their mean probability). Smoothing and the drift penalty are RoSPrompt's own.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from topro.methods.base import MethodSpec, scores_dtype
from topro.methods.rosprompt import (RoSPrompt, aggregate_label_scores, candidate_mask, check_word_settings,
                                     knn_label_words, seed_vectors)
from topro.methods.topro_causal import ToProCausal, tree_scores
from topro.methods.topro_soft import PLACEMENTS, SOFT_PROMPT, slot_id, split_proportionally
from topro.methods.trained_only import (from_pretrained_noting_fresh, load_soft_prompt_checkpoint, save_trained_only,
                                        trained_names, trained_only_meta)

log = logging.getLogger(__name__)

TREE_KEYS = ("input_ids", "soft_index", "position_ids", "tree_sent", "tree_group", "tree_branch", "slot_index",
             "target_slot", "target_token", "target_cell", "labels")


class SoftPromptCausal(nn.Module):
    """A causal LM whose prompt trees carry trainable vectors at the soft slots; returns continuation scores."""

    def __init__(self, lm: nn.Module, prompt_init: torch.Tensor, n_scored: int, freeze_backbone: bool):
        super().__init__()
        self.lm = lm
        self.lm.requires_grad_(not freeze_backbone)
        self.n_scored = n_scored
        self.soft_prompt = nn.Parameter(prompt_init.detach().clone())

    def forward(self, input_ids, soft_index, **tree) -> torch.Tensor:
        """[words, n_scored] summed continuation log-probabilities (``tree``: the rest of causal ToPro's batch)."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        if self.soft_prompt.shape[0]:
            soft = self.soft_prompt[soft_index.clamp(min=0)].to(embeds.dtype)
            embeds = torch.where((soft_index >= 0).unsqueeze(-1), soft, embeds)
        return tree_scores(self.lm, {"input_ids": input_ids, **tree}, self.n_scored, embeds)


def common_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class CausalToProSoft(ToProCausal):
    """Soft ToPro on a decoder-only LM (the registry's class for causal backbones)."""

    name = "topro_soft"

    def __init__(self, spec: MethodSpec, tokenizer):
        super().__init__(spec, tokenizer)
        self.freeze_backbone = bool(spec.freeze_backbone)
        self.placement = spec.soft_prompt_placement
        if self.placement not in PLACEMENTS:
            raise ValueError(f"soft_prompt_placement must be one of {PLACEMENTS}, got {self.placement!r}")
        n = int(spec.prefix_length)
        if n < 0:
            raise ValueError(f"prefix_length (soft prompt vectors) must be >= 0, got {n}")
        self.before, self.after = self._template_tokens()
        if n and not (self.before or self.after):
            raise ValueError(f"llm_format={spec.llm_format!r}: the question has no text to turn into soft vectors")
        log.info("%s: the question's template text is %d tokens (prefix_length=%d; equal counts start training "
                 "exactly at causal ToPro)", self.name, len(self.before) + len(self.after), n)
        if self.placement == "prefix":
            text = self.before + self.after
            self.init_token_ids = [text[k % len(text)] for k in range(n)]
            self.slots_before, self.slots_after = list(range(n)), []
        else:
            n_before, n_after = split_proportionally(n, [len(self.before), len(self.after)]) if n else (0, 0)
            self.init_token_ids = ([self.before[k % len(self.before)] for k in range(n_before)]
                                   + [self.after[k % len(self.after)] for k in range(n_after)])
            self.slots_before, self.slots_after = list(range(n_before)), list(range(n_before, n))

    def _template_tokens(self) -> tuple[list[int], list[int]]:
        """The question's tokens before and after its word, as they tokenize in a prompt: the common start
        and end of two probe questions' ids."""
        from topro.prompts.formats import render_topro

        setup = self.setup
        p = render_topro(setup.fmt, setup.task.name, setup.label_words, setup.context, ["a", "b"])
        base = setup.context + p.sentence
        first, second = (self.tokens.tail_ids(base, q) for q in p.questions)
        before = common_length(first, second)
        after = common_length(first[before:][::-1], second[before:][::-1])
        return first[:before], first[len(first) - after:]

    @property
    def n_slots(self) -> int:
        return len(self.init_token_ids)

    def question_ids(self, questions: list[list[int]]) -> list[list[int]]:
        """Each question with its template tokens replaced by the soft slots (or the slots in front of it)."""
        before = [slot_id(k) for k in self.slots_before]
        after = [slot_id(k) for k in self.slots_after]
        if self.placement == "prefix":
            return [before + q for q in questions]
        out = []
        for q in questions:
            start = common_length(q, self.before)
            end = len(q) - min(common_length(q[start:][::-1], self.after[::-1]), len(q) - start)
            out.append(before + q[start:end] + after)
        return out

    def collate(self, examples) -> dict[str, torch.Tensor]:
        batch = super().collate(examples)
        ids = batch["input_ids"]
        soft = ids < 0
        batch["soft_index"] = torch.where(soft, -ids - 1, torch.full_like(ids, -1))
        batch["input_ids"] = torch.where(soft, torch.full_like(ids, self.tokenizer.pad_token_id), ids)
        return batch

    def label_scores(self, model, batch) -> torch.Tensor:
        return model(**{k: batch[k] for k in TREE_KEYS})

    # -- model ------------------------------------------------------------------------------------------------
    @staticmethod
    def _load_lm(path: str) -> nn.Module:
        from transformers import AutoModelForCausalLM

        # float32 master weights (a bf16 checkpoint would load as bf16)
        return from_pretrained_noting_fresh(AutoModelForCausalLM, path, dtype=torch.float32)

    def _model_on(self, lm: nn.Module, prompt: torch.Tensor | None = None) -> SoftPromptCausal:
        lm = self.ready(lm)
        if prompt is None:  # the template's own input embeddings (Gemma scales them: the module's output)
            with torch.no_grad():
                prompt = lm.get_input_embeddings()(torch.tensor(self.init_token_ids, dtype=torch.long))
        return SoftPromptCausal(lm, prompt.detach(), self.n_scored, self.freeze_backbone)

    def build_model(self, model_path: str) -> SoftPromptCausal:
        return self._model_on(self._load_lm(model_path))

    def load_model(self, checkpoint: str | Path) -> SoftPromptCausal:
        return load_soft_prompt_checkpoint(self.spec, checkpoint, self._load_lm, self._model_on, self.n_slots,
                                           [SOFT_PROMPT])

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "method": self.name,
                "soft_prompt": {"placement": self.placement, "n_vectors": self.n_slots,
                                "init_tokens": self.tokenizer.convert_ids_to_tokens(self.init_token_ids)}}

    def save(self, model: SoftPromptCausal, folder: str | Path) -> None:
        names = trained_names(model) if self.freeze_backbone else [SOFT_PROMPT]
        meta = trained_only_meta({**self.meta(), "backbone_in_checkpoint": not self.freeze_backbone,
                                  "trained_tensors": names}, model, model.lm if self.freeze_backbone else None)
        if self.freeze_backbone:
            model.lm.config.save_pretrained(folder)  # the backbone's kind (decoder-only), read on load
        else:
            model.lm.save_pretrained(folder, safe_serialization=True)
        save_trained_only(model, folder, self.tokenizer, meta, names=names)


class CausalRoSPrompt(CausalToProSoft):
    """RoSPrompt on a decoder-only LM: soft ToPro scoring several words per label (see the module docstring)."""

    name = "rosprompt"
    # RoSPrompt's own objective, unchanged: it reads label_scores, seen_index, label_similarity and the
    # model's soft_prompt / prompt_init, which this class provides.
    loss = RoSPrompt.loss
    drift_penalty = RoSPrompt.drift_penalty

    def __init__(self, spec: MethodSpec, tokenizer):
        super().__init__(spec, tokenizer)
        check_word_settings(spec)
        from topro.methods.topro_mlm import unseen_index

        self.unseen_index = unseen_index(self.labels, spec.unseen_labels)
        unseen = set(self.unseen_index.tolist())
        self.seen_index = torch.tensor([i for i in range(len(self.labels)) if i not in unseen])
        self.label_similarity: torch.Tensor | None = None
        # A checkpoint records the kNN tokens it was trained with: reloading never recomputes them. kNN needs
        # the input embeddings before encoding (the words are in the prompts): read once from the backbone.
        self.word_sets: list[list[int]] | None = spec.label_token_sets
        self._loaded_backbone: tuple[str, nn.Module] | None = None
        if spec.verbalizer_expansion == "knn" and self.word_sets is None:
            path = spec.base_model_path or spec.base_model
            lm = self._load_lm(path)
            self.word_sets = self._knn_words(lm)
            self._loaded_backbone = (path, lm)  # build_model takes it: the backbone loads once per run
        self.label_texts = self._label_texts()
        self.word_texts = list(dict.fromkeys(w for words in self.label_texts for w in words))
        at = {w: i for i, w in enumerate(self.word_texts)}
        width = max(len(words) for words in self.label_texts)
        self.set_index = torch.zeros(len(self.labels), width, dtype=torch.long)
        self.set_mask = torch.zeros(len(self.labels), width, dtype=torch.bool)
        for row, words in enumerate(self.label_texts):
            self.set_index[row, :len(words)] = torch.tensor([at[w] for w in words])
            self.set_mask[row, :len(words)] = True
        self.overlap_warnings = self._warn_unseen_overlap()

    def _seeds(self, label: str) -> tuple[str, ...]:
        """A label's seed words: the verbalizer's (several when its YAML lists several) when the format
        answers with the verbalizer's words, else the format's own label word."""
        from topro.prompts.registry import get_verbalizer

        verbalizer = get_verbalizer(self.spec.task, self.spec.verbalizer)
        word = self.setup.label_words[label]
        return verbalizer.seed_words(label) if verbalizer.words.get(label) == word else (word,)

    def _knn_words(self, lm: nn.Module) -> list[list[int]]:
        table = lm.get_input_embeddings().weight.detach()
        seeds = [seed_vectors(self.tokenizer, table, self._seeds(label))[0] for label in self.labels]
        try:
            return knn_label_words(table, seeds, int(self.spec.knn_k), candidate_mask(self.tokenizer, table.shape[0]))
        except ValueError as err:
            raise ValueError(f"field 'knn_k': {err}") from None

    def _label_texts(self) -> list[list[str]]:
        if self.word_sets is None:
            return [list(self._seeds(label)) for label in self.labels]
        texts = []
        for tokens in self.word_sets:
            words = [self.tokenizer.decode([t]).strip() or self.tokenizer.decode([t]) for t in tokens]
            texts.append(list(dict.fromkeys(words)))
        return texts

    def build_model(self, model_path: str) -> SoftPromptCausal:
        loaded, self._loaded_backbone = self._loaded_backbone, None
        if loaded is not None and loaded[0] == model_path:
            return self._model_on(loaded[1])
        return super().build_model(model_path)

    def _warn_unseen_overlap(self) -> list[str]:
        messages = []
        unseen = set(self.unseen_index.tolist())
        for u in sorted(unseen):
            for s in sorted(set(range(len(self.labels))) - unseen):
                shared = sorted(set(self._seeds(self.labels[u])) & set(self.label_texts[s]))
                if shared:
                    messages.append(f"unseen label {self.labels[u]!r}: its label word(s) {shared} are also words "
                                    f"of the seen label {self.labels[s]!r}, which trains them")
        for message in messages:
            log.warning(message)
        return messages

    @property
    def n_scored(self) -> int:
        return len(self.word_texts)

    def continuation_texts(self, answers: dict[str, str]) -> list[str]:
        from topro.prompts.formats import fill

        answer = self.setup.fmt.for_task(self.setup.task.name).answer
        return [fill(answer, label=word) for word in self.word_texts]

    def _model_on(self, lm: nn.Module, prompt: torch.Tensor | None = None) -> SoftPromptCausal:
        model = super()._model_on(lm, prompt)
        table = model.lm.get_input_embeddings().weight.detach()
        centres = torch.stack([seed_vectors(self.tokenizer, table, tuple(words))[0].mean(0)
                               for words in self.label_texts])
        centres = torch.nn.functional.normalize(centres.double(), dim=-1)
        self.label_similarity = centres @ centres.T
        # The initial prompt, for the drift penalty (not saved: rebuilt from the template when training resumes).
        model.register_buffer("prompt_init", model.soft_prompt.detach().clone(), persistent=False)
        return model

    def label_scores(self, model, batch) -> torch.Tensor:
        word_scores = super().label_scores(model, batch)
        return aggregate_label_scores(word_scores, self.set_index.to(word_scores.device),
                                      self.set_mask.to(word_scores.device), self.spec.knn_aggregate)

    def label_log_probs(self, model, batch) -> torch.Tensor:
        return torch.log_softmax(scores_dtype(self.label_scores(model, batch)), dim=-1)

    def readable_label_words(self) -> dict[str, list[str]]:
        """label -> the words it is scored by (``topro.json``'s ``label_word_sets``, shown by ``topro evaluate``)."""
        return dict(zip(self.labels, self.label_texts))

    def meta(self) -> dict[str, Any]:
        meta = {**super().meta(), "method": self.name, "label_word_sets": self.readable_label_words()}
        if self.word_sets is not None:
            meta["label_token_sets"] = self.word_sets
        if self.overlap_warnings:
            meta["label_word_warnings"] = self.overlap_warnings
        return meta
