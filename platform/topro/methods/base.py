"""The method protocol and the encoding helpers that methods share (Ray-free).

A method turns sentences into model inputs (``Encoded`` examples), batches
them, computes a training loss, and returns per-word label log-probabilities.
Training and evaluation only talk to this protocol, never to a method's name.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from topro.data.readers import Sentence

log = logging.getLogger(__name__)

META_FILE = "topro.json"


@dataclass
class Encoded:
    """One model input and the words it labels."""

    input_ids: list[int]
    sentence: int
    """Index of the sentence in the encoded list."""
    words: list[int]
    """Indices (in that sentence) of the words this example labels."""
    positions: list[int]
    """Token position that carries each labelled word's prediction."""
    labels: list[int]
    """Gold label index of each labelled word (-100 when unknown)."""
    token_type_ids: list[int] | None = None
    truncated_words: int = 0
    """Words of this sentence that got no prediction because of ``max_length`` (vanilla)."""
    trimmed_context: bool = False
    """ToPro: the sentence context was trimmed to fit ``max_length``."""

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def batch_units(self) -> int:
        """What this example counts towards ``batch_size`` (1; a packed ToPro row: its questions)."""
        return 1


class Method(Protocol):
    """What training, evaluation and serving need from a method."""

    name: str
    labels: list[str]
    tokenizer: Any

    def build_model(self, model_path: str) -> torch.nn.Module:
        """A trainable model initialised from a pretrained folder or id."""

    def load_model(self, checkpoint: str | Path) -> torch.nn.Module:
        """The model saved by ``save`` in ``checkpoint``."""

    def encode(self, sentences: list[Sentence]) -> list[Encoded]: ...

    def collate(self, examples: list[Encoded]) -> dict[str, torch.Tensor]: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def label_log_probs(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[labelled words in batch order, n_labels] log-probabilities over the label set."""

    def meta(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this method (written to ``topro.json``)."""

    def save(self, model: torch.nn.Module, folder: str | Path) -> None: ...


@dataclass
class PairLayout:
    """Where a tokenizer puts its special tokens around a segment pair.

    Read off one probe encoding, so any tokenizer (BERT, XLM-R, T5, ...) works
    without per-family code: ``lead A middle B suffix``.
    """

    lead: list[int]
    """Special tokens before the first segment (``[CLS]``, ``<s>``; none for T5)."""
    middle: list[int]
    suffix: list[int]
    single_suffix: list[int]
    """Suffix after a single segment (``lead A single_suffix``)."""
    type_a: int = 0
    type_b: int = 1
    uses_token_types: bool = False
    pad_id: int = 0

    @property
    def pair_overhead(self) -> int:
        return len(self.lead) + len(self.middle) + len(self.suffix)

    @property
    def single_overhead(self) -> int:
        return len(self.lead) + len(self.single_suffix)


def pair_layout(tokenizer) -> PairLayout:
    a = tokenizer("a", add_special_tokens=False)["input_ids"]
    b = tokenizer("b", add_special_tokens=False)["input_ids"]
    pair = tokenizer("a", "b")
    ids = pair["input_ids"]
    i = _find(ids, a, 0)
    j = _find(ids, b, i + len(a))
    single = tokenizer("a")["input_ids"]
    k = _find(single, a, 0)
    types = pair.get("token_type_ids")
    uses_types = "token_type_ids" in tokenizer.model_input_names
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return PairLayout(lead=ids[:i], middle=ids[i + len(a):j], suffix=ids[j + len(b):],
                      single_suffix=single[k + len(a):],
                      type_a=types[i] if types else 0, type_b=types[j] if types else 0,
                      uses_token_types=uses_types, pad_id=pad)


def _find(seq: list[int], sub: list[int], start: int) -> int:
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    raise ValueError(f"cannot locate {sub} in {seq}: unsupported tokenizer special-token layout")


def word_pieces(tokenizer, words: list[str]) -> list[list[int]]:
    """Subword ids of each word (a word the tokenizer drops becomes ``unk``, so no word vanishes)."""
    enc = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
    pieces: list[list[int]] = [[] for _ in words]
    for token_id, word_id in zip(enc["input_ids"], enc.word_ids()):
        if word_id is not None:
            pieces[word_id].append(token_id)
    unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    return [p if p else [unk] for p in pieces]


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask


def collate_common(examples: list[Encoded], layout: PairLayout) -> dict[str, torch.Tensor]:
    """Padded inputs plus flat (row, position, label) triples of every labelled word."""
    input_ids, attention_mask = pad_batch([e.input_ids for e in examples], layout.pad_id)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if layout.uses_token_types:
        types, _ = pad_batch([e.token_type_ids or [0] * e.length for e in examples], 0)
        batch["token_type_ids"] = types
    rows = [r for r, e in enumerate(examples) for _ in e.positions]
    batch["label_rows"] = torch.tensor(rows, dtype=torch.long)
    batch["label_positions"] = torch.tensor([p for e in examples for p in e.positions], dtype=torch.long)
    batch["labels"] = torch.tensor([l for e in examples for l in e.labels], dtype=torch.long)
    return batch


def scores_dtype(logits: torch.Tensor) -> torch.Tensor:
    """Logits in the precision scores are taken in: float32 at least (bf16/fp16 logits are upcast), float64
    kept as it is (the fp64 reference evaluation)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def seen_label_logits(logits: torch.Tensor, unseen_index: torch.Tensor) -> torch.Tensor:
    """Label logits [N, n_labels] with the unseen labels' columns at -inf: they leave the training softmax
    (probability 0, no gradient) while the seen labels keep their logits."""
    if not len(unseen_index):
        return logits
    return logits.index_fill(-1, unseen_index.to(logits.device), float("-inf"))


def hide_unseen_gold(examples: list[Encoded], unseen_index: list[int]) -> tuple[list[Encoded], int]:
    """Training examples with every gold label in ``unseen_index`` set to -100 (no loss), and those left with
    no labelled word dropped (a batch of them only would have no loss at all); also the number of words hidden."""
    if not unseen_index:
        return examples, 0
    hidden_labels = set(unseen_index)
    kept, hidden = [], 0
    for e in examples:
        labels = [-100 if label in hidden_labels else label for label in e.labels]
        hidden += sum(label in hidden_labels for label in e.labels)
        if any(label != -100 for label in labels):
            e.labels = labels
            kept.append(e)
    return kept, hidden


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of ``model``; a tied (shared) weight counts once."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def label_token_ids(tokenizer, words: list[str], policy: str) -> list[int]:
    """One vocabulary id per label word, checked at start-up.

    ``strict``: every label word must be a single token. ``first_subword``: a
    multi-token word is represented by its first subword (logged); the chosen
    ids must all differ and none may be the unknown token.
    """
    name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    ids, multi = [], {}
    for word in words:
        pieces = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if not pieces:
            raise ValueError(f"label word {word!r} encodes to no token with tokenizer {name}")
        # A lone word-start marker then a piece ("▁", "ness") is two tokens: the
        # word itself is not in the vocabulary (its first real subword is the piece).
        content = [p for p in pieces if tokenizer.convert_ids_to_tokens(p) not in ("▁", "Ġ", "")] or pieces
        if len(pieces) > 1:
            if policy == "strict":
                raise ValueError(f"label word {word!r} is {len(pieces)} tokens "
                                 f"{tokenizer.convert_ids_to_tokens(pieces)} with tokenizer {name}; "
                                 "choose a single-token word or set label_word_policy=first_subword")
            multi[word] = tokenizer.convert_ids_to_tokens(pieces)
        if content[0] == tokenizer.unk_token_id:
            raise ValueError(f"label word {word!r} is unknown to tokenizer {name}")
        ids.append(content[0])
    if multi:
        log.warning("label words scored by their first subword (tokenizer %s): %s", name, multi)
    if len(set(ids)) != len(ids):
        clash = [w for w, i in zip(words, ids) if ids.count(i) > 1]
        raise ValueError(f"label words {clash} share a first subword with tokenizer {name}; "
                         "pick distinct label words")
    return ids


@dataclass
class MethodSpec:
    """Everything needed to construct a method (also stored in checkpoints' ``topro.json``).

    The fields after ``max_length`` are method-specific settings; a method reads only its own and the
    others keep their defaults. Checkpoints written before these were typed keep them in an ``extra``
    dict, which ``from_meta`` still reads.
    """

    method: str
    task: str
    labels: list[str]
    base_model: str
    template: str | None = None
    """The ToPro question template (ToPro and soft ToPro; ``None`` for methods that use none)."""
    verbalizer: str | None = None
    llm_format: str = "topro"
    """ToPro on a causal LM: the eval-llm prompt format it trains (``prompts/llm_formats/``)."""
    answer_end_scored: str = "always"
    """ToPro on a causal LM: score the format's answer end after each label ``always``, ``when_needed`` (only
    when the label words' tokenizations are not prefix-free) or ``per_answer`` (after the words that start
    another only)."""
    label_word_policy: str = "strict"
    max_length: int = 128
    base_model_path: str | None = None
    """The folder the backbone was loaded from when training (trained-only checkpoints look for it first)."""
    mlm_head_untrained: bool = False
    """The pretrained checkpoint had no masked-LM head (its scores get a footnote)."""
    long_sentences: str = "window"
    """Vanilla: ``window`` (overlapping windows, every word labelled) or ``truncate`` (cut at ``max_length``)."""
    window_stride: int | None = None
    """Vanilla: tokens consecutive windows share (``None``: half the window)."""
    prompt_packing: str = "per_word"
    """ToPro (masked LM): ``per_word`` (one prompt per word) or ``sentence`` (one packed row per sentence)."""
    max_packed_length: int = 512
    """ToPro packed: the longest packed row in tokens."""
    max_questions_per_row: int | None = None
    """ToPro packed: at most this many questions in one row (``None``: as many as fit)."""
    packed_word_bias: float = 0.0
    """ToPro packed: added to a question's attention scores at its own word's tokens in the sentence."""
    prefix_length: int = 16
    """Prompt-Tuning: trainable prefix positions per layer; soft ToPro: trainable prompt vectors."""
    prefix_dropout: float = 0.1
    """Prompt-Tuning: dropout on the prefix keys/values."""
    freeze_backbone: bool = True
    """Soft ToPro: train only the prompt (and any fresh head) rather than the whole model with it."""
    soft_prompt_placement: str = "replace"
    """Soft ToPro: ``replace`` the template's text with soft vectors or put them in front (``prefix``)."""
    label_subword: str = "auto"
    """Vanilla and Prompt-Tuning: the subword whose hidden state labels a word, ``first`` or ``last``
    (``auto``, resolved when the method is built: last for decoder-only LMs, first for encoders)."""
    adapter: str = "none"
    """``lora``: the backbone is frozen and low-rank adapters train (``methods/lora.py``); ``none``."""
    lora_r: int = 8
    """LoRA: rank of the adapters."""
    lora_alpha: float = 16.0
    """LoRA: scale numerator (the update is ``lora_alpha / lora_r * B A``)."""
    lora_dropout: float = 0.0
    """LoRA: dropout on the adapters' input."""
    lora_targets: list[str] | None = None
    """LoRA: module names adapted (``None``: PEFT's default for the architecture, its attention query and value)."""
    verbalizer_expansion: str = "none"
    """RoSPrompt: ``none`` (the verbalizer's seed words) or ``knn`` (each label's ``knn_k`` nearest tokens)."""
    knn_k: int = 8
    """RoSPrompt ``knn``: tokens per label."""
    knn_aggregate: str = "mean"
    """RoSPrompt: how a label's word logits become its score (``mean``, ``max``, ``logsumexp``)."""
    label_smoothing: float = 0.0
    """RoSPrompt: smoothing mass taken from the gold label."""
    label_smoothing_kind: str = "contrastive"
    """RoSPrompt: ``uniform`` or ``contrastive`` (by label-word similarity)."""
    label_smoothing_temperature: float = 0.1
    """RoSPrompt contrastive smoothing: softmax temperature over label similarities."""
    prompt_drift_penalty: float = 0.0
    """RoSPrompt: weight of the soft prompt's relative squared drift from its initialisation."""
    label_token_sets: list[list[int]] | None = None
    """RoSPrompt: each label's scored token ids as trained (checkpoints record them; ``None``: choose them)."""
    unseen_labels: list[str] = field(default_factory=list)
    """Labels held out of training (expanded: ``B-LOC``, ``I-LOC``, never a bare type); they leave the training
    softmax (``seen_label_logits``) and evaluation reports seen / unseen scores."""

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "MethodSpec":
        """The spec a checkpoint's ``topro.json`` records (old ones: settings under ``extra``)."""
        known = cls.__dataclass_fields__
        flat = {**(meta.get("extra") or {}), **{k: v for k, v in meta.items() if k != "extra"}}
        return cls(**{k: v for k, v in flat.items() if k in known})

    def meta(self) -> dict[str, Any]:
        """What ``topro.json`` records of this spec."""
        return dict(self.__dict__)
