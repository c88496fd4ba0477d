"""Gated full attention, MODEL.md §5: q/k RMSNorm, partial RoPE, GQA, sigmoid output gate, KV cache.

Letters: T = tokens in the step, H = hidden, nh/nkv = query/kv heads, hd = head dim, L = cached length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextserve.model.cache import KVCache
from nextserve.model.forward_batch import ForwardBatch
from nextserve.model.layers.norm import RMSNorm
from nextserve.model.layers.rope import apply_partial_rope


class GatedAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 eps: float, bias: bool, layer_idx: int) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim * 2, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def _attend(self, q: Tensor, cache: KVCache) -> Tensor:
        """q [t, nh, hd] against the cache's [nkv, L, hd] (which already holds these t) -> [t, nh·hd].
        GQA by SDPA's enable_gqa: each query head reads its kv head in place, no repeated copy."""
        t, L = q.shape[0], cache.length
        k, v = cache.key[None], cache.value[None]  # [1, nkv, L, hd]
        qh = q.transpose(0, 1)[None]  # [1, nh, t, hd]
        if t == 1:
            o = F.scaled_dot_product_attention(qh, k, v, scale=self.hd ** -0.5, enable_gqa=True)
        else:  # a chunk continuing a cached prefix (L > t): query i sees keys <= L - t + i
            mask = torch.ones(t, L, dtype=torch.bool, device=q.device).tril(L - t)
            o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=self.hd ** -0.5, enable_gqa=True)
        return o[0].transpose(0, 1).reshape(t, self.nh * self.hd)

    def _attend_fresh(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention of B uncached chunks of equal length t: q [B, t, nh, hd], k/v [B, t, nkv, hd]
        -> [B, t, nh·hd]."""
        B, t = q.shape[:2]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           scale=self.hd ** -0.5, enable_gqa=True)  # [B, nh, t, hd]
        return o.transpose(1, 2).reshape(B, t, self.nh * self.hd)

    def forward(self, x: Tensor, batch: ForwardBatch, cos: Tensor, sin: Tensor) -> Tensor:  # [T, H] -> [T, H]
        T = x.shape[0]
        q, gate = torch.chunk(self.q_proj(x).view(T, self.nh, 2 * self.hd), 2, dim=-1)
        q = apply_partial_rope(self.q_norm(q), cos, sin)  # [T, nh, hd]
        k = apply_partial_rope(self.k_norm(self.k_proj(x).view(T, self.nkv, self.hd)), cos, sin)
        v = self.v_proj(x).view(T, self.nkv, self.hd)
        out = x.new_empty(T, self.nh * self.hd)
        for i, s, e in batch.spans():
            cache = batch.caches[i]
            entry = cache.layers[self.layer_idx]
            k_new, v_new = k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)  # [nkv, t, hd]
            if entry is None:  # a first chunk: attended with its group below
                cache.layers[self.layer_idx] = KVCache.of(k_new, v_new)
                continue
            entry.append(k_new, v_new)
            out[s:e] = self._attend(q[s:e], entry)
        for _, rows in batch.fresh_groups:  # rows [B, t]: first chunks of equal length run batched
            out[rows] = self._attend_fresh(q[rows], k[rows], v[rows])
        out = out * torch.sigmoid(gate.reshape(T, self.nh * self.hd))
        return self.o_proj(out)
