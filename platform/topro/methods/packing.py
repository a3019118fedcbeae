"""Packed ToPro: one model input per sentence (or per window of it) instead of one per word.

``prompt_packing: sentence`` lays a sentence's questions out in one row::

    prefix sentence middle | q_1 suffix | q_2 suffix | ... | q_k suffix

(BERT: ``[CLS] sentence [SEP] q_1 [SEP] q_2 [SEP] ...``) with a block attention
mask: the sentence part sees only itself, the tokens of question i see the
sentence part and question i, never another question. Each question block
takes the position ids and token types it has in the single-prompt layout
(``prefix sentence middle q_i suffix``), so every question "sits right after
the sentence" as in ToPro, and a row's length is bounded by
``max_packed_length``, not by the model's position embeddings. A sentence
costs about sentence + n x question tokens instead of n x (sentence +
question).

This is a different computation from per-word ToPro (the sentence no longer
sees which word is asked), so a model is trained and served in one mode;
``topro.json`` records it. The mask is a 4-D tensor passed to the encoder
(boolean for SDPA, additive for eager attention), which transformers' BERT
and XLM-R models use as given.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from topro.data.readers import Sentence
from topro.methods.base import Encoded, PairLayout, collate_common

log = logging.getLogger(__name__)

PACKINGS = ("per_word", "sentence")
SENTENCE_BLOCK = 0
PAD_BLOCK = -1


@dataclass
class PackedEncoded(Encoded):
    """A packed row: ``blocks`` says which part each token belongs to (0: the sentence part, i: question i)."""

    position_ids: list[int] | None = None
    """Each token's position in its single-prompt layout (0-based; the model's offset is added later)."""
    blocks: list[int] | None = None

    @property
    def batch_units(self) -> int:
        return len(self.words)


def check_packing(packing: str, method: str) -> str:
    if packing not in PACKINGS:
        raise ValueError(f"prompt_packing must be one of {list(PACKINGS)}, got {packing!r}")
    return packing


def fit_questions(sentence: Sentence, pieces: list[list[int]], questions: list[list[int]], limit: int,
                  question_ids: Callable[[Sentence, list[list[int]]], list[list[int]]], tokenizer,
                  mask_id: int) -> list[list[int]]:
    """Questions no longer than ``limit`` tokens: a question made too long by its word (a URL, a very
    long token) is rebuilt with the word cut to the longest prefix that fits, with a warning naming it.
    Never an input longer than ``max_length`` (and so the model's position embeddings)."""
    from topro.methods.base import word_pieces

    out = list(questions)
    for w, question in enumerate(questions):
        if len(question) <= limit:
            continue
        word = sentence.words[w]

        def shortened(n_chars: int) -> list[int]:
            cut = word[:n_chars]
            one = Sentence([cut], [sentence.tags[w]] if sentence.tags else [], sentence.lang, sentence.source)
            return question_ids(one, word_pieces(tokenizer, [cut]))[0]

        lo, hi = 0, len(word)  # the longest prefix length whose question fits: binary search
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(shortened(mid)) <= limit:
                lo = mid
            else:
                hi = mid - 1
        fitted = shortened(lo)
        if len(fitted) > limit or mask_id not in fitted:
            raise ValueError(f"the question about word {word[:60]!r} ({sentence.source or 'sentence'}) needs "
                             f"{len(fitted)} tokens even with the word cut to nothing, more than max_length "
                             f"allows ({limit} after the special tokens); raise max_length or use a shorter "
                             "template")
        log.warning("word %r (%s) makes a question of %d tokens, more than max_length allows (%d); "
                    "the question holds it cut to %r", word[:60], sentence.source or "sentence", len(question),
                    limit, word[:lo])
        out[w] = fitted
    return out


def window(flat_len: int, span: tuple[int, int], budget: int) -> tuple[int, int]:
    """A ``budget``-token window of a ``flat_len``-token sentence, centred on ``span``."""
    if flat_len <= budget:
        return 0, flat_len
    centre = (span[0] + span[1]) // 2
    start = min(max(0, centre - budget // 2), flat_len - budget)
    return start, start + budget


def pack_sentence(s_index: int, sentence: Sentence, pieces: list[list[int]], questions: list[list[int]],
                  layout: PairLayout, mask_id: int, label_index: dict[str, int], max_length: int,
                  max_packed_length: int, max_questions: int | None = None) -> list[PackedEncoded]:
    """The rows of one sentence: consecutive words share a row while its sentence window (which every
    question's single-prompt layout must fit in ``max_length``) covers them all and the row stays within
    ``max_packed_length`` tokens (and holds at most ``max_questions`` questions). A long sentence thus
    becomes several rows, each holding its own window."""
    flat = [t for p in pieces for t in p]
    starts = [0]
    for p in pieces:
        starts.append(starts[-1] + len(p))
    head = len(layout.prefix) + len(layout.middle)
    suffix = layout.suffix

    def plan(group: list[int]) -> tuple[int, int] | None:
        """The sentence window of a row holding ``group``, or None if the group cannot share a row."""
        budget = max_length - layout.pair_overhead - max(len(questions[w]) for w in group)
        span = (starts[group[0]], starts[group[-1] + 1])
        lo, hi = window(len(flat), span, max(budget, 0))
        if max_questions is not None and len(group) > max_questions:
            return None
        if len(group) > 1 and (span[0] < lo or span[1] > hi):
            return None  # the window cannot hold every word of the group
        size = head + (hi - lo) + sum(len(questions[w]) + len(suffix) for w in group)
        if len(group) > 1 and size > max_packed_length:
            return None
        return lo, hi

    groups: list[tuple[list[int], tuple[int, int]]] = []
    group: list[int] = []
    planned: tuple[int, int] | None = None
    for w in range(len(questions)):
        trial = plan(group + [w])
        if trial is None:
            groups.append((group, planned))
            group, planned = [w], plan([w])
        else:
            group, planned = group + [w], trial
    if group:
        groups.append((group, planned))

    rows = []
    for words, (lo, hi) in groups:
        context = flat[lo:hi]
        ids = layout.prefix + context + layout.middle
        n_a = len(ids)
        positions, blocks = list(range(n_a)), [SENTENCE_BLOCK] * n_a
        types = [layout.type_a] * n_a
        mask_at = []
        for block, w in enumerate(words, start=1):
            part = questions[w] + suffix
            mask_at.append(len(ids) + questions[w].index(mask_id))
            ids += part
            positions += range(n_a, n_a + len(part))
            blocks += [block] * len(part)
            types += [layout.type_b] * len(part)
        labels = [label_index.get(sentence.tags[w], -100) if sentence.tags else -100 for w in words]
        rows.append(PackedEncoded(ids, s_index, list(words), mask_at, labels,
                                  types if layout.uses_token_types else None,
                                  trimmed_context=hi - lo < len(flat), position_ids=positions, blocks=blocks))
    return rows


def collate_packed(examples: list[PackedEncoded], layout: PairLayout) -> dict[str, torch.Tensor]:
    """``collate_common`` plus the rows' single-prompt position ids and block ids (padding: block -1)."""
    batch = collate_common(examples, layout)
    longest = batch["input_ids"].shape[1]
    positions = torch.zeros((len(examples), longest), dtype=torch.long)
    blocks = torch.full((len(examples), longest), PAD_BLOCK, dtype=torch.long)
    for row, e in enumerate(examples):
        positions[row, :e.length] = torch.tensor(e.position_ids, dtype=torch.long)
        blocks[row, :e.length] = torch.tensor(e.blocks, dtype=torch.long)
    batch["position_ids"] = positions
    batch["packing_blocks"] = blocks
    return batch


def block_visibility(blocks: torch.Tensor) -> torch.Tensor:
    """[B, L, L] booleans, True where query token q may attend to key token k.

    The sentence part (block 0) sees itself; question i sees the sentence part and question i; padding
    sees only itself (a query row with nothing visible would turn into NaN and poison the values).
    """
    q, k = blocks[:, :, None], blocks[:, None, :]
    visible = ((k == SENTENCE_BLOCK) | (k == q)) & (q != PAD_BLOCK) & (k != PAD_BLOCK)
    eye = torch.eye(blocks.shape[1], dtype=torch.bool, device=blocks.device)[None]
    return visible | (eye & (q == PAD_BLOCK))


def packed_attention_mask(model: torch.nn.Module, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 4-D mask [B, 1, L, L] of the packed rows, in the form the model's attention takes:
    booleans for SDPA (True = attend; keeps the fused kernels), additive floats for eager attention."""
    visible = block_visibility(blocks)[:, None]
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if implementation == "sdpa":
        return visible
    if implementation == "eager":
        return torch.zeros(visible.shape, dtype=dtype, device=blocks.device).masked_fill_(
            ~visible, torch.finfo(dtype).min)
    raise ValueError(f"prompt_packing=sentence needs sdpa or eager attention, not {implementation!r} "
                     f"({type(model).__name__})")


def position_offset(base: torch.nn.Module) -> int:
    """What the model adds to 0-based positions: RoBERTa/XLM-R count from ``padding_idx + 1``, BERT from 0."""
    padding_idx = getattr(getattr(base, "embeddings", None), "padding_idx", None)
    return padding_idx + 1 if padding_idx is not None else 0


def packed_inputs(base: torch.nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Keyword arguments of the encoder for a packed batch: 4-D mask and single-prompt positions."""
    inputs = {"attention_mask": packed_attention_mask(base, batch["packing_blocks"], dtype),
              "position_ids": batch["position_ids"] + position_offset(base)}
    if "token_type_ids" in batch:
        inputs["token_type_ids"] = batch["token_type_ids"]
    return inputs


def check_positions(model: torch.nn.Module, max_length: int) -> None:
    """Refuse a ``max_length`` the model's position embeddings cannot hold (ids past them would crash
    or, worse, index another row)."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    usable = limit - position_offset(base)
    if max_length > usable:
        raise ValueError(f"max_length={max_length} exceeds the {usable} positions of "
                         f"{getattr(config, '_name_or_path', '') or type(model).__name__}; "
                         f"set max_length <= {usable}")
