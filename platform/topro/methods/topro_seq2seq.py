"""ToPro for seq2seq LMs (mT5 family): the prompt is the encoder input, the label word the target.

Prediction scores every label's full sequence log-likelihood (label tokens and
end-of-sequence) under teacher forcing, so every prediction is a valid tag;
the published code generated free text and matched strings instead.
"""
from __future__ import annotations

from typing import Any

import torch

from topro.data.readers import Sentence
from topro.methods.base import Encoded, MethodSpec, pad_batch, scores_dtype, word_pieces
from topro.methods.topro_mlm import context_window
from topro.methods.whole_model import WholeModelMethod
from topro.prompts import get_template, get_verbalizer, topro_questions

SENTINEL = "<extra_id_0>"


class ToProSeq2Seq(WholeModelMethod):
    name = "topro"
    auto_class = "AutoModelForSeq2SeqLM"

    def __init__(self, spec: MethodSpec, tokenizer):
        super().__init__(spec, tokenizer)
        self.template = get_template(spec.task, spec.template)
        self.verbalizer = get_verbalizer(spec.task, spec.verbalizer)
        self.label_words = self.verbalizer.word_list(self.labels)
        # T5's span sentinel marks the slot to fill; tokenizers without one leave a blank slot.
        vocab = tokenizer.get_vocab()
        self.slot = SENTINEL if SENTINEL in vocab else "_"
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.targets = [tokenizer(w, add_special_tokens=False)["input_ids"] + eos for w in self.label_words]
        if len({tuple(t) for t in self.targets}) != len(self.targets):
            raise ValueError(f"label words {self.label_words} do not tokenize to distinct sequences")

    def encode(self, sentences: list[Sentence]) -> list[Encoded]:
        layout = self.layout
        out = []
        for s_index, sentence in enumerate(sentences):
            pieces = word_pieces(self.tokenizer, sentence.words)
            questions = self.tokenizer(topro_questions(self.template, sentence.words, self.slot),
                                       add_special_tokens=False)["input_ids"]
            for w_index, question in enumerate(questions):
                budget = self.spec.max_length - layout.pair_overhead - len(question)
                context, trimmed = context_window(pieces, w_index, budget)
                ids = layout.lead + context + layout.middle + question + layout.suffix
                tag = sentence.tags[w_index] if sentence.tags else None
                out.append(Encoded(ids, s_index, [w_index], [0], [self.label_index.get(tag, -100)],
                                   trimmed_context=trimmed))
        return out

    def collate(self, examples: list[Encoded]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_batch([e.input_ids for e in examples], self.layout.pad_id)
        labels = torch.tensor([e.labels[0] for e in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _target_batch(self, label_indices: list[int]) -> torch.Tensor:
        targets, _ = pad_batch([self.targets[i] for i in label_indices], -100)
        return targets

    def loss(self, model, batch) -> torch.Tensor:
        keep = batch["labels"] >= 0
        targets = self._target_batch(batch["labels"][keep].tolist()).to(batch["input_ids"].device)
        out = model(input_ids=batch["input_ids"][keep], attention_mask=batch["attention_mask"][keep],
                    labels=targets)
        return out.loss

    def label_log_probs(self, model, batch, max_logit_floats: int = 16_000_000) -> torch.Tensor:
        """Encode each prompt once; score every label's sequence against the
        same encoder output (no copy per label), a label and a group of
        prompts at a time, so at most `max_logit_floats` logits exist at once
        (mT5's 250k vocabulary: 17 labels x 64 prompts x 4 steps of full
        logits would be ~4 GB, twice with a log-softmax copy). Only the target
        tokens' log-probabilities are kept: logit minus logsumexp."""
        n, n_labels = batch["input_ids"].shape[0], len(self.labels)
        encoder = model.get_encoder()
        enc = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        targets = self._target_batch(list(range(n_labels))).to(enc.device)  # [L, T]
        vocab = int(model.config.vocab_size)
        rows = max(1, max_logit_floats // max(1, targets.shape[1] * vocab))
        seq_lp = torch.zeros(n, n_labels, device=enc.device, dtype=scores_dtype(enc).dtype)
        for j in range(n_labels):
            target = targets[j][targets[j] != -100]  # this label's tokens, EOS included
            for start in range(0, n, rows):
                stop = min(n, start + rows)
                labels = target.expand(stop - start, -1)
                # Decoder inputs rather than labels=: no loss over the full logits (another vocabulary-sized copy).
                out = model(encoder_outputs=(enc[start:stop],), attention_mask=batch["attention_mask"][start:stop],
                            decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=labels))
                logits = scores_dtype(out.logits)  # [rows, T_j, V]
                picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
                seq_lp[start:stop, j] = (picked - torch.logsumexp(logits, dim=-1)).sum(-1)
                del out, logits
        return torch.log_softmax(seq_lp, dim=-1)  # a distribution over the label set

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "label_words": self.label_words, "architecture": "seq2seq"}
