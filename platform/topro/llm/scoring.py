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
- `score_shared`: the prefix runs once and its key/value cache is reused. All
  questions and all labels of a sentence then run in one batched forward: one
  row per question holding the question tokens followed by every label's
  tokens (all but the last, which is only predicted), with an explicit 4-D
  attention mask (a label sees the prefix, its own question and its own
  earlier tokens, never another label) and explicit position ids (each label
  starts right after its question). Each token of the tree runs once; the
  questions' common leading tokens ("Part-of-speech tag of the word") join
  the prefix.

Both compute logits only at the positions that predict a label token (the
output layer of a 262k-vocabulary model costs more than its body per token),
so a speed comparison between them measures the prefix sharing alone.

Token ids are concatenated, never re-tokenized: `prefix + question + label`
means the concatenation of the three id lists, identical in both methods.
Sliding-window layers (Gemma 2/3) get a windowed mask built from the real
positions, so prompts longer than the window give the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "TokenCounts",
    "PrefixState",
    "encode_prefix",
    "score_shared",
    "score_naive",
    "score_seq2seq_shared",
    "score_seq2seq_naive",
    "normalise",
]

MASKED = torch.finfo(torch.float32).min


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
class PrefixState:
    """The key/value cache of a prefix run once (batch of one, no padding)."""

    ids: list[int]
    keys: list[torch.Tensor]  # per layer: [1, kv_heads, len, head_dim]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return len(self.ids)

    def without_last(self) -> tuple["PrefixState", int]:
        """The state one token shorter, and that token: used when a question is
        empty, so the first label token is predicted from a question position."""
        return (PrefixState(self.ids[:-1], [k[:, :, :-1] for k in self.keys],
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


def _check_model(model) -> None:
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


def _attention_masks(config, visible: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
    """Float additive masks [B, 1, Q, K] from a boolean visibility [B, Q, K],
    windowed per layer type by real positions. One tensor when all layer types
    see the same keys (no window is crossed), else a dict by layer type (the
    form hybrid models such as Gemma 3 accept)."""
    windows = _window_by_layer_type(config)
    distance = q_pos[:, :, None] - k_pos[:, None, :]
    masks: dict[str, torch.Tensor] = {}
    for kind, window in windows.items():
        seen = visible if window is None or int(distance.max()) < window else visible & (distance < window)
        masks[kind] = torch.zeros(seen.shape, dtype=torch.float32).masked_fill_(~seen, MASKED)[:, None]
    if len(masks) == 1:
        return next(iter(masks.values()))
    first = next(iter(masks.values()))
    if all(torch.equal(m, first) for m in masks.values()):
        return first
    return masks


@torch.inference_mode()
def encode_prefix(model, ids: list[int], past: PrefixState | None = None,
                  counts: TokenCounts | None = None) -> PrefixState:
    """Run `ids` once (after `past`, if given) and keep the key/value cache."""
    from transformers import DynamicCache

    if not ids:
        raise ValueError("encode_prefix: empty prefix")
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
    return PrefixState(list(past.ids if past is not None else []) + list(ids), keys, values)


def _label_layout(labels: list[list[int]]):
    """Where each label's tokens sit in the tree row and in the kept logits.

    Row layout after the question: label 0 tokens[:-1], label 1 tokens[:-1], ...
    Kept logits: index 0 = last question token (predicts every label's first
    token), index 1 + s = label-part position s (predicts the next token)."""
    tree_ids, tree_seg, tree_offset = [], [], []
    kept_index, target_token, target_label = [], [], []
    for j, label in enumerate(labels):
        if not label:
            raise ValueError(f"label {j} has no tokens")
        start = len(tree_ids)
        for t, token in enumerate(label):
            kept_index.append(0 if t == 0 else 1 + start + t - 1)
            target_token.append(token)
            target_label.append(j)
        for t, token in enumerate(label[:-1]):
            tree_ids.append(token)
            tree_seg.append(j)
            tree_offset.append(t)
    return tree_ids, tree_seg, tree_offset, kept_index, target_token, target_label


def _gather_logprobs(logits: torch.Tensor, kept_index: list[int], target_token: list[int],
                     target_label: list[int], n_labels: int) -> torch.Tensor:
    """Sum of log-probabilities per label: logits [B, K, V] -> [B, n_labels]."""
    logits = logits.float()
    device = logits.device
    idx = torch.tensor(kept_index, device=device)
    tok = torch.tensor(target_token, device=device)
    picked = logits[:, idx, tok] - torch.logsumexp(logits, dim=-1)[:, idx]
    sums = torch.zeros(logits.shape[0], n_labels, dtype=torch.float32, device=device)
    return sums.index_add_(1, torch.tensor(target_label, device=device), picked)


def _vocab_size(model) -> int:
    emb = model.get_output_embeddings()
    return int(emb.weight.shape[0]) if emb is not None else int(model.config.vocab_size)


def _rows_per_chunk(row_len: int, kept: int, vocab: int, max_batch_tokens: int,
                    max_logit_floats: int) -> int:
    return max(1, min(max_batch_tokens // max(row_len, 1), max_logit_floats // max(kept * vocab, 1)))


def _common_prefix(questions: list[list[int]]) -> list[int]:
    """Longest common leading tokens of all questions, leaving each at least one."""
    limit = min(len(q) for q in questions) - 1
    n = 0
    while n < limit and all(q[n] == questions[0][n] for q in questions):
        n += 1
    return list(questions[0][:n])


@torch.inference_mode()
def score_shared(model, prefix: PrefixState, questions: list[list[int]], labels: list[list[int]],
                 counts: TokenCounts | None = None, max_batch_tokens: int = 4096,
                 max_logit_floats: int = 64_000_000) -> torch.Tensor:
    """log p(label_j | prefix + question_i) summed over label tokens: [n_questions, n_labels],
    from the prefix's cache and one tree-masked forward per chunk of questions."""
    _check_model(model)
    if not questions:
        return torch.zeros(0, len(labels))
    if any(len(q) == 0 for q in questions):
        # Move the prefix's last token into every question: its position then
        # predicts the first label token like any question's last token.
        prefix, last = prefix.without_last()
        questions = [[last] + list(q) for q in questions]
    counts = counts if counts is not None else TokenCounts()
    common = _common_prefix(questions)
    if common:
        # Question tokens shared by every question ("Part-of-speech tag of the
        # word") see only the prefix and each other: run them once, as prefix.
        prefix = encode_prefix(model, common, past=prefix, counts=counts)
        questions = [q[len(common):] for q in questions]
    device = model.device
    P = prefix.length
    tree_ids, tree_seg, tree_offset, kept_index, target_token, target_label = _label_layout(labels)
    S = len(tree_ids)
    seg = torch.tensor(tree_seg, dtype=torch.long)
    offset = torch.tensor(tree_offset, dtype=torch.long)
    vocab = _vocab_size(model)
    order = sorted(range(len(questions)), key=lambda i: len(questions[i]))
    result = torch.zeros(len(questions), len(labels))
    i = 0
    while i < len(order):
        q_max_guess = len(questions[order[i]])
        n_rows = _rows_per_chunk(q_max_guess + S, 1 + S, vocab, max_batch_tokens, max_logit_floats)
        chunk = order[i:i + n_rows]
        q_max = max(len(questions[c]) for c in chunk)
        while len(chunk) > 1 and len(chunk) * (q_max + S) > max_batch_tokens:
            chunk = chunk[:-1]
            q_max = max(len(questions[c]) for c in chunk)
        i += len(chunk)
        B, R = len(chunk), q_max + S
        # Row: [pads][question][label tokens]; questions right-aligned so the
        # kept logit positions are the same for every row.
        input_ids = torch.zeros(B, R, dtype=torch.long)
        positions = torch.full((B, R), P, dtype=torch.long)
        kind = torch.zeros(B, R, dtype=torch.long)  # 0 pad, 1 question, 2 label
        row_seg = torch.full((B, R), -1, dtype=torch.long)
        for r, c in enumerate(chunk):
            q = questions[c]
            a = len(q)
            input_ids[r, q_max - a:q_max] = torch.tensor(q, dtype=torch.long)
            positions[r, q_max - a:q_max] = P + torch.arange(a)
            kind[r, q_max - a:q_max] = 1
            if S:
                input_ids[r, q_max:] = torch.tensor(tree_ids, dtype=torch.long)
                positions[r, q_max:] = P + a + offset
                kind[r, q_max:] = 2
                row_seg[r, q_max:] = seg
        if (kind == 0).any():
            pad_id = getattr(model.config, "pad_token_id", None)
            input_ids[kind == 0] = int(pad_id) if pad_id is not None and pad_id >= 0 else 0
        qx = torch.arange(R)
        before = qx[None, :] <= qx[:, None]  # key index <= query index
        k_kind, q_kind = kind[:, None, :], kind[:, :, None]
        same_label = (row_seg[:, None, :] == row_seg[:, :, None]) & (k_kind == 2) & (q_kind == 2)
        new_visible = before[None] & (((k_kind == 1) & (q_kind > 0)) | same_label)
        new_visible |= torch.eye(R, dtype=torch.bool)[None]  # pads see themselves
        visible = torch.cat([torch.ones(B, R, P, dtype=torch.bool), new_visible], dim=2)
        k_pos = torch.cat([torch.arange(P)[None].expand(B, P), positions], dim=1)
        mask = _attention_masks(model.config, visible, positions, k_pos)
        if isinstance(mask, dict):
            mask = {k: v.to(device) for k, v in mask.items()}
        else:
            mask = mask.to(device)
        keep = torch.arange(q_max - 1, R, device=device)
        out = model(input_ids=input_ids.to(device), attention_mask=mask,
                    position_ids=positions.to(device), past_key_values=prefix.cache(B),
                    use_cache=True, logits_to_keep=keep)
        counts.add(int((kind > 0).sum()), B * R)
        scores = _gather_logprobs(out.logits, kept_index, target_token, target_label, len(labels))
        result[torch.tensor(chunk)] = scores.cpu()
    return result


@torch.inference_mode()
def score_naive(model, prefix_ids: list[int], questions: list[list[int]], labels: list[list[int]],
                counts: TokenCounts | None = None, max_batch_tokens: int = 4096,
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
    result = torch.zeros(len(questions), len(labels))
    k = 0
    while k < len(prompts):
        chunk = [prompts[k]]
        while k + len(chunk) < len(prompts):
            nxt = prompts[k + len(chunk)]
            rows, longest = len(chunk) + 1, length[nxt]
            width = max(len(labels[p[1]]) for p in chunk + [nxt]) + 1
            if rows * longest > max_batch_tokens or rows * width * vocab > max_logit_floats:
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
        logits = out.logits.float()
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
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    n = logits.shape[0] // rows_per_label if rows_per_label else 0
    out = torch.zeros(n, rows_per_label)
    for row in range(logits.shape[0]):
        i, j = divmod(row, rows_per_label)
        label = labels[j]
        out[i, j] = logprobs[row, torch.arange(len(label)), torch.tensor(label)].sum()
    return out


@torch.inference_mode()
def score_seq2seq_shared(model, prompts: list[list[int]], labels: list[list[int]],
                         counts: TokenCounts | None = None, max_batch_tokens: int = 4096) -> torch.Tensor:
    """Encoder-decoder models: each prompt (prefix + question, the encoder is
    bidirectional so nothing is shared across questions) is encoded once; its
    encoder states are reused for the decoder passes of every label."""
    counts = counts if counts is not None else TokenCounts()
    device = model.device
    pad = model.config.pad_token_id
    dec_in, dec_mask = _decoder_batch(model, labels)
    result = torch.zeros(len(prompts), len(labels))
    step = max(1, max_batch_tokens // max(max(len(p) for p in prompts) + dec_in.shape[1] * len(labels), 1))
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
