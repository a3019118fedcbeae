"""Greedy generation for causal LMs that shares the prompt's common prefix.

Every whole-sentence prompt of a run starts with the same instruction and
demonstrations (hundreds of tokens at 3 shots); every ToPro question of a
sentence starts with the same sentence. The prefix runs once
(`scoring.encode_shared_prefix`); the batch of suffixes runs against its cache,
left-padded, with explicit positions and 4-D masks (pads are never seen,
sliding windows are measured in real positions), then decoding proceeds one
token per row. Finished rows leave the batch, so a long answer does not keep
short ones computing. The result equals unbatched `model.generate` with
greedy decoding on the full prompt (tested).
"""
from __future__ import annotations

from typing import Callable

import torch

from topro.llm.scoring import SharedPrefixCache, TokenCounts, _attention_masks, _check_model


def _select_rows(cache, rows: torch.Tensor) -> None:
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, rows)
        layer.values = layer.values.index_select(0, rows)


def _to_device(mask, device):
    if isinstance(mask, dict):
        return {k: v.to(device) for k, v in mask.items()}
    return mask.to(device)


@torch.inference_mode()
def greedy_generate_shared(model, prefix: SharedPrefixCache, suffixes: list[list[int]], max_new_tokens: int,
                           *, stop: Callable[[list[int]], bool] | None = None,
                           eos_ids: set[int] | None = None, counts: TokenCounts | None = None,
                           batch_rows: int = 16) -> list[list[int]]:
    """Greedy continuation of prefix + suffix_i for every suffix; returns the new
    token ids (without the EOS that ended a row). `stop(tokens)` ends a row
    early (e.g. once its text holds a newline).

    One function on purpose: the decode loop and the shared-prefix cache it grows step by step are one
    piece of state; split, every part would pass the cache, the live rows and their lengths around."""
    _check_model(model)
    counts = counts if counts is not None else TokenCounts()
    eos_ids = eos_ids or set()
    device = model.device
    P = prefix.length
    pad_id = getattr(model.config, "pad_token_id", None)
    pad_id = int(pad_id) if pad_id is not None and pad_id >= 0 else 0
    outputs: list[list[int]] = [[] for _ in suffixes]
    order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
    for start in range(0, len(order), batch_rows):
        chunk = order[start:start + batch_rows]
        if any(len(suffixes[i]) == 0 for i in chunk):
            raise ValueError("greedy_generate_shared: empty suffix (put the last prompt token in it)")
        B, L = len(chunk), max(len(suffixes[i]) for i in chunk)
        input_ids = torch.full((B, L), pad_id, dtype=torch.long)
        positions = torch.full((B, L), P, dtype=torch.long)
        real = torch.zeros(B, L, dtype=torch.bool)
        for r, i in enumerate(chunk):
            n = len(suffixes[i])
            input_ids[r, L - n:] = torch.tensor(suffixes[i])
            positions[r, L - n:] = P + torch.arange(n)
            real[r, L - n:] = True
        idx = torch.arange(L)
        causal = idx[None, :] <= idx[:, None]
        visible_new = (causal[None] & real[:, None, :]) | torch.eye(L, dtype=torch.bool)[None]
        visible = torch.cat([torch.ones(B, L, P, dtype=torch.bool), visible_new], dim=2)
        k_pos = torch.cat([torch.arange(P)[None].expand(B, P), positions], dim=1)
        k_valid = torch.cat([torch.ones(B, P, dtype=torch.bool), real], dim=1)
        cache = prefix.cache(B)
        mask = _attention_masks(model.config, visible, positions, k_pos, model.dtype)
        out = model(input_ids=input_ids.to(device), attention_mask=_to_device(mask, device),
                    position_ids=positions.to(device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        counts.add(int(real.sum()), B * L)
        rows = list(chunk)  # original index of each live row
        last_pos = positions[:, -1].clone()
        for step in range(max_new_tokens):
            next_tokens = out.logits[:, -1].argmax(dim=-1).cpu()
            keep = []
            for r, token in enumerate(next_tokens.tolist()):
                i = rows[r]
                if token in eos_ids:
                    continue
                outputs[i].append(token)
                if (stop is None or not stop(outputs[i])) and step + 1 < max_new_tokens:
                    keep.append(r)
            if not keep:
                break
            if len(keep) < len(rows):
                sel = torch.tensor(keep)
                _select_rows(out.past_key_values, sel.to(device))
                rows = [rows[r] for r in keep]
                next_tokens, last_pos = next_tokens[sel], last_pos[sel]
                k_pos, k_valid = k_pos[sel], k_valid[sel]
            cache = out.past_key_values
            last_pos = last_pos + 1
            k_pos = torch.cat([k_pos, last_pos[:, None]], dim=1)
            k_valid = torch.cat([k_valid, torch.ones(len(rows), 1, dtype=torch.bool)], dim=1)
            mask = _attention_masks(model.config, k_valid[:, None, :], last_pos[:, None], k_pos, model.dtype)
            out = model(input_ids=next_tokens[:, None].to(device), attention_mask=_to_device(mask, device),
                        position_ids=last_pos[:, None].to(device), past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            counts.add(len(rows), len(rows))
    return outputs
