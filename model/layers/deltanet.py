"""Gated DeltaNet (linear attention) mixer, MODEL.md §4, over a flattened batch of sequences.

Letters: T = tokens in the step, B = sequences, H = hidden, nk/nv = key/value heads, dk/dv = head
dims, r = nv // nk, C = conv channels (2·nk·dk + nv·dv, [Q | K | V] order), K = conv kernel,
S = state slots of the cache pools (model/cache/pools.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextserve.model.cache.pools import HybridCache
from nextserve.model.forward_batch import ForwardBatch
from nextserve.model.kernels.delta_rule import chunk_gated_delta_rule, gated_delta_step
from nextserve.model.layers.norm import GatedRMSNorm


class GatedDeltaNet(nn.Module):
    def __init__(self, hidden_size: int, num_k_heads: int, num_v_heads: int, head_k_dim: int,
                 head_v_dim: int, conv_kernel: int, eps: float, layer_idx: int) -> None:
        super().__init__()
        self.nk, self.nv, self.dk, self.dv = num_k_heads, num_v_heads, head_k_dim, head_v_dim
        self.r = num_v_heads // num_k_heads
        self.key_dim, self.value_dim = num_k_heads * head_k_dim, num_v_heads * head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = conv_kernel
        self.layer_idx = layer_idx
        self.in_proj_qkvz = nn.Linear(hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(hidden_size, 2 * num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(num_v_heads))
        self.norm = GatedRMSNorm(head_v_dim, eps)
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [T, H] -> mixed [T, C], z [T, nv, dv], b [T, nv], a [T, nv] (per-key-head layout undone)."""
        T = x.shape[0]
        qkvz = self.in_proj_qkvz(x).view(T, self.nk, 2 * self.dk + 2 * self.r * self.dv)
        q, k, v, z = torch.split(qkvz, [self.dk, self.dk, self.r * self.dv, self.r * self.dv], dim=-1)
        ba = self.in_proj_ba(x).view(T, self.nk, 2 * self.r)
        b, a = torch.split(ba, [self.r, self.r], dim=-1)
        mixed = torch.cat((q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)), dim=-1)
        return mixed, z.reshape(T, self.nv, self.dv), b.reshape(T, self.nv), a.reshape(T, self.nv)

    def _conv(self, mixed: Tensor, conv_state: Tensor) -> tuple[Tensor, Tensor]:
        """mixed [B, C, t], conv_state [B, C, K] -> (silu(conv) [B, C, t], new state [B, C, K])."""
        t = mixed.shape[-1]
        full = torch.cat((conv_state, mixed), dim=-1).to(self.conv1d.weight.dtype)
        out = F.conv1d(full, self.conv1d.weight, groups=self.conv_dim)[..., -t:]
        return F.silu(out).to(mixed.dtype), full[..., -self.kernel:]

    def _split_heads(self, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """c [B, t, C] -> q, k [B, t, nv, dk] (key heads repeated per value head), v [B, t, nv, dv]."""
        B, t, _ = c.shape
        q, k, v = torch.split(c, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(B, t, self.nk, self.dk).repeat_interleave(self.r, dim=2)
        k = k.reshape(B, t, self.nk, self.dk).repeat_interleave(self.r, dim=2)
        return q, k, v.reshape(B, t, self.nv, self.dv)

    def _conv_step(self, mixed: Tensor, conv_state: Tensor) -> tuple[Tensor, Tensor]:
        """One token: mixed [B, C], conv_state [B, C, K] -> (silu(conv) [B, C], new state [B, C, K]).
        The depthwise conv of one output is a K-term dot product per channel: a multiply and a sum,
        without conv1d's per-call set-up (the step's hot path)."""
        window = torch.cat((conv_state[..., 1:], mixed[..., None].to(conv_state.dtype)), dim=-1)  # [B, C, K]
        out = (window.float() * self.conv1d.weight[:, 0].float()).sum(-1)  # [B, C], fp32 like conv1d's accumulator
        return F.silu(out).to(mixed.dtype), window

    def _run_decode(self, mixed: Tensor, beta: Tensor, g: Tensor, cache: HybridCache,
                    slots: Tensor | slice) -> Tensor:
        """One token for each of B sequences, their states in `slots` of this layer's conv [S, C, K] and
        recurrent [S, nv, dk, dv] pools: updated in place when slots is a slice (one run of slots), else
        gathered and written back. mixed [B, C]; beta, g [B, nv] -> [B, nv, dv]."""
        conv_pool, rec_pool = cache.conv[self.layer_idx], cache.recurrent[self.layer_idx]
        c, window = self._conv_step(mixed, conv_pool[slots])
        conv_pool[slots] = window  # into the view for a slice, an indexed write otherwise
        q, k, v = self._split_heads(c[:, None])
        if isinstance(slots, slice):  # one run of slots: the step updates the pool itself
            return gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g, beta, rec_pool[slots])
        rec = cache.gather_recurrent(self.layer_idx, slots)
        o = gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g, beta, rec)
        rec_pool.index_copy_(0, slots, rec)
        return o

    def _run_chunks(self, mixed: Tensor, beta: Tensor, g: Tensor, conv_pool: Tensor, rec_pool: Tensor,
                    slots: Tensor) -> Tensor:
        """t tokens of each of B sequences (chunked form), from and back to their slots. mixed [B, t, C];
        beta, g [B, t, nv] -> [B, t, nv, dv]."""
        c, conv = self._conv(mixed.transpose(1, 2), conv_pool[slots])
        conv_pool.index_copy_(0, slots, conv)
        q, k, v = self._split_heads(c.transpose(1, 2))
        o, rec = chunk_gated_delta_rule(q, k, v, g, beta, rec_pool[slots])
        rec_pool.index_copy_(0, slots, rec)
        return o

    def _run_verify(self, mixed: Tensor, beta: Tensor, g: Tensor, conv_pool: Tensor, rec_pool: Tensor,
                    slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Verify chunks of t tokens of each of B sequences, stepped token by token with the decode
        arithmetic (so an accepted draft's output is what decoding it would give), from and back to their
        slots. mixed [B, t, C]; beta, g [B, t, nv] -> (out [B, t, nv, dv], the conv state after each
        position [B, t, C, K], the recurrent state after each position [B, t, nv, dk, dv])."""
        B, t = mixed.shape[:2]
        conv, rec = conv_pool[slots], rec_pool[slots]  # copies: [B, C, K], [B, nv, dk, dv]
        conv_after = conv.new_empty(B, t, *conv.shape[1:])
        rec_after = rec.new_empty(B, t, *rec.shape[1:])
        out = mixed.new_empty(B, t, self.nv, self.dv)
        for j in range(t):
            c, conv = self._conv_step(mixed[:, j], conv)
            q, k, v = self._split_heads(c[:, None])
            out[:, j] = gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, j], beta[:, j], rec)  # rec in place
            conv_after[:, j], rec_after[:, j] = conv, rec
        conv_pool.index_copy_(0, slots, conv)  # all accepted; the runner rolls back the others
        rec_pool.index_copy_(0, slots, rec)
        return out, conv_after, rec_after

    def forward(self, x: Tensor, batch: ForwardBatch) -> Tensor:  # [T, H] -> [T, H]
        mixed, z, b, a = self._project(x)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        conv_pool, rec_pool = batch.cache.conv[self.layer_idx], batch.cache.recurrent[self.layer_idx]
        out = x.new_empty(x.shape[0], self.nv, self.dv)
        if batch.decode_seqs:
            rows = batch.decode_rows  # [B_dec]
            out[rows] = self._run_decode(mixed[rows], beta[rows], g[rows], batch.cache, batch.decode_slots)
        if batch.fresh_groups:  # a first chunk starts from zero states, exactly as transformers does
            conv_pool.index_fill_(0, batch.fresh_slots, 0)
            rec_pool.index_fill_(0, batch.fresh_slots, 0)
        for group in batch.chunk_groups:  # rows [B, t]: chunks of equal length run batched
            rows = group.rows
            out[rows] = self._run_chunks(mixed[rows], beta[rows], g[rows], conv_pool, rec_pool, group.slots)
        for i, group in enumerate(batch.verify_groups):  # rows [B, t]: verify chunks of equal length
            rows = group.rows
            out[rows], *states = self._run_verify(mixed[rows], beta[rows], g[rows], conv_pool, rec_pool, group.slots)
            batch.verify_states[self.layer_idx, i] = (states[0], states[1])
        y = self.norm(out, z)
        return self.out_proj(y.reshape(x.shape[0], self.value_dim))
