"""The methods on a ``kind: classification`` task (one label per text), masked LMs: what
``method_registry.MethodEntry.classification_cls`` names.

A text reaches a method as a one-unit ``Sentence`` (``data.classification.as_sentence``: its one word the
whole text, its one tag the class), so training, evaluation and serving are the token tasks' own; only the
encoding differs, and the scoring above it is the word method's unchanged:

- ``topro`` / ``topro_soft`` / ``rosprompt``: one cloze prompt per text, the text and the task's
  classification question (``{mask}``, no ``{word}``; hand-written, or its text turned into soft vectors)
  as a segment pair; the label words (the class names' verbalizer words, kNN-expanded for RoSPrompt) are
  scored at the mask as for a word. A text longer than ``max_length`` keeps its beginning (the question and
  the mask are never cut), counted in ``n_trimmed_prompts``. The generalized zero-shot protocol is the
  token tasks': an unseen class's words leave the training softmax, its texts carry no loss.
- ``vanilla``: a sequence-classification head (``AutoModelForSequenceClassification``: BERT's pooler and a
  linear layer on ``[CLS]``, XLM-R's classification head on ``<s>``) over the text alone.
"""
from __future__ import annotations

import torch

from topro.data.readers import Sentence
from topro.methods.base import Encoded, model_inputs
from topro.methods.rosprompt import RoSPrompt
from topro.methods.topro_mlm import ToProMLM
from topro.methods.topro_soft import ToProSoft
from topro.methods.vanilla import Vanilla


def text_ids(tokenizer, sentence: Sentence) -> list[int]:
    """The token ids of a one-unit sentence's text (no special tokens)."""
    return tokenizer(sentence.words[0], add_special_tokens=False)["input_ids"]


def gold_index(label_index: dict[str, int], sentence: Sentence) -> int:
    """The class index of a text (-100 when it has no gold label: serving)."""
    return label_index.get(sentence.tags[0], -100) if sentence.tags else -100


class TextCloze(ToProMLM):
    """ToPro for masked LMs on a classification task: ``(text, question)`` per text, the class words
    scored at the question's mask."""

    def __init__(self, spec, tokenizer):
        super().__init__(spec, tokenizer)
        if self.packing != "per_word":
            raise ValueError(f"prompt_packing={self.packing!r}: a classification task asks one question per "
                             "text, so there is nothing to pack; use per_word")

    def encode_with(self, sentences, question_ids) -> list[Encoded]:
        """One row per text: ``lead text middle question suffix``, the text cut at its end to fit
        ``max_length``; ``question_ids(sentence, [text ids])`` gives the one question (hand-written or soft)."""
        mask_id, layout = self.tokenizer.mask_token_id, self.layout
        out = []
        for s_index, sentence in enumerate(sentences):
            text = text_ids(self.tokenizer, sentence)
            question = question_ids(sentence, [text])[0]
            budget = self.spec.max_length - layout.pair_overhead - len(question)
            if budget < 1:
                raise ValueError(f"the classification question needs {len(question)} tokens: max_length "
                                 f"{self.spec.max_length} leaves no room for the text; raise max_length")
            context = text[:budget]
            ids = layout.lead + context + layout.middle + question + layout.suffix
            n_a = len(layout.lead) + len(context) + len(layout.middle)
            types = [layout.type_a] * n_a + [layout.type_b] * (len(ids) - n_a) if layout.uses_token_types else None
            out.append(Encoded(ids, s_index, [0], [n_a + question.index(mask_id)],
                               [gold_index(self.label_index, sentence)], types,
                               trimmed_context=len(text) > budget))
        return out


class TextClozeSoft(ToProSoft):
    """Soft ToPro on a classification task: the classification question's text as soft vectors."""

    cloze_class = TextCloze


class TextClozeRoSPrompt(RoSPrompt):
    """RoSPrompt on a classification task (its home task): soft question, kNN class words, smoothing, penalty."""

    cloze_class = TextCloze


class TextVanilla(Vanilla):
    """Vanilla on a classification task: a sequence-classification head over the text (cut at its end to
    fit ``max_length``)."""

    auto_class = "AutoModelForSequenceClassification"

    def encode(self, sentences: list[Sentence]) -> list[Encoded]:
        budget = self.spec.max_length - self.layout.single_overhead
        if budget < 1:
            raise ValueError(f"max_length {self.spec.max_length} leaves no room for the text after the "
                             f"{self.layout.single_overhead} special tokens")
        out = []
        for s_index, sentence in enumerate(sentences):
            text = text_ids(self.tokenizer, sentence)
            ids = self.layout.lead + text[:budget] + self.layout.single_suffix
            types = [self.layout.type_a] * len(ids) if self.layout.uses_token_types else None
            # position 0: unused by the head (it reads the text as a whole), kept for the shared collate
            out.append(Encoded(ids, s_index, [0], [0], [gold_index(self.label_index, sentence)], types,
                               trimmed_context=len(text) > budget))
        return out

    def _logits(self, model, batch) -> torch.Tensor:
        return model(**model_inputs(batch)).logits  # [texts, n_labels]: one labelled unit per row
