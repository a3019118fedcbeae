"""ToPro for causal (decoder-only) LMs: Llama, Gemma 3, Qwen2 families.

The prompt is the one ``topro eval-llm --mode score --shots 0`` scores: the LLM format of
``prompts/llm_formats/`` (``llm_format``; instruction with the label list, the sentence, one question per
word) tokenized by ``llm.backends.PromptTokens`` (each piece after all the text before it, BOS by hand).
The score of a label is the sum of its continuation's token log-probabilities (the label word and the
format's answer end, over the full vocabulary; ``answer_end_scored: when_needed`` leaves the end out when the
label words' tokenizations are prefix-free, ``per_answer`` after the words that start no other); the loss is
the cross-entropy of the label set's scores, so before any training step the label log-probabilities are
eval-llm's (``test_topro_causal.py``).

A row is a ``llm.scoring.PromptTree``: the prompt prefix once, then per question its tokens and every
label's tokens but the last, with a 4-D mask letting each token see only its ancestors (a label its
question and its own earlier tokens) and explicit positions placing every label right after its
question. ``per_word``: one question per row. ``sentence`` (packed): all of a sentence's questions in one
row, each seeing the sentence and itself, at the positions it has in its own prompt. Causal attention
makes the two the same computation (packed == per-word scores and gradients); packed runs the sentence
once instead of once per word. Sliding-window layers (Gemma 3) get masks windowed by real position.
ALiBi models (BLOOM) take no 4-D mask: per word, each row is unfolded into one plain sequence per label
(the prompt and that label's tokens, a 2-D padding mask, as ``eval-llm`` scores them), which costs a
forward per label; packed rows cannot be unfolded so, and are refused.

Subclasses change what is asked and answered through two hooks: ``question_ids`` (soft ToPro puts
trainable vectors into the question) and ``continuation_texts`` (RoSPrompt scores several words per label);
``n_scored`` is the number of continuations scored per question.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from topro.data.readers import Sentence
from topro.methods.base import Encoded, MethodSpec, pad_batch, scores_dtype, seen_label_logits
from topro.methods.packing import check_packing, check_positions
from topro.methods.whole_model import WholeModelMethod

log = logging.getLogger(__name__)

PAD_SENT, PAD_GROUP = -1, -2


@dataclass
class CausalRow(Encoded):
    """One prompt tree: ``words`` are its questions, in order."""

    position_ids: list[int] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    """Per token: -1 the shared prefix, else its question's number (``PromptTree.group``)."""
    branches: list[int] = field(default_factory=list)
    """Per token: -1 prefix or question, else the label whose branch it is on."""
    slots: list[int] = field(default_factory=list)
    """Token indices whose next-token distribution is read."""
    targets: list[tuple[int, int, int, int]] = field(default_factory=list)
    """(question in the row, label, slot, token) per scored label token."""

    @property
    def batch_units(self) -> int:
        return len(self.words)


def lm_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits of hidden states [N, H], as the model's own forward computes them (Gemma's
    final soft-capping included)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def tree_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor], n_scored: int,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """[words, n_scored]: each continuation's summed token log-probability in a batch of prompt-tree rows
    (``inputs_embeds`` [rows, tokens, H]: run on these instead of the embeddings of ``input_ids``)."""
    from topro.llm.scoring import _attention_masks, takes_tree_masks, tree_visibility

    base = getattr(model, model.base_model_prefix)
    inputs = {"input_ids": batch["input_ids"]} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    slot_index = batch["slot_index"]
    if takes_tree_masks(model.config):
        visible = tree_visibility(batch["tree_sent"], batch["tree_group"], batch["tree_branch"])
        positions = batch["position_ids"]
        dtype = base.get_input_embeddings().weight.dtype
        masks = _attention_masks(model.config, visible, positions, positions, dtype)
        hidden = base(**inputs, position_ids=positions, attention_mask=masks, use_cache=False).last_hidden_state
    else:
        inputs, mask, slot_index = unfold_per_label(batch, inputs, slot_index)
        hidden = base(**inputs, attention_mask=mask, use_cache=False).last_hidden_state
    logits = scores_dtype(lm_logits(model, hidden.flatten(0, 1).index_select(0, slot_index)))
    lse = torch.logsumexp(logits, dim=-1)  # each slot's normaliser, once however many labels read it
    picked = logits[batch["target_slot"], batch["target_token"]] - lse[batch["target_slot"]]
    n_words = batch["labels"].shape[0]
    scores = picked.new_zeros(n_words * n_scored).index_add(0, batch["target_cell"], picked)
    return scores.view(n_words, n_scored)


def unfold_per_label(batch: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], slot_index: torch.Tensor):
    """Per-word tree rows as plain sequences for ALiBi models: per row, the trunk (prompt and question) then
    one label's branch, one sequence per label with a branch (the trunk alone if none has). Returns the
    sequences' inputs, their 2-D padding mask and ``slot_index`` pointing into them (a trunk token is read
    from its row's first sequence: causal attention gives it the same state in all)."""
    sent, branch = batch["tree_sent"].tolist(), batch["tree_branch"].flatten().tolist()
    longest = len(sent[0])
    sources: list[list[int]] = []  # per sequence: the flat tree indices it runs
    where: dict[int, tuple[int, int]] = {}  # flat tree index -> (sequence, position)
    for row, row_sent in enumerate(sent):
        real = [row * longest + i for i, s in enumerate(row_sent) if s != PAD_SENT]
        of = {i: branch[i] for i in real}
        trunk = [i for i in real if of[i] < 0]
        first = len(sources)
        for label in sorted(set(of.values()) - {-1}) or [None]:
            own = [i for i in real if of[i] == label]
            where.update((i, (len(sources), len(trunk) + at)) for at, i in enumerate(own))
            sources.append(trunk + own)
        where.update((i, (first, at)) for at, i in enumerate(trunk))
    width = max(len(s) for s in sources)
    gather = torch.zeros(len(sources), width, dtype=torch.long)
    mask = torch.zeros(len(sources), width, dtype=torch.long)
    for s, indices in enumerate(sources):
        gather[s, :len(indices)] = torch.tensor(indices)
        mask[s, :len(indices)] = 1
    device = slot_index.device
    gather, mask = gather.to(device), mask.to(device)
    unfolded = {name: value.flatten(0, 1)[gather] for name, value in inputs.items()}
    remapped = torch.tensor([where[int(i)][0] * width + where[int(i)][1] for i in slot_index.tolist()],
                            dtype=torch.long, device=device)
    return unfolded, mask, remapped


class ToProCausal(WholeModelMethod):
    name = "topro"
    auto_class = "AutoModelForCausalLM"

    def __init__(self, spec: MethodSpec, tokenizer):
        from topro.llm.backends import PromptTokens
        from topro.data.tasks import get_task
        from topro.prompts.formats import task_prompt

        if tokenizer.pad_token_id is None:
            log.info("%s has no pad token: padding with its eos token %r (padding is never attended to)",
                     getattr(tokenizer, "name_or_path", "the tokenizer"), tokenizer.eos_token)
            tokenizer.pad_token = tokenizer.eos_token
        self.spec = spec
        self.labels = list(spec.labels)
        self.label_index = {label: i for i, label in enumerate(self.labels)}
        self.tokenizer = tokenizer
        self.tokens = PromptTokens(tokenizer)
        # eval-llm's own setup (format, label words, instruction): one prompt source for both.
        self.setup = task_prompt(get_task(spec.task), spec.llm_format, spec.verbalizer)
        if self.setup.fmt.style != "topro":
            raise ValueError(f"llm_format={spec.llm_format!r} is a {self.setup.fmt.style!r}-style format; "
                             "ToPro training needs a topro-style format (one question per word)")
        self.label_words = [self.setup.label_words[t] for t in self.labels]
        self.packing = check_packing(spec.prompt_packing, self.name)
        from topro.methods.topro_mlm import unseen_index

        self.unseen_index = unseen_index(self.labels, spec.unseen_labels)

    def build_model(self, model_path: str) -> torch.nn.Module:
        return self.ready(super().build_model(model_path))

    def load_model(self, checkpoint: str | Path) -> torch.nn.Module:
        return self.ready(super().load_model(checkpoint))

    def ready(self, model: torch.nn.Module) -> torch.nn.Module:
        from topro.llm.scoring import takes_tree_masks

        if self.packing != "per_word" and not takes_tree_masks(model.config):
            raise ValueError(f"prompt_packing={self.packing!r}: method {self.name!r} on "
                             f"{model.config.model_type} ({type(model).__name__}): its ALiBi position biases are "
                             "built from a 2-D padding mask, which cannot hold a packed row's questions; use "
                             "prompt_packing=per_word, or a Llama, Gemma, Qwen or other rotary-position model")
        check_positions(model, self.spec.max_length)
        return model

    @property
    def n_scored(self) -> int:
        """Continuations scored per question: one per label."""
        return len(self.labels)

    def continuation_texts(self, answers: dict[str, str]) -> list[str]:
        """What each scored continuation says after the question, before the answer end: each label's answer."""
        return [answers[t] for t in self.labels]

    @functools.cached_property
    def answer_ends(self) -> list[str]:
        """What is scored after each continuation (``answer_end_scored``, ``llm.backends.scored_answer_ends``;
        decided on first use, once the subclass knows its continuations): the format's answer end, or nothing."""
        from topro.llm.backends import scored_answer_ends
        from topro.prompts.formats import render_topro

        setup = self.setup
        answers = render_topro(setup.fmt, setup.task.name, setup.label_words, setup.context, ["word"]).answers
        return scored_answer_ends(self.spec.answer_end_scored, setup, self.tokens, self.continuation_texts(answers))

    def question_ids(self, questions: list[list[int]]) -> list[list[int]]:
        """The token ids each question is asked with (here: as tokenized)."""
        return questions

    # --- encoding ------------------------------------------------------------------------------------

    def _prompt(self, words: list[str], only: int | None = None
                ) -> tuple[list[int], list[list[int]], list[list[list[int]]]]:
        """(prefix ids, question ids, label ids per question) of a sentence's words (``only``: of word
        ``only``'s question alone), as eval-llm's backend tokenizes them (``PromptTokens.prompt_ids``)."""
        from topro.prompts.formats import render_topro

        setup = self.setup
        p = render_topro(setup.fmt, setup.task.name, setup.label_words, setup.context, words)
        continuations = [text + end for text, end in zip(self.continuation_texts(p.answers), self.answer_ends)]
        questions = p.questions if only is None else [p.questions[only]]
        sent_ids, q_ids, labels = self.tokens.prompt_ids(setup.context, p.sentence, questions, continuations)
        return self.tokens.bos + self.tokens.ids(setup.context) + sent_ids, self.question_ids(q_ids), labels

    def _fits(self, prefix: list[int], question: list[int], labels: list[list[int]]) -> bool:
        return len(prefix) + len(question) + max(len(l) for l in labels) <= self.spec.max_length

    def _row(self, s_index: int, sentence: Sentence, words: list[int], prefix: list[int],
             questions: list[list[int]], labels: list[list[int]], trimmed: bool = False) -> CausalRow:
        from topro.llm.scoring import PromptTree, ScoringItem, _normalise_item

        # Tokens every question of the row starts with join the prefix (run once): the same values.
        _, pending, questions = _normalise_item(None, ScoringItem(prefix, questions))
        tree = PromptTree()
        tree.add_sentence(0, pending, 0, dict(enumerate(questions)), labels)
        gold = [self.label_index.get(sentence.tags[w], -100) if sentence.tags else -100 for w in words]
        return CausalRow(tree.ids, s_index, list(words), [tree.kept[0]] * len(words), gold,
                         trimmed_context=trimmed, position_ids=tree.pos, groups=tree.group, branches=tree.seg,
                         slots=tree.kept, targets=[(q, j, slot, token) for _, q, j, slot, token in tree.targets])

    def _trimmed_row(self, s_index: int, sentence: Sentence, w: int) -> CausalRow:
        """Word ``w``'s prompt over the widest window of words around it that fits ``max_length``."""
        n = len(sentence.words)

        def prompt(radius: int):
            lo, hi = max(0, w - radius), min(n, w + radius + 1)
            prefix, [question], [labels] = self._prompt(sentence.words[lo:hi], only=w - lo)
            return prefix, question, labels

        lo, hi = 0, n  # the largest radius that fits: binary search
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._fits(*prompt(mid)):
                lo = mid
            else:
                hi = mid - 1
        prefix, question, labels = prompt(lo)
        if not self._fits(prefix, question, labels):
            raise ValueError(f"the prompt about word {sentence.words[w][:60]!r} ({sentence.source or 'sentence'}) "
                             f"needs {len(prefix) + len(question) + max(map(len, labels))} tokens even with the "
                             f"sentence cut to that word, more than max_length={self.spec.max_length}; "
                             "raise max_length")
        return self._row(s_index, sentence, [w], prefix, [question], labels, trimmed=True)

    def _packed_rows(self, s_index: int, sentence: Sentence, prefix, questions, labels) -> list[CausalRow]:
        """Consecutive questions share a row while it stays within ``max_packed_length`` tokens (and
        ``max_questions_per_row``) and their labels tokenize alike."""
        limit, most = self.spec.max_packed_length, self.spec.max_questions_per_row
        rows, group, size = [], [], len(prefix)
        for w, q in enumerate(questions):
            cost = len(q) + sum(len(l) - 1 for l in labels[w])
            if group and (size + cost > limit or (most and len(group) >= most) or labels[w] != labels[group[0]]):
                rows.append(self._row(s_index, sentence, group, prefix, [questions[v] for v in group],
                                      labels[group[0]]))
                group, size = [], len(prefix)
            group.append(w)
            size += cost
        if group:
            rows.append(self._row(s_index, sentence, group, prefix, [questions[v] for v in group], labels[group[0]]))
        return rows

    def encode(self, sentences: list[Sentence]) -> list[Encoded]:
        out: list[Encoded] = []
        for s_index, sentence in enumerate(sentences):
            if not sentence.words:
                continue
            prefix, questions, labels = self._prompt(sentence.words)
            fits = [self._fits(prefix, q, l) for q, l in zip(questions, labels)]
            if self.packing == "sentence" and all(fits):
                out.extend(self._packed_rows(s_index, sentence, prefix, questions, labels))
                continue
            for w, (question, label_ids) in enumerate(zip(questions, labels)):
                out.append(self._row(s_index, sentence, [w], prefix, [question], label_ids) if fits[w]
                           else self._trimmed_row(s_index, sentence, w))
        return out

    # --- batches and scores --------------------------------------------------------------------------

    def collate(self, examples: list[Encoded]) -> dict[str, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id
        input_ids, _ = pad_batch([e.input_ids for e in examples], pad_id)
        longest = input_ids.shape[1]

        def padded(values: list[list[int]], fill: int) -> torch.Tensor:
            return torch.tensor([v + [fill] * (longest - len(v)) for v in values], dtype=torch.long)

        sent = padded([[0] * e.length for e in examples], PAD_SENT)
        slot_index, target_slot, target_token, target_cell = [], [], [], []
        word = 0
        for row, e in enumerate(examples):
            first = len(slot_index)
            slot_index += [row * longest + s for s in e.slots]
            for q, j, slot, token in e.targets:
                target_slot.append(first + slot)
                target_token.append(token)
                target_cell.append((word + q) * self.n_scored + j)
            word += len(e.words)

        def long(values):
            return torch.tensor(values, dtype=torch.long)

        return {"input_ids": input_ids, "position_ids": padded([e.position_ids for e in examples], 0),
                "tree_sent": sent, "tree_group": padded([e.groups for e in examples], PAD_GROUP),
                "tree_branch": padded([e.branches for e in examples], -1),
                "slot_index": long(slot_index), "target_slot": long(target_slot),
                "target_token": long(target_token), "target_cell": long(target_cell),
                "labels": long([l for e in examples for l in e.labels])}

    def label_scores(self, model, batch) -> torch.Tensor:
        """[words, labels]: each label's summed continuation log-probability (not yet normalised over labels)."""
        return tree_scores(model, batch, self.n_scored)

    def loss(self, model, batch) -> torch.Tensor:
        # Unseen labels leave the training softmax (as on masked LMs): their words are never pushed down.
        scores = seen_label_logits(scores_dtype(self.label_scores(model, batch)), self.unseen_index)
        return F.cross_entropy(scores, batch["labels"], ignore_index=-100)

    def label_log_probs(self, model, batch) -> torch.Tensor:
        return torch.log_softmax(self.label_scores(model, batch), dim=-1)

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "architecture": "causal", "label_words": self.label_words,
                "prompt_packing": self.packing}
