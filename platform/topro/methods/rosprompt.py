"""RoSPrompt: robust soft prompts for cross-lingual generalized zero-shot labelling (masked LMs).

Philippy et al. 2025 ("Enhancing Small Language Models for Cross-Lingual Generalized Zero-Shot
Classification with Soft Prompt Tuning", arXiv 2503.19469) train a soft prompt on a frozen small
multilingual encoder with nonparametric verbalizers, contrastive label smoothing and a robustness term.
Their equations were not available here: each ingredient below is this platform's reading of the paper's
description, a switchable option, not checked against its equations.

Over soft ToPro (one cloze prompt per word, the template's text turned into ``prefix_length`` trainable
vectors, backbone frozen, ``methods/topro_soft.py``):

- **Label words** (``verbalizer_expansion``). ``none``: a label scores its verbalizer's seed words (a YAML
  list gives several, in several languages). ``knn`` (NPPrompt, Zhao et al. 2023): a label's words are the
  ``knn_k`` vocabulary tokens nearest to its seed words in the backbone's input-embedding space,
  ``sim(t, label) = max_s cos(e_t, e_s)`` over the label's seeds ``s`` (a seed of several tokens embeds as
  their mean); special tokens are never chosen. A token may serve several labels.
- **Aggregation** (``knn_aggregate``) of the MLM logits ``z_t`` at the mask over a label's words ``W_y``:
  ``mean``: ``(1/|W_y|) sum z_t``; ``max``: ``max z_t``; ``logsumexp``: ``log((1/|W_y|) sum exp z_t)`` (the
  log of the words' mean probability up to the shared normaliser; minus ``log |W_y|`` so labels with more
  words are not favoured). Label log-probabilities are the log-softmax of these scores over the labels.
- **Label smoothing** (``label_smoothing`` = eps, ``label_smoothing_kind``). The target over the seen labels S
  for gold g is ``q(g) = 1 - eps`` and, for ``j != g``, ``q(j) = eps * w_j / sum_{k in S, k != g} w_k`` with
  ``uniform``: ``w_j = 1``; ``contrastive``: ``w_j = exp((c(g, j) - m) / tau)``, ``c`` the cosine similarity of
  the labels' mean word embeddings, ``m`` the largest ``c(g, k)`` over ``k != g`` (for stability), ``tau`` =
  ``label_smoothing_temperature``. Smoothing mass goes to labels whose words are near the gold one, so the
  prompt is not pushed to separate labels the embedding space says are related, which is what lets an unseen
  label's words score where they belong. Equal similarities give exactly uniform smoothing.
- **Robustness penalty** (``prompt_drift_penalty`` = lambda): ``lambda * ||P - P0||^2 / ||P0||^2``, the soft
  prompt's squared drift from its initialisation (the template's token embeddings) relative to that
  initialisation's squared norm (scale-free across backbones). English-only training can move the prompt
  to regions of the embedding space no real token occupies, where the frozen multilingual encoder has never
  been trained to behave alike across languages; keeping it near real tokens is a bound on that shift.
- Zero training steps (``epochs: 0``): the prompt stays the template's embeddings, i.e. NPPrompt-style
  zero-shot prompting with the (k-NN-expanded) verbalizer.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from topro.methods.base import MethodSpec, scores_dtype
from topro.methods.topro_soft import SoftPromptMLM, ToProSoft, soft_inputs

log = logging.getLogger(__name__)

EXPANSIONS = ("none", "knn")
AGGREGATES = ("mean", "max", "logsumexp")
SMOOTHING_KINDS = ("uniform", "contrastive")


def smoothing_targets(gold: torch.Tensor, similarity: torch.Tensor, eps: float, kind: str,
                      temperature: float = 1.0) -> torch.Tensor:
    """Target distributions [n, L] for gold labels ``gold`` [n] over L labels with pairwise label
    ``similarity`` [L, L] (see the module docstring for the formula). Uniform and contrastive share the
    arithmetic (``w / sum w``), so equal similarities give exactly the uniform targets."""
    if kind not in SMOOTHING_KINDS:
        raise ValueError(f"label_smoothing_kind must be one of {SMOOTHING_KINDS}, got {kind!r}")
    n_labels = similarity.shape[0]
    is_gold = F.one_hot(gold, n_labels).bool()
    if kind == "uniform":
        weights = torch.ones(len(gold), n_labels, dtype=similarity.dtype, device=similarity.device)
    else:
        sim = similarity[gold].masked_fill(is_gold, float("-inf"))
        weights = torch.exp((sim - sim.max(dim=-1, keepdim=True).values) / temperature)
    weights = weights.masked_fill(is_gold, 0.0)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.where(is_gold, torch.full_like(weights, 1.0 - eps), eps * weights)


def aggregate_label_scores(word_logits: torch.Tensor, index: torch.Tensor, mask: torch.Tensor,
                           how: str) -> torch.Tensor:
    """Per-label scores [N, L] from the logits of every label word [N, W]; ``index`` [L, K] points into W
    (padded), ``mask`` [L, K] marks real entries."""
    gathered = word_logits[:, index]  # [N, L, K]
    if how == "mean":
        return (gathered * mask).sum(-1) / mask.sum(-1)
    filled = gathered.masked_fill(~mask, float("-inf"))
    if how == "max":
        return filled.max(dim=-1).values
    if how == "logsumexp":
        return filled.logsumexp(dim=-1) - mask.sum(-1).to(filled.dtype).log()
    raise ValueError(f"knn_aggregate must be one of {AGGREGATES}, got {how!r}")


def seed_vectors(tokenizer, table: torch.Tensor, words: tuple[str, ...]) -> tuple[torch.Tensor, list[int]]:
    """[n_seeds, H] embeddings of a label's seed words (a multi-token seed: the mean of its tokens') and the
    first content token of each seed (what ``verbalizer_expansion: none`` scores)."""
    vectors, firsts = [], []
    for word in words:
        pieces = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        content = [p for p in pieces if tokenizer.convert_ids_to_tokens(p) not in ("▁", "Ġ", "")] or pieces
        if not content or content[0] == tokenizer.unk_token_id:
            raise ValueError(f"seed word {word!r} is unknown to tokenizer {tokenizer.name_or_path}")
        vectors.append(table[torch.tensor(content)].float().mean(0))
        firsts.append(content[0])
    return torch.stack(vectors), firsts


def candidate_mask(tokenizer, vocab_rows: int) -> torch.Tensor:
    """[vocab_rows] True for tokens kNN may choose: the tokenizer's, minus special tokens (padding rows of
    an embedding matrix larger than the tokenizer are never chosen)."""
    allowed = torch.zeros(vocab_rows, dtype=torch.bool)
    allowed[:min(len(tokenizer), vocab_rows)] = True
    specials = [i for i in tokenizer.all_special_ids if i < vocab_rows]
    allowed[specials] = False
    return allowed


def knn_label_words(table: torch.Tensor, seeds: list[torch.Tensor], k: int, allowed: torch.Tensor) -> list[list[int]]:
    """Per label, the ``k`` allowed tokens with the highest ``max_s cos(e_t, e_s)`` over its seed vectors."""
    n_allowed = int(allowed.sum())
    if k > n_allowed:
        raise ValueError(f"knn_k={k} is more than the {n_allowed} tokens of the vocabulary kNN can choose from")
    norms = table.float().norm(dim=-1).clamp_min(1e-12)
    out = []
    for vectors in seeds:
        sims = (vectors @ table.float().T) / (vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norms)
        best = sims.max(dim=0).values.masked_fill(~allowed, float("-inf"))
        out.append(best.topk(k).indices.tolist())
    return out


def check_word_settings(spec: MethodSpec) -> None:
    """``verbalizer_expansion`` and ``knn_aggregate`` are known values (masked and decoder-only RoSPrompt)."""
    if spec.verbalizer_expansion not in EXPANSIONS:
        raise ValueError(f"verbalizer_expansion must be one of {EXPANSIONS}, got {spec.verbalizer_expansion!r}")
    if spec.knn_aggregate not in AGGREGATES:
        raise ValueError(f"knn_aggregate must be one of {AGGREGATES}, got {spec.knn_aggregate!r}")


class RoSPrompt(ToProSoft):
    """Soft ToPro with expanded multilingual verbalizers, label smoothing and a prompt-drift penalty."""

    name = "rosprompt"

    def __init__(self, spec: MethodSpec, tokenizer):
        super().__init__(spec, tokenizer)
        check_word_settings(spec)
        self.verbalizer = self.cloze.verbalizer
        self.unseen_index = self.cloze.unseen_index
        self.seen_index = torch.tensor([i for i in range(len(self.labels)) if i not in set(self.unseen_index.tolist())])
        # A checkpoint records the words it was trained with: reloading never recomputes them.
        self.word_sets: list[list[int]] | None = spec.label_token_sets
        self.label_similarity: torch.Tensor | None = None
        self.overlap_warnings: list[str] = []

    # -- label words --------------------------------------------------------------------------------------------
    def choose_label_words(self, table: torch.Tensor) -> list[list[int]]:
        """Each label's scored tokens from the backbone's input embeddings ``table`` [V, H]."""
        seeds = [seed_vectors(self.tokenizer, table, self.verbalizer.seed_words(label)) for label in self.labels]
        if self.spec.verbalizer_expansion == "none":
            return [list(dict.fromkeys(firsts)) for _, firsts in seeds]
        allowed = candidate_mask(self.tokenizer, table.shape[0])
        try:
            return knn_label_words(table, [v for v, _ in seeds], int(self.spec.knn_k), allowed)
        except ValueError as err:
            raise ValueError(f"field 'knn_k': {err}") from None

    def warn_unseen_overlap(self) -> list[str]:
        """Warnings (also logged) for each unseen label whose seed word is a chosen word of a seen label."""
        messages = []
        unseen = set(self.unseen_index.tolist())
        table_firsts = {i: set(self._seed_firsts[i]) for i in range(len(self.labels))}
        for u in sorted(unseen):
            for s in range(len(self.labels)):
                if s in unseen:
                    continue
                shared = table_firsts[u] & set(self.word_sets[s])
                if shared:
                    words = self.tokenizer.convert_ids_to_tokens(sorted(shared))
                    messages.append(f"unseen label {self.labels[u]!r}: its label word(s) {words} are also kNN "
                                    f"neighbours of the seen label {self.labels[s]!r}, which trains them")
        for message in messages:
            log.warning(message)
        return messages

    def _prepare_words(self, table: torch.Tensor) -> None:
        self._seed_firsts = [seed_vectors(self.tokenizer, table, self.verbalizer.seed_words(label))[1]
                             for label in self.labels]
        if self.word_sets is None:
            self.word_sets = self.choose_label_words(table)
            self.overlap_warnings = self.warn_unseen_overlap()
        flat = [t for words in self.word_sets for t in words]
        width = max(len(words) for words in self.word_sets)
        index = torch.zeros(len(self.labels), width, dtype=torch.long)
        mask = torch.zeros(len(self.labels), width, dtype=torch.bool)
        at = 0
        for row, words in enumerate(self.word_sets):
            index[row, :len(words)] = torch.arange(at, at + len(words))
            mask[row, :len(words)] = True
            at += len(words)
        self.flat_ids, self.set_index, self.set_mask = torch.tensor(flat), index, mask
        centres = torch.stack([table[torch.tensor(words)].float().mean(0) for words in self.word_sets])
        centres = F.normalize(centres.double(), dim=-1)
        self.label_similarity = centres @ centres.T

    def _model_on(self, mlm: nn.Module, prompt: torch.Tensor | None = None) -> SoftPromptMLM:
        model = super()._model_on(mlm, prompt)
        self._prepare_words(model.mlm.get_input_embeddings().weight.detach())
        model.label_ids = self.flat_ids.clone()
        # The initial prompt, for the drift penalty (not saved: rebuilt from the template when training resumes).
        model.register_buffer("prompt_init", model.soft_prompt.detach().clone(), persistent=False)
        return model

    # -- training and inference -------------------------------------------------------------------------------
    def label_scores(self, model, batch) -> torch.Tensor:
        word_logits = model(**soft_inputs(batch))
        return aggregate_label_scores(word_logits, self.set_index.to(word_logits.device),
                                      self.set_mask.to(word_logits.device), self.spec.knn_aggregate)

    def loss(self, model, batch) -> torch.Tensor:
        scores = self.label_scores(model, batch).float()
        labels = batch["labels"]
        keep = labels != -100
        seen = self.seen_index.to(scores.device)
        position = torch.full((len(self.labels),), -1, dtype=torch.long, device=scores.device)
        position[seen] = torch.arange(len(seen), device=scores.device)
        gold = position[labels[keep]]
        if (gold < 0).any():
            raise ValueError("a gold label of a training word is unseen: hide_unseen_gold should have removed it")
        log_probs = torch.log_softmax(scores[keep][:, seen], dim=-1)
        eps = float(self.spec.label_smoothing)
        if eps > 0:
            similarity = self.label_similarity.to(scores.device)[seen][:, seen].float()
            target = smoothing_targets(gold, similarity, eps, self.spec.label_smoothing_kind,
                                       float(self.spec.label_smoothing_temperature))
            loss = -(target * log_probs).sum(-1).mean()
        else:
            loss = F.nll_loss(log_probs, gold)
        return loss + self.drift_penalty(model).to(loss.dtype)

    def drift_penalty(self, model) -> torch.Tensor:
        weight = float(self.spec.prompt_drift_penalty)
        if not weight or not model.soft_prompt.shape[0]:
            return torch.zeros((), device=model.soft_prompt.device)
        init = model.prompt_init.to(model.soft_prompt.dtype)
        return weight * (model.soft_prompt - init).pow(2).sum() / init.pow(2).sum().clamp_min(1e-12)

    def label_log_probs(self, model, batch) -> torch.Tensor:
        return torch.log_softmax(scores_dtype(self.label_scores(model, batch)), dim=-1)

    def readable_label_words(self) -> dict[str, list[str]]:
        """label -> its scored tokens, as text (``topro.json``'s ``label_word_sets``, shown by ``topro evaluate``)."""
        return {label: self.tokenizer.convert_ids_to_tokens(words) for label, words in zip(self.labels, self.word_sets)}

    def meta(self) -> dict[str, Any]:
        meta = {**super().meta(), "method": self.name}
        if self.word_sets is not None:
            meta["label_token_sets"] = self.word_sets
            meta["label_word_sets"] = self.readable_label_words()
        if self.overlap_warnings:
            meta["label_word_warnings"] = self.overlap_warnings
        return meta
