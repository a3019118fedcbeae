"""Rank candidate label words by log-likelihood under a language model.

A ToPro sentence of n words becomes n prompts that share everything but the
last line: `prefix` (instruction + demonstrations + sentence), one `question`
per word, and the same `labels` (label words) after every question. The score
of label j for word i is log p(label_j | prefix + question_i), the sum over the
label's tokens.

Two implementations of the same numbers:

- `score_naive`: every (question, label) prompt runs through the model in
  full, batched with right padding; the logits are read at each prompt's own
  positions (the published code read them at a pad position).
- `score_shared`: the run's context (instruction + demonstrations) is
  encoded once and its key/value cache reused for every sentence. Then one
  forward with a batch of one runs the sentence, every question and every
  label as a tree (`score_shared`; `score_shared_many` packs several
  sentences' trees into one forward): the sequence holds the sentence tokens, then per question
  its tokens followed by each label's tokens (all but the last, which is only
  predicted); a 4-D attention mask lets each token see only its ancestors (a
  label sees the prefix, its own question and its own earlier tokens, never
  another question or label) and explicit position ids place every label
  right after its question. Each token of the tree runs once; the questions'
  common leading tokens ("Part-of-speech tag of the word") join the prefix.
  On a CPU a forward over a few tokens costs about as much as reading the
  weights once, so one forward per sentence matters as much as the tokens.

Both compute logits only at the positions that predict a label token (the
output layer of a 262k-vocabulary model costs more than its body per token),
so a speed comparison between them measures the prefix sharing alone.

Token ids are concatenated, never re-tokenized: `prefix + question + label`
means the concatenation of the three id lists, identical in both methods.
Sliding-window layers (Gemma 2/3) get a windowed mask built from the real
positions, so prompts longer than the window give the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = [
    "TokenCounts",
    "SharedPrefixCache",
    "encode_shared_prefix",
    "ScoringItem",
    "score_shared",
    "score_shared_many",
    "score_naive",
    "score_seq2seq_shared",
    "score_seq2seq_naive",
    "normalise",
    "takes_tree_masks",
    "PromptTree",
    "tree_visibility",
    "score_dtype",
]

@dataclass
class TokenCounts:
    """Work done by the model: `tokens` real (non-pad) token positions run
    through it, `padded` positions including padding, `forwards` calls."""

    tokens: int = 0
    padded: int = 0
    forwards: int = 0

    def add(self, tokens: int, padded: int) -> None:
        self.tokens += tokens
        self.padded += padded
        self.forwards += 1

    def merge(self, other: "TokenCounts") -> None:
        self.tokens += other.tokens
        self.padded += other.padded
        self.forwards += other.forwards


@dataclass
class SharedPrefixCache:
    """The key/value cache of a prefix run once (batch of one, no padding)."""

    ids: list[int]
    keys: list[torch.Tensor]  # per layer: [1, kv_heads, len, head_dim]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return len(self.ids)

    def without_last(self) -> tuple["SharedPrefixCache", int]:
        """The state one token shorter, and that token: used when a question is
        empty, so the first label token is predicted from a question position."""
        return (SharedPrefixCache(self.ids[:-1], [k[:, :, :-1] for k in self.keys],
                            [v[:, :, :-1] for v in self.values]), self.ids[-1])

    def cache(self, batch: int):
        """A fresh DynamicCache holding this prefix for `batch` rows (the
        forward appends to it, so each call gets its own)."""
        from transformers import DynamicCache

        # No config: every layer keeps all positions, and our own masks apply
        # the sliding windows (a sliding cache layer would drop prefix keys).
        return DynamicCache(ddp_cache_data=[
            (k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
            for k, v in zip(self.keys, self.values)])


# Families whose position information is an attention bias computed from the
# 2-D padding mask (ALiBi), not from position ids: they cannot take the tree's
# 4-D mask and explicit positions.
ALIBI_MODEL_TYPES = ("bloom", "mpt", "baichuan")


def takes_tree_masks(config) -> bool:
    """Whether a causal LM can run shared-prefix scoring and generation (4-D
    masks with explicit position ids). Not ALiBi models: BLOOM/BLOOMZ, MPT,
    Falcon with alibi=True."""
    if getattr(config, "model_type", "") in ALIBI_MODEL_TYPES:
        return False
    return not (getattr(config, "alibi", False) or getattr(config, "position_embedding_type", "") == "alibi")


def score_dtype(model) -> torch.dtype:
    """The precision label scores are summed in: float64 for a float64 model (reference checks), else float32."""
    return torch.float64 if model.dtype == torch.float64 else torch.float32


def score_precision(logits: torch.Tensor) -> torch.Tensor:
    """Logits upcast to at least float32; float64 kept (the fp64 reference checks compare to 1e-6)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _check_model(model) -> None:
    if not takes_tree_masks(model.config):
        raise ValueError(f"{type(model).__name__} uses ALiBi position biases built from a 2-D mask; shared-prefix "
                         "scoring cannot pass it a tree mask: use score_naive (HFBackend falls back by itself)")
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in (None, "sdpa", "eager"):
        raise ValueError(
            f"shared-prefix scoring passes explicit 4-D attention masks, which attn_implementation="
            f"{impl!r} does not take; load the model with attn_implementation='sdpa' or 'eager'")


def _window_by_layer_type(config) -> dict[str, int | None]:
    """Attention window of each layer type (None: full attention)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not types:
        if window and getattr(config, "use_sliding_window", True):
            return {"": int(window)}
        return {"": None}
    windows = {}
    for kind in set(types):
        if kind == "full_attention":
            windows[kind] = None
        elif kind == "sliding_attention":
            windows[kind] = int(window)
        else:
            raise ValueError(f"layer type {kind!r} of {type(config).__name__} is not supported "
                             "by shared-prefix scoring; use score_naive")
    return windows


def _attention_masks(config, visible: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     dtype: torch.dtype = torch.float32):
    """Float additive masks [B, 1, Q, K] from a boolean visibility [B, Q, K],
    windowed per layer type by real positions. One tensor when all layer types
    see the same keys (no window is crossed), else a dict by layer type (the
    form hybrid models such as Gemma 3 accept)."""
    windows = _window_by_layer_type(config)
    distance = q_pos[:, :, None] - k_pos[:, None, :]
    masks: dict[str, torch.Tensor] = {}
    for kind, window in windows.items():
        seen = visible if window is None or int(distance.max()) < window else visible & (distance < window)
        masks[kind] = torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, torch.finfo(dtype).min)[:, None]
    if len(masks) == 1:
        return next(iter(masks.values()))
    first = next(iter(masks.values()))
    if all(torch.equal(m, first) for m in masks.values()):
        return first
    return masks


@torch.inference_mode()
def encode_shared_prefix(model, ids: list[int], past: SharedPrefixCache | None = None,
                  counts: TokenCounts | None = None) -> SharedPrefixCache:
    """Run `ids` once (after `past`, if given) and keep the key/value cache."""
    from transformers import DynamicCache

    if not ids:
        raise ValueError("encode_shared_prefix: empty prefix")
    _check_model(model)
    cache = past.cache(1) if past is not None else DynamicCache()
    start = past.length if past is not None else 0
    input_ids = torch.tensor([ids], device=model.device)
    positions = torch.arange(start, start + len(ids), device=model.device)[None]
    out = model(input_ids=input_ids, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    if counts is not None:
        counts.add(len(ids), len(ids))
    cache = out.past_key_values
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return SharedPrefixCache(list(past.ids if past is not None else []) + list(ids), keys, values)


def _vocab_size(model) -> int:
    emb = model.get_output_embeddings()
    return int(emb.weight.shape[0]) if emb is not None else int(model.config.vocab_size)


def _common_prefix(questions: list[list[int]]) -> list[int]:
    """Longest common leading tokens of all questions, leaving each at least one."""
    limit = min(len(q) for q in questions) - 1
    n = 0
    while n < limit and all(q[n] == questions[0][n] for q in questions):
        n += 1
    return list(questions[0][:n])


@dataclass
class ScoringItem:
    """One sentence's share of a shared-prefix forward: `pending` prefix tokens
    not in the cache (the sentence) and one token list per question."""

    pending: list[int]
    questions: list[list[int]]


@dataclass
class PromptTree:
    """One forward's sequence as parallel lists: per sentence its pending
    tokens, then per question its tokens and every label's tokens but the last."""

    ids: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)  # sentence (item) number
    group: list[int] = field(default_factory=list)  # -1 pending, else a question's unique number
    seg: list[int] = field(default_factory=list)  # -1 pending/question, else label number
    kept: list[int] = field(default_factory=list)  # sequence indices whose logits are read
    # (item, question, label, kept slot, target token) per scored label token
    targets: list[tuple[int, int, int, int, int]] = field(default_factory=list)

    def add(self, token: int, pos: int, sent: int, group: int, seg: int) -> int:
        self.ids.append(token)
        self.pos.append(pos)
        self.sent.append(sent)
        self.group.append(group)
        self.seg.append(seg)
        return len(self.ids) - 1

    def keep(self, index: int) -> int:
        self.kept.append(index)
        return len(self.kept) - 1

    def add_sentence(self, item: int, pending: list[int], start: int, questions: dict[int, list[int]],
                     labels: list[list[int]]) -> None:
        for k, token in enumerate(pending):
            self.add(token, start + k, item, -1, -1)
        base = start + len(pending)
        for qn, q in questions.items():
            group = len(self.ids)  # the question's first index: unique within the tree
            last = None
            for k, token in enumerate(q):
                last = self.add(token, base + k, item, group, -1)
            first_slot = self.keep(last)  # predicts every label's first token
            for j, label in enumerate(labels):
                slot = first_slot
                for t, token in enumerate(label):
                    self.targets.append((item, qn, j, slot, token))
                    if t < len(label) - 1:  # the last label token is only predicted
                        slot = self.keep(self.add(token, base + len(q) + t, item, group, j))

    def visibility(self, n_cached: int) -> torch.Tensor:
        """[1, T, n_cached + T]: everything sees the cache; within its own
        sentence a token sees the earlier pending tokens, a question's tokens
        see their own earlier tokens, a label's tokens also their own earlier
        label tokens; nothing sees another sentence, question or label."""
        T = len(self.ids)
        new = tree_visibility(torch.tensor(self.sent), torch.tensor(self.group), torch.tensor(self.seg))
        return torch.cat([torch.ones(T, n_cached, dtype=torch.bool), new], dim=1)[None]


def tree_visibility(sent: torch.Tensor, group: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """[..., T, T] booleans from a tree's per-token sentence, group and label-branch numbers [..., T] (see
    ``PromptTree``; leading batch dimensions allowed): a token sees the earlier tokens of its own sentence
    that are pending (group -1), or of its own question (group) on its own label branch or the trunk."""
    idx = torch.arange(sent.shape[-1], device=sent.device)
    earlier = idx[None, :] <= idx[:, None]
    q_sent, k_sent = sent[..., :, None], sent[..., None, :]
    q_group, k_group = group[..., :, None], group[..., None, :]
    q_seg, k_seg = seg[..., :, None], seg[..., None, :]
    same_branch = (k_seg == -1) | (k_seg == q_seg)
    return earlier & (q_sent == k_sent) & ((k_group == -1) | ((k_group == q_group) & same_branch))


def _tree_forward(model, tree: PromptTree, cache, counts: TokenCounts):
    """Run a tree against `cache` (or none); returns (log-prob of every target, output)."""
    from transformers import DynamicCache

    device = model.device
    n_cached = cache.get_seq_length() if cache is not None else 0
    positions = torch.tensor([tree.pos])
    k_pos = torch.cat([torch.arange(n_cached)[None], positions], dim=1)
    mask = _attention_masks(model.config, tree.visibility(n_cached), positions, k_pos, model.dtype)
    mask = {k: v.to(device) for k, v in mask.items()} if isinstance(mask, dict) else mask.to(device)
    out = model(input_ids=torch.tensor([tree.ids], device=device), attention_mask=mask,
                position_ids=positions.to(device), past_key_values=cache if cache is not None else DynamicCache(),
                use_cache=True, logits_to_keep=torch.tensor(tree.kept, device=device))
    counts.add(len(tree.ids), len(tree.ids))
    logits = score_precision(out.logits[0])  # [kept, vocab]
    lse = torch.logsumexp(logits, dim=-1)
    slots = torch.tensor([t[3] for t in tree.targets], device=device)
    tokens = torch.tensor([t[4] for t in tree.targets], device=device)
    return (logits[slots, tokens] - lse[slots]).cpu().tolist(), out


def _normalise_item(prefix: SharedPrefixCache | None, item: ScoringItem):
    """(prefix, pending, questions) with empty questions and shared question
    tokens handled; the prefix changes only when an empty question needs the
    cached prefix's last token."""
    pending, questions = list(item.pending), [list(q) for q in item.questions]
    if any(len(q) == 0 for q in questions):
        # The prefix's last token joins every question: its position then
        # predicts the first label token like any question's last token.
        if not pending:
            if prefix is None:
                raise ValueError("score_shared: empty prefix and an empty question")
            prefix, last = prefix.without_last()
            pending = [last]
        questions = [[pending[-1]] + q for q in questions]
        pending = pending[:-1]
    common = _common_prefix(questions)
    if common:
        # Tokens every question starts with ("Part-of-speech tag of the word")
        # see only the prefix and each other: they run once, as prefix.
        pending += common
        questions = [q[len(common):] for q in questions]
    if prefix is None and not pending:
        raise ValueError("score_shared: empty prefix")
    return prefix, pending, questions


@torch.inference_mode()
def score_shared_many(model, prefix: SharedPrefixCache | None, items: list[ScoringItem], labels: list[list[int]],
                      counts: TokenCounts | None = None, *, max_tokens_per_batch: int = 4096,
                      max_logit_floats: int = 64_000_000) -> list[torch.Tensor]:
    """`score_shared` for several sentences after the same cached prefix: as
    many whole sentences as fit in `max_tokens_per_batch` share one forward (a forward
    costs at least one read of the weights, however few its tokens), each
    seeing only the prefix and itself. A sentence too large for one forward
    is scored alone, its questions spread over several forwards."""
    _check_model(model)
    counts = counts if counts is not None else TokenCounts()
    if any(not label for label in labels):
        raise ValueError("every label needs at least one token")
    vocab = _vocab_size(model)
    extra = sum(len(l) - 1 for l in labels)
    results: list[torch.Tensor | None] = [None] * len(items)
    packable: list[tuple[int, list[int], list[list[int]]]] = []
    for i, item in enumerate(items):
        if not item.questions:
            results[i] = torch.zeros(0, len(labels))
            continue
        item_prefix, pending, questions = _normalise_item(prefix, item)
        size = len(pending) + sum(len(q) + extra for q in questions)
        kept = len(questions) * (1 + extra)
        if item_prefix is prefix and prefix is not None and size <= max_tokens_per_batch \
                and kept * vocab <= max_logit_floats:
            packable.append((i, pending, questions))
        else:
            results[i] = _score_alone(model, item_prefix, pending, questions, labels, counts,
                                      max_tokens_per_batch, max_logit_floats)
    while packable:
        tree, size, kept, members = PromptTree(), 0, 0, []
        while packable:
            i, pending, questions = packable[0]
            s = len(pending) + sum(len(q) + extra for q in questions)
            k = len(questions) * (1 + extra)
            if members and (size + s > max_tokens_per_batch or (kept + k) * vocab > max_logit_floats):
                break
            packable.pop(0)
            tree.add_sentence(i, pending, prefix.length, dict(enumerate(questions)), labels)
            members.append((i, len(questions)))
            size, kept = size + s, kept + k
        values, _ = _tree_forward(model, tree, prefix.cache(1), counts)
        for i, n in members:
            results[i] = torch.zeros(n, len(labels), dtype=score_dtype(model))
        for (i, qn, j, _, _), value in zip(tree.targets, values):
            results[i][qn, j] += value
    return results


def _score_alone(model, prefix, pending, questions, labels, counts, max_tokens_per_batch, max_logit_floats):
    """One sentence; questions beyond `max_tokens_per_batch` go to further forwards
    against the cache of prefix + pending."""
    vocab = _vocab_size(model)
    extra = sum(len(l) - 1 for l in labels)
    cache = prefix.cache(1) if prefix is not None else None
    start = prefix.length if prefix is not None else 0
    result = torch.zeros(len(questions), len(labels), dtype=score_dtype(model))
    todo = list(range(len(questions)))
    while todo:
        group: dict[int, list[int]] = {}
        size = len(pending)
        while todo:
            cost = len(questions[todo[0]]) + extra
            if group and ((size + cost) > max_tokens_per_batch
                          or (len(group) + 1) * (1 + extra) * vocab > max_logit_floats):
                break
            qn = todo.pop(0)
            group[qn] = questions[qn]
            size += cost
        tree = PromptTree()
        tree.add_sentence(0, pending, start, group, labels)
        values, out = _tree_forward(model, tree, cache, counts)
        for (_, qn, j, _, _), value in zip(tree.targets, values):
            result[qn, j] += value
        if todo:
            # Keep prefix + pending in the cache, drop this group's questions.
            cache = out.past_key_values
            cache.crop(-(cache.get_seq_length() - start - len(pending)))  # negative: tokens to drop
            start, pending = start + len(pending), []
    return result


@torch.inference_mode()
def score_shared(model, prefix: SharedPrefixCache | None, questions: list[list[int]], labels: list[list[int]],
                 counts: TokenCounts | None = None, *, pending: list[int] | tuple = (),
                 max_tokens_per_batch: int = 4096, max_logit_floats: int = 64_000_000) -> torch.Tensor:
    """log p(label_j | prefix + pending + question_i), summed over label tokens:
    [n_questions, n_labels].

    `prefix` is a cached state (the run's context) or None; `pending` are
    prefix tokens not yet run (the sentence). One forward, batch of one, runs
    the pending tokens, every question and every label's tokens as a tree:
    a 4-D mask lets each see only its own ancestors, explicit positions place
    each label right after its question, and logits are taken only where a
    label token is predicted. Questions beyond `max_tokens_per_batch` go to further
    forwards against the cache of prefix + pending."""
    if not questions:
        return torch.zeros(0, len(labels))
    _check_model(model)
    if any(not label for label in labels):
        raise ValueError("every label needs at least one token")
    counts = counts if counts is not None else TokenCounts()
    item_prefix, pending, questions = _normalise_item(prefix, ScoringItem(list(pending), questions))
    return _score_alone(model, item_prefix, pending, questions, labels, counts, max_tokens_per_batch, max_logit_floats)


@torch.inference_mode()
def score_naive(model, prefix_ids: list[int], questions: list[list[int]], labels: list[list[int]],
                counts: TokenCounts | None = None, max_tokens_per_batch: int = 4096,
                max_logit_floats: int = 64_000_000) -> torch.Tensor:
    """Reference: every prompt prefix + question_i + label_j runs in full
    through the model's own (2-D mask) path. Same output as `score_shared`."""
    counts = counts if counts is not None else TokenCounts()
    device = model.device
    vocab = _vocab_size(model)
    pad_id = getattr(model.config, "pad_token_id", None)
    pad_id = int(pad_id) if pad_id is not None and pad_id >= 0 else 0
    prompts = [(i, j) for i in range(len(questions)) for j in range(len(labels))]
    length = {p: len(prefix_ids) + len(questions[p[0]]) + len(labels[p[1]]) for p in prompts}
    prompts.sort(key=lambda p: length[p])
    result = torch.zeros(len(questions), len(labels), dtype=score_dtype(model))
    k = 0
    while k < len(prompts):
        chunk = [prompts[k]]
        while k + len(chunk) < len(prompts):
            nxt = prompts[k + len(chunk)]
            rows, longest = len(chunk) + 1, length[nxt]
            width = max(len(labels[p[1]]) for p in chunk + [nxt]) + 1
            if rows * longest > max_tokens_per_batch or rows * width * vocab > max_logit_floats:
                break
            chunk.append(nxt)
        k += len(chunk)
        B, L = len(chunk), max(length[p] for p in chunk)
        input_ids = torch.full((B, L), pad_id, dtype=torch.long)
        attention = torch.zeros(B, L, dtype=torch.long)
        needed = []  # (row, position predicting token, token, label)
        for r, (i, j) in enumerate(chunk):
            ids = list(prefix_ids) + list(questions[i]) + list(labels[j])
            input_ids[r, :len(ids)] = torch.tensor(ids)
            attention[r, :len(ids)] = 1
            first = len(ids) - len(labels[j])
            for t, token in enumerate(labels[j]):
                needed.append((r, first + t - 1, token))
        # Logits only at the union of needed positions (right padding keeps
        # real tokens at their true positions; pads are never read).
        kept = sorted({pos for _, pos, _ in needed})
        where = {pos: n for n, pos in enumerate(kept)}
        out = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                    use_cache=False, logits_to_keep=torch.tensor(kept, device=device))
        counts.add(int(attention.sum()), B * L)
        logits = score_precision(out.logits)
        lse = torch.logsumexp(logits, dim=-1)
        rows = torch.tensor([r for r, _, _ in needed])
        cols = torch.tensor([where[pos] for _, pos, _ in needed])
        toks = torch.tensor([tok for _, _, tok in needed])
        picked = (logits[rows, cols, toks] - lse[rows, cols]).cpu()
        for (r, _, _), value in zip(needed, picked.tolist()):
            i, j = chunk[r]
            result[i, j] += value
    return result


# --- encoder-decoder models -------------------------------------------------

def _decoder_batch(model, labels: list[list[int]]):
    start = model.config.decoder_start_token_id
    pad = model.config.pad_token_id
    width = max(len(l) for l in labels)
    dec_in = torch.full((len(labels), width), pad, dtype=torch.long)
    dec_mask = torch.zeros(len(labels), width, dtype=torch.long)
    for j, label in enumerate(labels):
        ids = [start] + list(label[:-1])
        dec_in[j, :len(ids)] = torch.tensor(ids)
        dec_mask[j, :len(ids)] = 1
    return dec_in, dec_mask


def _decoder_logprobs(logits: torch.Tensor, labels: list[list[int]], rows_per_label: int) -> torch.Tensor:
    """Summed target log-probs: each target's logit minus its position's
    logsumexp (no full-vocabulary log-softmax copy)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # [rows, T]
    n = logits.shape[0] // rows_per_label if rows_per_label else 0
    out = torch.zeros(n, rows_per_label)
    for row in range(logits.shape[0]):
        i, j = divmod(row, rows_per_label)
        label = labels[j]
        steps = torch.arange(len(label))
        out[i, j] = (logits[row, steps, torch.tensor(label)] - lse[row, steps]).sum()
    return out


@torch.inference_mode()
def score_seq2seq_shared(model, prompts: list[list[int]], labels: list[list[int]],
                         counts: TokenCounts | None = None, max_tokens_per_batch: int = 4096,
                         max_logit_floats: int = 64_000_000) -> torch.Tensor:
    """Encoder-decoder models: each prompt (prefix + question, the encoder is
    bidirectional so nothing is shared across questions) is encoded once; its
    encoder states are reused for the decoder passes of every label."""
    counts = counts if counts is not None else TokenCounts()
    device = model.device
    pad = model.config.pad_token_id
    dec_in, dec_mask = _decoder_batch(model, labels)
    result = torch.zeros(len(prompts), len(labels))
    step = max(1, max_tokens_per_batch // max(max(len(p) for p in prompts) + dec_in.shape[1] * len(labels), 1))
    # The decoder's logits (prompts x labels x steps x vocabulary) count too: mT0's is 250k wide.
    step = max(1, min(step, max_logit_floats // max(1, len(labels) * dec_in.shape[1] * _vocab_size(model))))
    for s in range(0, len(prompts), step):
        chunk = prompts[s:s + step]
        width = max(len(p) for p in chunk)
        enc_in = torch.full((len(chunk), width), pad, dtype=torch.long)
        enc_mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, p in enumerate(chunk):
            enc_in[r, :len(p)] = torch.tensor(p)
            enc_mask[r, :len(p)] = 1
        encoded = model.get_encoder()(input_ids=enc_in.to(device), attention_mask=enc_mask.to(device))
        counts.add(int(enc_mask.sum()), enc_mask.numel())
        n_l = len(labels)
        hidden = encoded.last_hidden_state.repeat_interleave(n_l, dim=0)
        out = model(encoder_outputs=(hidden,), attention_mask=enc_mask.to(device).repeat_interleave(n_l, 0),
                    decoder_input_ids=dec_in.repeat(len(chunk), 1).to(device),
                    decoder_attention_mask=dec_mask.repeat(len(chunk), 1).to(device), use_cache=False)
        counts.add(int(dec_mask.sum()) * len(chunk), dec_mask.numel() * len(chunk))
        result[s:s + len(chunk)] = _decoder_logprobs(out.logits, labels, n_l)
    return result


@torch.inference_mode()
def score_seq2seq_naive(model, prompts: list[list[int]], labels: list[list[int]],
                        counts: TokenCounts | None = None) -> torch.Tensor:
    """Reference for encoder-decoder models: one full forward per (prompt, label)."""
    counts = counts if counts is not None else TokenCounts()
    device = model.device
    dec_in, dec_mask = _decoder_batch(model, labels)
    result = torch.zeros(len(prompts), len(labels))
    for i, p in enumerate(prompts):
        for j in range(len(labels)):
            out = model(input_ids=torch.tensor([p], device=device),
                        decoder_input_ids=dec_in[j:j + 1].to(device),
                        decoder_attention_mask=dec_mask[j:j + 1].to(device), use_cache=False)
            counts.add(len(p) + int(dec_mask[j].sum()), len(p) + dec_in.shape[1])
            result[i, j] = _decoder_logprobs(out.logits, [labels[j]], 1)[0, 0]
    return result


def normalise(scores: torch.Tensor, labels: list[list[int]], by_length: bool) -> torch.Tensor:
    """Optionally divide each label's summed log-probability by its token count."""
    if not by_length:
        return scores
    lengths = torch.tensor([len(l) for l in labels], dtype=scores.dtype)
    return scores / lengths
