"""ToPro for masked LMs (BERT, XLM-R families): one cloze prompt per word.

Input: ``sentence`` and ``question`` as a segment pair, the question holding
the word and a mask. Loss: cross-entropy over the verbalizer's label-word
logits at the mask (PET-style). The MLM head runs only at mask positions and
only for the label-word rows of the output embedding: the full-vocabulary
logits at every position (what the published code computed) cost far more
than the encoder for 120k-250k vocabularies and are never needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from topro.data.readers import Sentence
from topro.methods.base import (Encoded, MethodSpec, collate_common, label_token_ids, model_inputs, scores_dtype,
                                seen_label_logits, word_pieces)
from topro.methods.packing import (check_packing, check_positions, collate_packed, enable_packed_attention,
                                   fit_questions, pack_sentence, packed_hidden)
from topro.methods.whole_model import WholeModelMethod
from topro.prompts import get_template, get_verbalizer, topro_questions


def context_window(pieces: list[list[int]], target: int, budget: int) -> tuple[list[int], bool]:
    """The sentence's subwords, trimmed to ``budget`` tokens around word ``target``.

    Trimming keeps a window centred on the labelled word (the published code cut
    the sentence's end, so late words lost their own context).
    """
    flat = [t for p in pieces for t in p]
    if len(flat) <= budget:
        return flat, False
    if budget <= 0:
        return [], True
    start_of = sum(len(p) for p in pieces[:target])
    centre = start_of + len(pieces[target]) // 2
    start = min(max(0, centre - budget // 2), len(flat) - budget)
    return flat[start:start + budget], True


def unseen_index(labels: list[str], unseen: list[str]) -> torch.Tensor:
    """The unseen labels' positions in ``labels`` as a tensor (empty: every label seen)."""
    from topro.unseen import unseen_label_indices

    return torch.tensor(unseen_label_indices(labels, list(unseen or [])), dtype=torch.long)


def label_logits_at(model, hidden: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    """MLM-head logits restricted to ``label_ids`` for hidden states [N, H] -> [N, n_labels]."""
    cls = getattr(model, "cls", None)
    if cls is not None and hasattr(cls, "predictions"):  # BERT family
        head = cls.predictions
        h = head.transform(hidden)
        bias = head.decoder.bias if head.decoder.bias is not None else head.bias
        return F.linear(h, head.decoder.weight[label_ids], bias[label_ids])
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and hasattr(lm_head, "dense") and hasattr(lm_head, "layer_norm"):  # RoBERTa, XLM-R
        from transformers.activations import gelu

        h = lm_head.layer_norm(gelu(lm_head.dense(hidden)))
        bias = lm_head.decoder.bias if lm_head.decoder.bias is not None else lm_head.bias
        return F.linear(h, lm_head.decoder.weight[label_ids], bias[label_ids])
    raise NotImplementedError(f"no label-restricted MLM head for {type(model).__name__}: "
                              "supported are BERT-style (cls.predictions) and RoBERTa-style (lm_head) heads")


def full_vocab_label_logits(model, batch: dict[str, torch.Tensor], label_ids: torch.Tensor) -> torch.Tensor:
    """Reference path (the published code's): full MLM logits everywhere, then pick mask rows and labels."""
    logits = model(**model_inputs(batch)).logits
    return logits[batch["label_rows"], batch["label_positions"]][:, label_ids]


class ToProMLM(WholeModelMethod):
    """``spec.prompt_packing``: ``per_word`` (one prompt per word) or ``sentence`` (one packed row
    per sentence window, see ``methods/packing.py``); ``max_packed_length`` bounds a packed row."""

    name = "topro"
    auto_class = "AutoModelForMaskedLM"

    def __init__(self, spec: MethodSpec, tokenizer):
        if tokenizer.mask_token is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path} has no mask token: "
                             "ToPro for masked LMs needs a masked LM")
        super().__init__(spec, tokenizer)
        self.template = get_template(spec.task, spec.template)
        self.verbalizer = get_verbalizer(spec.task, spec.verbalizer)
        self.label_words = self.verbalizer.word_list(self.labels)
        self.label_ids = torch.tensor(label_token_ids(tokenizer, self.label_words, spec.label_word_policy))
        self.unseen_index = unseen_index(self.labels, spec.unseen_labels)
        self.packing = check_packing(spec.prompt_packing, self.name)
        self.max_packed_length = int(spec.max_packed_length)
        self.max_questions_per_row = spec.max_questions_per_row  # None: as many as fit
        if self.packing == "sentence" and self.max_packed_length < spec.max_length:
            raise ValueError(f"max_packed_length={self.max_packed_length} must be at least "
                             f"max_length={spec.max_length}")

    def build_model(self, model_path: str) -> torch.nn.Module:
        return self.ready(super().build_model(model_path))

    def load_model(self, checkpoint: str | Path) -> torch.nn.Module:
        return self.ready(super().load_model(checkpoint))

    def ready(self, model: torch.nn.Module) -> torch.nn.Module:
        """Refuse a ``max_length`` past the position embeddings; packed: block attention (same values as
        the 4-D mask, without computing the question-question pairs it masks out)."""
        check_positions(model, self.spec.max_length)
        if self.packing == "sentence":
            enable_packed_attention(getattr(model, model.base_model_prefix))
        return model

    def question_ids(self, sentence: Sentence, pieces: list[list[int]]) -> list[list[int]]:
        """The hand-written question's token ids, one question per word."""
        return self.tokenizer(topro_questions(self.template, sentence.words, self.tokenizer.mask_token),
                              add_special_tokens=False)["input_ids"]

    def encode(self, sentences: list[Sentence]) -> list[Encoded]:
        return self.encode_with(sentences, self.question_ids)

    def encode_with(self, sentences: list[Sentence],
                    question_ids: Callable[[Sentence, list[list[int]]], list[list[int]]]) -> list[Encoded]:
        """One (sentence, question) pair per word, or (packed) one row per sentence window;
        ``question_ids(sentence, word_pieces)`` supplies the questions (each holding the mask id), so other
        question forms (soft prompts) reuse this layout."""
        mask_id = self.tokenizer.mask_token_id
        layout = self.layout
        out = []
        for s_index, sentence in enumerate(sentences):
            pieces = word_pieces(self.tokenizer, sentence.words)
            questions = fit_questions(sentence, pieces, question_ids(sentence, pieces),
                                      self.spec.max_length - layout.pair_overhead, question_ids, self.tokenizer,
                                      mask_id)
            if self.packing == "sentence":
                out.extend(pack_sentence(s_index, sentence, pieces, questions, layout, mask_id, self.label_index,
                                         self.spec.max_length, self.max_packed_length,
                                         self.max_questions_per_row))
                continue
            for w_index, question in enumerate(questions):
                budget = self.spec.max_length - layout.pair_overhead - len(question)
                context, trimmed = context_window(pieces, w_index, budget)
                ids = layout.lead + context + layout.middle + question + layout.suffix
                offset = len(layout.lead) + len(context) + len(layout.middle)
                mask_at = offset + question.index(mask_id)
                types = None
                if layout.uses_token_types:
                    n_a = len(layout.lead) + len(context) + len(layout.middle)
                    types = [layout.type_a] * n_a + [layout.type_b] * (len(ids) - n_a)
                tag = sentence.tags[w_index] if sentence.tags else None
                out.append(Encoded(ids, s_index, [w_index], [mask_at],
                                   [self.label_index.get(tag, -100)], types, trimmed_context=trimmed))
        return out

    def collate(self, examples: list[Encoded]) -> dict[str, torch.Tensor]:
        if self.packing == "sentence":
            return collate_packed(examples, self.layout)
        return collate_common(examples, self.layout)

    def _label_logits(self, model, batch) -> torch.Tensor:
        base = getattr(model, model.base_model_prefix)
        if "packing_blocks" in batch:
            at_mask = packed_hidden(base, batch, batch["input_ids"], self.spec.packed_word_bias)
        else:
            hidden = base(**model_inputs(batch)).last_hidden_state
            at_mask = hidden[batch["label_rows"], batch["label_positions"]]
        return label_logits_at(model, at_mask, self.label_ids.to(at_mask.device))

    def loss(self, model, batch) -> torch.Tensor:
        logits = seen_label_logits(self._label_logits(model, batch).float(), self.unseen_index)
        return F.cross_entropy(logits, batch["labels"], ignore_index=-100)

    def label_log_probs(self, model, batch) -> torch.Tensor:
        return torch.log_softmax(scores_dtype(self._label_logits(model, batch)), dim=-1)

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "label_words": self.label_words,
                "label_token_ids": self.label_ids.tolist(), "prompt_packing": self.packing}
