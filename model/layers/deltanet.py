"""Gated DeltaNet (linear attention) mixer, MODEL.md §4, over a flattened batch of sequences.

Letters: T = tokens in the step, B = sequences, H = hidden, nk/nv = key/value heads, dk/dv = head
dims, r = nv // nk, C = conv channels (2·nk·dk + nv·dv, [Q | K | V] order), K = conv kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextserve.model.cache import DeltaNetState
from nextserve.model.forward_batch import ForwardBatch
from nextserve.model.kernels.delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
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

    def _run_decode(self, mixed: Tensor, beta: Tensor, g: Tensor, states: list[DeltaNetState]) -> Tensor:
        """One token for each of B sequences with a state. mixed [B, C]; beta, g [B, nv] -> [B, nv, dv]."""
        conv_state = torch.stack([s.conv for s in states])
        c, conv_state = self._conv_step(mixed, conv_state)
        q, k, v = self._split_heads(c[:, None])
        rec = torch.stack([s.recurrent for s in states])
        o, rec = recurrent_gated_delta_rule(q, k, v, g[:, None], beta[:, None], rec)
        for i, s in enumerate(states):
            s.conv, s.recurrent = conv_state[i], rec[i]
        return o[:, 0]

    def _run_chunks(self, mixed: Tensor, beta: Tensor, g: Tensor,
                    states: list[DeltaNetState | None]) -> tuple[Tensor, list[DeltaNetState]]:
        """t tokens of each of B sequences (chunked form). mixed [B, t, C]; beta, g [B, t, nv] ->
        ([B, t, nv, dv], new states). A missing state is zeros, exactly as transformers starts."""
        conv0 = torch.stack([st.conv if st is not None else mixed.new_zeros(self.conv_dim, self.kernel)
                             for st in states])  # [B, C, K]
        rec0 = torch.stack([st.recurrent if st is not None else
                            torch.zeros(self.nv, self.dk, self.dv, dtype=torch.float32, device=mixed.device)
                            for st in states])  # [B, nv, dk, dv]
        c, conv = self._conv(mixed.transpose(1, 2), conv0)
        q, k, v = self._split_heads(c.transpose(1, 2))
        o, rec = chunk_gated_delta_rule(q, k, v, g, beta, rec0)
        return o, [DeltaNetState(conv=conv[b], recurrent=rec[b]) for b in range(len(states))]

    def forward(self, x: Tensor, batch: ForwardBatch) -> Tensor:  # [T, H] -> [T, H]
        mixed, z, b, a = self._project(x)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        out = x.new_empty(x.shape[0], self.nv, self.dv)
        if batch.decode_seqs:
            rows = batch.decode_rows  # [B_dec]
            states = [batch.caches[i].layers[self.layer_idx] for i in batch.decode_seqs]
            out[rows] = self._run_decode(mixed[rows], beta[rows], g[rows], states)
        for seqs, rows in batch.chunk_groups:  # rows [B, t]: chunks of equal length run batched
            o, new = self._run_chunks(mixed[rows], beta[rows], g[rows],
                                      [batch.caches[i].layers[self.layer_idx] for i in seqs])
            out[rows] = o
            for i, state in zip(seqs, new):
                batch.caches[i].layers[self.layer_idx] = state
        y = self.norm(out, z)
        return self.out_proj(y.reshape(x.shape[0], self.value_dim))
