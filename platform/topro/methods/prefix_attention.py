"""Deep prefix tuning (P-tuning v2) for encoder and decoder-only backbones, via transformers' attention interface.

P-tuning v2 prepends trainable key/value vectors to every layer's self-attention.
Its reference code fed them to BERT as ``past_key_values``; transformers 5's
encoders do not take a cache that way (the mask would cover only the input, and
positions would shift by the prefix length). Instead the backbone's attention
implementation is switched to ``topro_prefix``: scaled dot-product attention
that, when the forward call carries ``prefix_key_values`` (passed through the
model's ``**kwargs`` down to each attention call), concatenates that layer's
prefix keys/values in front of the input's and widens the attention mask so
every query sees every prefix position. Positions and token types are those of
the plain input. Without ``prefix_key_values`` it is plain SDPA attention, so
the same backbone serves prefixed and plain calls.
"""
from __future__ import annotations

import torch
from torch import nn

ATTENTION_NAME = "topro_prefix"
PREFIX_KWARG = "prefix_key_values"


def widen_mask(mask: torch.Tensor | None, n_prefix: int) -> torch.Tensor | None:
    """A 4D attention mask [B, 1, Q, K] widened to [B, 1, Q, n_prefix + K] with the prefix visible.

    Masks come as ``None`` (nothing masked), booleans (True = attend) or additive floats (0 = attend).
    """
    if mask is None or n_prefix == 0:
        return mask
    visible = True if mask.dtype == torch.bool else 0.0
    prefix = torch.full((*mask.shape[:-1], n_prefix), visible, dtype=mask.dtype, device=mask.device)
    return torch.cat([prefix, mask], dim=-1)


def prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs):
    """SDPA attention with this layer's prefix keys/values ([B, heads, P, head_dim]) in front."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix = kwargs.pop(PREFIX_KWARG, None)
    if prefix is not None:
        prefix_key, prefix_value = prefix[module.layer_idx]
        if attention_mask is None and getattr(module, "is_causal", False) and query.shape[2] > 1:
            # SDPA's own is_causal aligns queries with the first keys, i.e. with the prefix: spell it out.
            attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
            attention_mask = attention_mask[None, None]
        key = torch.cat([prefix_key.to(key.dtype), key], dim=2)
        value = torch.cat([prefix_value.to(value.dtype), value], dim=2)
        attention_mask = widen_mask(attention_mask, prefix_key.shape[2])
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, prefix_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # masks built as for SDPA


def enable_prefix_attention(backbone: nn.Module) -> nn.Module:
    """Switch ``backbone`` (BERT, XLM-R, Llama, Gemma 3, ... models using the attention interface) to prefix
    attention. In a decoder-only model every token sees the whole prefix and, as before, only its left."""
    _register()
    backbone.set_attn_implementation(ATTENTION_NAME)
    return backbone


class PrefixEncoder(nn.Module):
    """Per-layer prefix keys and values: P-tuning v2's prefix table without reparameterisation.

    One embedding row per prefix position holds every layer's key and value
    (``2 * n_layers * hidden``), initialised N(0, 1) as in the reference code;
    dropout is applied per example, as there.
    """

    def __init__(self, n_layers: int, n_heads: int, head_dim: int, length: int, dropout: float = 0.1):
        super().__init__()
        self.n_layers, self.n_heads, self.head_dim, self.length = n_layers, n_heads, head_dim, length
        self.embedding = nn.Embedding(length, 2 * n_layers * n_heads * head_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        table = self.embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)
        table = self.dropout(table.reshape(batch_size, self.length, 2 * self.n_layers, self.n_heads, self.head_dim))
        table = table.permute(2, 0, 3, 1, 4)  # [2 * layers, B, heads, P, head_dim]
        return [(table[2 * i], table[2 * i + 1]) for i in range(self.n_layers)]

    @classmethod
    def for_backbone(cls, config, length: int, dropout: float) -> "PrefixEncoder":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # Grouped-query attention (Llama, Gemma, Qwen): keys and values have fewer heads than queries.
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, length, dropout)
