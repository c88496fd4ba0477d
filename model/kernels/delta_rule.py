"""The gated delta rule, in the two forms transformers uses (shared/MODEL.md §4.8), and the decode step.

`chunk_gated_delta_rule` (prefill and multi-token continuation) keeps transformers' op order so that
fp32 results agree to ~1e-6; `recurrent_gated_delta_rule` is the token-by-token form, transformers'
decode and the reference for `gated_delta_step`, the one-token decode the head runs: the same math with
the state updated in place (in the cache pool itself when the sequences' slots are one run), by batched
matmuls instead of broadcast products, so the state is read three times and written twice per step with
no temporary of its size. All take inputs already expanded to value heads.

Letters: B = sequences, T = tokens, h = value heads (nv), dk/dv = key/value head dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nextserve.model.layers.norm import l2norm

CHUNK_SIZE = 64
"""Chunk length of the chunked form; 64 as in transformers and FLA (changing it changes rounding)."""


def _prepare(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor) -> tuple[Tensor, ...]:
    # [B, T, h, d] -> fp32 [B, h, T, d]; beta, g: [B, T, h] -> [B, h, T]
    q, k, v, beta, g = (x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
                        for x in (q, k, v, beta, g))
    q = l2norm(q)
    k = l2norm(k)
    return q, k, v, beta, g


def chunk_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """q, k: [B, T, h, dk]; v: [B, T, h, dv]; g, beta: [B, T, h]; state: [B, h, dk, dv] fp32.

    Returns (out [B, T, h, dv] in q's dtype, final state [B, h, dk, dv] fp32).
    """
    out_dtype = q.dtype
    B, T, h, dk = k.shape
    dv = v.shape[-1]
    q, k, v, beta, g = _prepare(q, k, v, beta, g)
    q = q * dk ** -0.5
    pad = (CHUNK_SIZE - T % CHUNK_SIZE) % CHUNK_SIZE
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    n_chunks = (T + pad) // CHUNK_SIZE
    v_beta = v * beta.unsqueeze(-1)
    k_beta = k * beta.unsqueeze(-1)
    q, k, k_beta, v_beta = (x.reshape(B, h, n_chunks, CHUNK_SIZE, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    g = g.reshape(B, h, n_chunks, CHUNK_SIZE)
    upper = torch.ones(CHUNK_SIZE, CHUNK_SIZE, dtype=torch.bool, device=q.device).triu(1)
    cum = g.cumsum(dim=3)  # [B, h, N, C]
    decay = (cum.unsqueeze(4) - cum.unsqueeze(3)).masked_fill(upper, float("-inf")).exp()  # [B, h, N, C, C]
    ut = (k_beta @ k.transpose(-1, -2)) * decay
    intra = (q @ k.transpose(-1, -2)) * decay
    decayed_k_beta = k_beta * cum.exp().unsqueeze(-1)
    new_v = torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)
    k_cum = torch.linalg.solve_triangular(ut, decayed_k_beta, upper=False, unitriangular=True)
    state = (torch.zeros(B, h, dk, dv, dtype=torch.float32, device=q.device)
             if initial_state is None else initial_state.to(new_v))
    out = torch.zeros_like(new_v)
    q = q * cum.exp().unsqueeze(-1)
    k = k * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    chunk_decay = cum[..., -1].exp()[..., None, None]
    for i in range(n_chunks):
        v_new = new_v[:, :, i] - k_cum[:, :, i] @ state
        out[:, :, i] = q[:, :, i] @ state + intra[:, :, i] @ v_new
        state = state * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(B, h, -1, dv)[:, :, :T]
    return out.transpose(1, 2).to(out_dtype, memory_format=torch.contiguous_format), state


def recurrent_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor,
) -> tuple[Tensor, Tensor]:
    """Same shapes as `chunk_gated_delta_rule`; steps token by token (decode, T = 1)."""
    out_dtype = q.dtype
    dk = k.shape[-1]
    q, k, v, beta, g = _prepare(q, k, v, beta, g)
    q = q / dk ** 0.5
    state = initial_state.to(v)
    out = torch.zeros_like(v)  # [B, h, T, dv]
    for t in range(v.shape[2]):
        state = state * g[:, :, t].exp()[..., None, None]
        kv_mem = (state * k[:, :, t].unsqueeze(-1)).sum(dim=-2)  # [B, h, dv]
        delta = (v[:, :, t] - kv_mem) * beta[:, :, t].unsqueeze(-1)
        state = state + k[:, :, t].unsqueeze(-1) * delta.unsqueeze(-2)
        out[:, :, t] = (state * q[:, :, t].unsqueeze(-1)).sum(dim=-2)
    return out.transpose(1, 2).contiguous().to(out_dtype), state


def gated_delta_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor) -> Tensor:
    """One token of each of B sequences: q, k [B, h, dk]; v [B, h, dv]; g, beta [B, h]; state [B, h, dk, dv]
    fp32 and contiguous, updated in place. Returns out [B, h, dv] in q's dtype. Equal to
    `recurrent_gated_delta_rule` at T = 1 up to fp32 rounding (matmul reductions over dk)."""
    out_dtype = q.dtype
    B, h, dk = k.shape
    dv = v.shape[-1]
    q, k, v, beta, g = (x.to(torch.float32) for x in (q, k, v, beta, g))
    q = l2norm(q) * dk ** -0.5
    k = l2norm(k)
    flat = state.view(B * h, dk, dv)
    state.mul_(g.exp()[..., None, None])
    kv_mem = torch.bmm(k.reshape(B * h, 1, dk), flat)  # [B·h, 1, dv]
    delta = (v.reshape(B * h, 1, dv) - kv_mem) * beta.reshape(B * h, 1, 1)
    flat.baddbmm_(k.reshape(B * h, dk, 1), delta)  # S += k ⊗ δ
    out = torch.bmm(q.reshape(B * h, 1, dk), flat)  # read after the update
    return out.view(B, h, dv).to(out_dtype)
