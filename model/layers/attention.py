"""Gated full attention, MODEL.md §5: q/k RMSNorm, partial RoPE, GQA, sigmoid output gate, paged KV cache.

Letters: T = tokens in the step, H = hidden, nh/nkv = query/kv heads, hd = head dim, L = cached length,
N = KV blocks, bs = block size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextserve.model.forward_batch import ForwardBatch, PrefixChunk
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

    def _attend_decode(self, q: Tensor, batch: ForwardBatch) -> Tensor:
        """One query per decoding sequence, all in one call: q [B, nh, hd] against each one's blocks of
        this layer's K/V pools, gathered into [B, L, nkv, hd] and masked past its length -> [B, nh·hd].
        GQA by SDPA's enable_gqa: each query head reads its kv head in place, no repeated copy."""
        B, L = q.shape[0], batch.decode_mask.shape[-1]
        k, v = batch.cache.gather_kv(self.layer_idx, batch.decode_blocks.flatten())  # [B·L/bs, bs, nkv, hd]
        k = k.view(B, L, self.nkv, self.hd).transpose(1, 2)  # [B, nkv, L, hd]
        v = v.view(B, L, self.nkv, self.hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=batch.decode_mask, scale=self.hd ** -0.5,
                                           enable_gqa=True)  # [B, nh, 1, hd]
        return o.reshape(B, self.nh * self.hd)

    def _attend_prefix(self, q: Tensor, key: Tensor, value: Tensor, chunk: PrefixChunk) -> Tensor:
        """A chunk continuing a cached prefix: q [t, nh, hd] against the L = chunk.length tokens in its
        blocks (these t included) -> [t, nh·hd]; query i sees keys <= L - t + i."""
        t, L = q.shape[0], chunk.length
        k = key[chunk.blocks].flatten(0, 1)[:L].transpose(0, 1)[None]  # [1, nkv, L, hd]
        v = value[chunk.blocks].flatten(0, 1)[:L].transpose(0, 1)[None]
        mask = torch.ones(t, L, dtype=torch.bool, device=q.device).tril(L - t)
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask, scale=self.hd ** -0.5,
                                           enable_gqa=True)  # [1, nh, t, hd]
        return o[0].transpose(0, 1).reshape(t, self.nh * self.hd)

    def _attend_fresh(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention of B uncached chunks of equal length t: q [B, t, nh, hd], k/v [B, t, nkv, hd]
        -> [B, t, nh·hd]."""
        B, t = q.shape[:2]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           scale=self.hd ** -0.5, enable_gqa=True)  # [B, nh, t, hd]
        return o.transpose(1, 2).reshape(B, t, self.nh * self.hd)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [T, H] -> q [T, nh, hd], k, v [T, nkv, hd] (normed, RoPE'd: what the cache holds), gate [T, nh·hd]."""
        T = x.shape[0]
        q, gate = torch.chunk(self.q_proj(x).view(T, self.nh, 2 * self.hd), 2, dim=-1)
        q = apply_partial_rope(self.q_norm(q), cos, sin)  # [T, nh, hd]
        k = apply_partial_rope(self.k_norm(self.k_proj(x).view(T, self.nkv, self.hd)), cos, sin)
        v = self.v_proj(x).view(T, self.nkv, self.hd)
        return q, k, v, gate.reshape(T, self.nh * self.hd)

    def gated_output(self, attn: Tensor, gate: Tensor) -> Tensor:
        """attn, gate [T, nh·hd] -> o_proj(attn * sigmoid(gate)) [T, H]."""
        return self.o_proj(attn * torch.sigmoid(gate))

    def forward(self, x: Tensor, batch: ForwardBatch, cos: Tensor, sin: Tensor) -> Tensor:  # [T, H] -> [T, H]
        T = x.shape[0]
        q, k, v, gate = self.project(x, cos, sin)
        key, value = batch.cache.key[self.layer_idx], batch.cache.value[self.layer_idx]  # [N, bs, nkv, hd]
        key.view(-1, self.nkv, self.hd).index_copy_(0, batch.kv_index, k)  # every new token into its block row
        value.view(-1, self.nkv, self.hd).index_copy_(0, batch.kv_index, v)
        out = x.new_empty(T, self.nh * self.hd)
        if batch.decode_seqs:
            rows = batch.decode_rows
            out[rows] = self._attend_decode(q[rows], batch)
        for chunk in batch.prefix_chunks:
            out[chunk.start:chunk.end] = self._attend_prefix(q[chunk.start:chunk.end], key, value, chunk)
        for group in batch.fresh_groups:  # rows [B, t]: first chunks of equal length run batched
            out[group.rows] = self._attend_fresh(q[group.rows], k[group.rows], v[group.rows])
        return self.gated_output(out, gate)
