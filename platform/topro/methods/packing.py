"""Packed ToPro: one model input per sentence (or per window of it) instead of one per word.

``prompt_packing: sentence`` lays a sentence's questions out in one row::

    lead sentence middle | q_1 suffix | q_2 suffix | ... | q_k suffix

(BERT: ``[CLS] sentence [SEP] q_1 [SEP] q_2 [SEP] ...``) with a block attention
mask: the sentence part sees only itself, the tokens of question i see the
sentence part and question i, never another question. Each question block
takes the position ids and token types it has in the single-prompt layout
(``lead sentence middle q_i suffix``), so every question "sits right after
the sentence" as in ToPro, and a row's length is bounded by
``max_packed_length``, not by the model's position embeddings. A sentence
costs about sentence + n x question tokens instead of n x (sentence +
question).

This is a different computation from per-word ToPro (the sentence no longer
sees which word is asked), so a model is trained and served in one mode;
``topro.json`` records it.

Two ways to compute it, with the same values (``test_block_attention_equals_the_4d_mask``):
- fast (a packed method switches its SDPA encoder to it, ``enable_packed_attention``):
  the batch's real tokens run as one unpadded sequence and attention is computed
  block by block (``packed_block_attention``): each sentence part over itself,
  each question over its sentence part and itself. No compute goes to padding or
  to the question-question pairs the mask would discard.
- reference (eager attention, e.g. float64 checks): the padded rows with a 4-D
  mask (boolean for SDPA, additive for eager), which transformers' BERT and
  XLM-R models use as given.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

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
    word_blocks: list[int] | None = None
    """Sentence-part tokens: the block of the question about the word they belong to (0: none; question
    tokens 0 too), what ``packed_word_bias`` points each question at."""

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
    becomes several rows, each holding its own window. (Planning the groups and laying out their rows
    share the sentence's flattened pieces and offsets, hence one function.)"""
    flat = [t for p in pieces for t in p]
    starts = [0]
    for p in pieces:
        starts.append(starts[-1] + len(p))
    head = len(layout.lead) + len(layout.middle)
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

    owner = [w for w, p in enumerate(pieces) for _ in p]  # the word of each flat piece
    rows = []
    for words, (lo, hi) in groups:
        context = flat[lo:hi]
        ids = layout.lead + context + layout.middle
        n_a = len(ids)
        positions, blocks = list(range(n_a)), [SENTENCE_BLOCK] * n_a
        block_of = {w: block for block, w in enumerate(words, start=1)}
        word_blocks = ([0] * len(layout.lead) + [block_of.get(owner[j], 0) for j in range(lo, hi)]
                       + [0] * len(layout.middle))
        types = [layout.type_a] * n_a
        mask_at = []
        for block, w in enumerate(words, start=1):
            part = questions[w] + suffix
            mask_at.append(len(ids) + questions[w].index(mask_id))
            ids += part
            positions += range(n_a, n_a + len(part))
            blocks += [block] * len(part)
            word_blocks += [0] * len(part)
            types += [layout.type_b] * len(part)
        labels = [label_index.get(sentence.tags[w], -100) if sentence.tags else -100 for w in words]
        rows.append(PackedEncoded(ids, s_index, list(words), mask_at, labels,
                                  types if layout.uses_token_types else None,
                                  trimmed_context=hi - lo < len(flat), position_ids=positions, blocks=blocks,
                                  word_blocks=word_blocks))
    return rows


def collate_packed(examples: list[PackedEncoded], layout: PairLayout) -> dict[str, torch.Tensor]:
    """``collate_common`` plus the rows' single-prompt position ids, block ids (padding: block -1) and
    word blocks (padding: 0)."""
    batch = collate_common(examples, layout)
    longest = batch["input_ids"].shape[1]
    positions = torch.zeros((len(examples), longest), dtype=torch.long)
    blocks = torch.full((len(examples), longest), PAD_BLOCK, dtype=torch.long)
    word_blocks = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        positions[row, :e.length] = torch.tensor(e.position_ids, dtype=torch.long)
        blocks[row, :e.length] = torch.tensor(e.blocks, dtype=torch.long)
        word_blocks[row, :e.length] = torch.tensor(e.word_blocks, dtype=torch.long)
    batch["position_ids"] = positions
    batch["packing_blocks"] = blocks
    batch["packing_word_blocks"] = word_blocks
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


def packed_attention_mask(model: torch.nn.Module, blocks: torch.Tensor, dtype: torch.dtype,
                          word_blocks: torch.Tensor | None = None, word_bias: float = 0.0) -> torch.Tensor:
    """The 4-D mask [B, 1, L, L] of the packed rows, in the form the model's attention takes:
    booleans for SDPA (True = attend; keeps the fused kernels), additive floats for eager attention
    (and for SDPA with a ``word_bias``: ``word_bias`` added where a question token meets a token of its
    own word in the sentence part)."""
    visible = block_visibility(blocks)[:, None]
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if implementation not in ("sdpa", PACKED_ATTENTION, "eager"):
        raise ValueError(f"prompt_packing=sentence needs sdpa or eager attention, not {implementation!r} "
                         f"({type(model).__name__})")
    if implementation != "eager" and not word_bias:
        return visible
    mask = torch.zeros(visible.shape, dtype=dtype, device=blocks.device).masked_fill_(~visible,
                                                                                      torch.finfo(dtype).min)
    if word_bias:
        own_word = (blocks[:, :, None] > SENTENCE_BLOCK) & (word_blocks[:, None, :] == blocks[:, :, None])
        mask += word_bias * own_word[:, None].to(dtype)
    return mask


def position_offset(base: torch.nn.Module) -> int:
    """What the model adds to 0-based positions: RoBERTa/XLM-R count from ``padding_idx + 1``, BERT from 0."""
    padding_idx = getattr(getattr(base, "embeddings", None), "padding_idx", None)
    return padding_idx + 1 if padding_idx is not None else 0


@dataclass
class BlockLayout:
    """Where each part of a packed batch sits, as flat token indices into the batch's ``B * L`` tokens.

    Padding slots of ``*_index`` point at token 0 and are dropped by ``*_keep``."""

    sentence_index: torch.Tensor
    """[B, S]: the sentence part of each row (S: the longest)."""
    sentence_keep: torch.Tensor
    question_index: torch.Tensor
    """[N, Q]: each question block of the batch (N blocks, Q: the longest)."""
    question_keep: torch.Tensor
    question_row: torch.Tensor
    """[N]: the row each question block belongs to."""
    question_block: torch.Tensor
    """[N]: each question block's number in its row (1, 2, ...)."""

    def question_keys(self, word_blocks: torch.Tensor | None = None, word_bias: float = 0.0,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, S + Q] indices of what each question block attends to: its row's sentence part, then itself
        (one gather per layer instead of a gather and a concatenation), and which of them it sees:
        booleans; with a ``word_bias``, additive floats that add it at the tokens of the block's own word
        (``word_blocks``: each token's word block, flat, in the coordinates of ``sentence_index``)."""
        sentence_index, sentence_keep = self.sentence_index[self.question_row], self.sentence_keep[self.question_row]
        index = torch.cat([sentence_index, self.question_index], dim=1)
        keep = torch.cat([sentence_keep, self.question_keep], dim=1)
        if not word_bias:
            return index, keep
        own = sentence_keep & (word_blocks[sentence_index] == self.question_block[:, None])
        own = torch.cat([own, torch.zeros_like(self.question_keep)], dim=1)
        mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)
        return index, mask + word_bias * own.to(dtype)


def block_layout(blocks: torch.Tensor) -> BlockLayout:
    """The ``BlockLayout`` of packed rows from their block ids (0: sentence part, i: question i, -1: padding;
    the sentence part first and each block contiguous, as ``pack_sentence`` lays them out)."""
    n_rows, length = blocks.shape
    device = blocks.device
    n_sentence = (blocks == SENTENCE_BLOCK).sum(dim=1)
    span = torch.arange(int(n_sentence.max()), device=device)
    sentence_keep = span[None] < n_sentence[:, None]
    rows = torch.arange(n_rows, device=device)[:, None]
    sentence_index = torch.where(sentence_keep, rows * length + span[None], 0)
    row, col = (blocks > SENTENCE_BLOCK).nonzero(as_tuple=True)  # row-major: blocks in order
    key = row * (length + 1) + blocks[row, col]
    starts = torch.ones_like(key, dtype=torch.bool)
    starts[1:] = key[1:] != key[:-1]
    group = starts.cumsum(0) - 1
    first = starts.nonzero().squeeze(1)
    offset = torch.arange(len(key), device=device) - first[group]
    n_blocks, longest = len(first), int(offset.max()) + 1 if len(key) else 0
    question_index = torch.zeros((n_blocks, longest), dtype=torch.long, device=device)
    question_keep = torch.zeros((n_blocks, longest), dtype=torch.bool, device=device)
    question_index[group, offset] = row * length + col
    question_keep[group, offset] = True
    return BlockLayout(sentence_index, sentence_keep, question_index, question_keep, row[first],
                       blocks[row[first], col[first]])


PACKED_ATTENTION = "topro_packed"
LAYOUT_KWARG = "packed_layout"
KEYS_KWARG = "packed_question_keys"


def packed_block_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs):
    """Attention of packed rows computed block by block, never the masked-out question-question pairs.

    The sentence parts attend to themselves ([B, S] x [B, S]); every question block attends to its row's
    sentence part and itself ([N, Q] x [N, S + Q]), one batched SDPA call each. The same values as the
    4-D mask (``packed_attention_mask``) at a cost of about S^2 + n x Q x (S + Q) per row instead of
    (S + n x Q)^2, and no [B, L, L] mask. Padding tokens get a zero output (nothing reads them). Without
    a ``packed_layout`` keyword it is plain SDPA, so the same model serves packed and unpacked calls.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout: BlockLayout | None = kwargs.pop(LAYOUT_KWARG, None)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    n_rows, n_heads, length, head_dim = query.shape
    flat_q, flat_k, flat_v = (x.transpose(1, 2).reshape(n_rows * length, n_heads, x.shape[-1])
                              for x in (query, key, value))

    # index_select / index_copy rather than advanced indexing: their backward is index_add / index_select,
    # where indexing's is an accumulating index_put (the slowest op of a packed step on CPU, profiled).
    def take(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # [n, m] -> [n, heads, m, dim]
        return flat.index_select(0, index.reshape(-1)).view(*index.shape, *flat.shape[1:]).transpose(1, 2)

    def kept(out: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # [n, heads, m, dim] -> [kept, heads, dim]
        return out.transpose(1, 2).reshape(-1, *out.shape[1:2], out.shape[-1]).index_select(
            0, keep.reshape(-1).nonzero().squeeze(1))

    s_key, s_value = take(flat_k, layout.sentence_index), take(flat_v, layout.sentence_index)
    s_out = F.scaled_dot_product_attention(take(flat_q, layout.sentence_index), s_key, s_value,
                                           attn_mask=layout.sentence_keep[:, None, None, :], dropout_p=dropout,
                                           scale=scaling)
    q_index, q_visible = kwargs.pop(KEYS_KWARG, None) or layout.question_keys()
    if q_visible.is_floating_point():  # a word bias: additive, in the attention's own dtype
        q_visible = q_visible.to(query.dtype)
    q_out = F.scaled_dot_product_attention(take(flat_q, layout.question_index), take(flat_k, q_index),
                                           take(flat_v, q_index),
                                           attn_mask=q_visible[:, None, None, :], dropout_p=dropout, scale=scaling)
    out = flat_q.new_zeros((n_rows * length, n_heads, value.shape[-1]))
    out = out.index_copy(0, layout.sentence_index[layout.sentence_keep], kept(s_out, layout.sentence_keep))
    out = out.index_copy(0, layout.question_index[layout.question_keep], kept(q_out, layout.question_keep))
    return out.reshape(n_rows, length, n_heads, -1), None


def packed_mask(*args, **kwargs):
    """transformers' SDPA mask, skipped where nothing is padded (a packed batch is one unpadded sequence):
    otherwise it builds a [1, 1, T, T] mask over all T tokens of the batch that the layout never reads."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **{**kwargs, "allow_is_bidirectional_skip": True})


def enable_packed_attention(base: torch.nn.Module) -> torch.nn.Module:
    """Switch an SDPA encoder (BERT, XLM-R, ... using transformers' attention interface) to
    ``packed_block_attention``. An eager model (float64 reference runs) keeps the 4-D mask path."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if getattr(base.config, "_attn_implementation", None) not in ("sdpa", PACKED_ATTENTION):
        return base
    AttentionInterface.register(PACKED_ATTENTION, packed_block_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, packed_mask)
    base.set_attn_implementation(PACKED_ATTENTION)
    return base


def packed_hidden(base: torch.nn.Module, batch: dict[str, torch.Tensor], inputs: torch.Tensor,
                  word_bias: float = 0.0) -> torch.Tensor:
    """The encoder's last hidden states at a packed batch's mask positions, [labelled words, hidden].

    ``inputs`` are the batch's token ids [B, L] or input embeddings [B, L, hidden]. ``word_bias``
    (``packed_word_bias``): added to the attention scores of each question token at the sentence tokens of
    its own word, pointing the question at the word it asks about. A model switched by
    ``enable_packed_attention`` runs the batch's real tokens as one unpadded sequence (rows laid end to
    end; the block layout keeps them apart), so no compute goes to padding; otherwise (eager attention,
    the reference path) the padded rows run with the 4-D mask."""
    blocks = batch["packing_blocks"]
    n_rows, length = blocks.shape
    positions = batch["position_ids"] + position_offset(base)
    types = batch.get("token_type_ids")
    key = "input_ids" if inputs.dtype == torch.long else "inputs_embeds"
    word_blocks = batch.get("packing_word_blocks")
    if word_bias and word_blocks is None:
        raise ValueError("packed_word_bias needs the batch's packing_word_blocks (collate_packed makes them)")
    dtype = base.get_input_embeddings().weight.dtype
    if getattr(base.config, "_attn_implementation", None) != PACKED_ATTENTION:
        kwargs = {key: inputs, "position_ids": positions,
                  "attention_mask": packed_attention_mask(base, blocks, dtype, word_blocks, word_bias)}
        if types is not None:
            kwargs["token_type_ids"] = types
        return base(**kwargs).last_hidden_state[batch["label_rows"], batch["label_positions"]]
    real = (blocks != PAD_BLOCK).flatten().nonzero().squeeze(1)  # flat [B * L] index of each real token
    moved = torch.zeros(n_rows * length, dtype=torch.long, device=blocks.device)
    moved[real] = torch.arange(len(real), device=blocks.device)  # its place in the unpadded sequence
    layout = block_layout(blocks)
    layout.sentence_index, layout.question_index = moved[layout.sentence_index], moved[layout.question_index]
    flat_word_blocks = word_blocks.flatten()[real] if word_bias else None
    kwargs = {key: inputs.flatten(0, 1)[real][None], "position_ids": positions.flatten()[real][None],
              LAYOUT_KWARG: layout,  # the question keys computed once, not per layer
              KEYS_KWARG: layout.question_keys(flat_word_blocks, word_bias, dtype)}
    if types is not None:
        kwargs["token_type_ids"] = types.flatten()[real][None]
    hidden = base(**kwargs).last_hidden_state[0]
    return hidden[moved[batch["label_rows"] * length + batch["label_positions"]]]


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
