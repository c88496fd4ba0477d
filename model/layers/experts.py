"""Routed-expert SwiGLU math for a batch of (token, expert, weight) assignments.

The one place the routed experts are computed: the local backend and the gRPC expert worker both
call `experts_forward`, so a distributed MoE block runs the same arithmetic as a local one.

Letters: T = tokens, H = hidden, I = moe intermediate, E = experts held here, A = assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True, slots=True)
class Assignments:
    """A layer's routing as flat (token, expert, weight) triples, the one record for it across the tree:
    the router plans dispatch with global expert ids, a worker computes with ids into the stacked
    weights it holds. From `from_topk` they are token-major (token non-decreasing)."""
    token: Tensor   # [A] int64 in [0, T)
    expert: Tensor  # [A] int64 expert ids
    weight: Tensor  # [A] model dtype

    @classmethod
    def from_topk(cls, ids: Tensor, weights: Tensor) -> "Assignments":
        """ids, weights [T, k] -> A = T·k triples in token-major order."""
        T, k = ids.shape
        token = torch.arange(T, device=ids.device).repeat_interleave(k)
        return cls(token=token, expert=ids.reshape(-1).to(torch.int64), weight=weights.reshape(-1))


def _swiglu_grouped(x_sorted: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """x_sorted [A, H] grouped by expert, counts [E] -> [A, H]: one grouped GEMM per projection."""
    inter = down.shape[-1]
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    gu = F.grouped_mm(x_sorted, gate_up.transpose(1, 2), offs=offs)  # [A, 2I]
    return F.grouped_mm(F.silu(gu[:, :inter]) * gu[:, inter:], down.transpose(1, 2), offs=offs)


def _swiglu_per_expert(x_sorted: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """Same contract as `_swiglu_grouped`: one gate_up and one down matmul per active expert."""
    inter = down.shape[-1]
    y_sorted = torch.empty_like(x_sorted)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            gu = F.linear(x_sorted[start:start + n], gate_up[e])  # [n, 2I]
            y_sorted[start:start + n] = F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], down[e])
            start += n
    return y_sorted


def _has_grouped_gemm(x: Tensor) -> bool:
    # torch's grouped GEMM runs on CPU in any float dtype; on CUDA it needs bfloat16 (Hopper kernels).
    return hasattr(F, "grouped_mm") and (x.device.type == "cpu" or x.dtype == torch.bfloat16)


def experts_forward(hidden: Tensor, assign: Assignments, gate_up: Tensor, down: Tensor) -> Tensor:
    """hidden [T, H]; gate_up [E, 2I, H] (gate rows first); down [E, H, I] -> [T, H].

    out[t] = Σ_{a: token[a]=t} weight[a] · down_e(silu(gate_e x_t) · up_e x_t). Assignments are sorted
    by expert (stable), run as a grouped GEMM (the two give bitwise-equal results on CPU), weighted, and
    scatter-added per token in that fixed order, so a result is reproducible.
    """
    out = torch.zeros_like(hidden)
    if assign.token.numel() == 0:
        return out
    order = torch.argsort(assign.expert, stable=True)
    tok_sorted = assign.token[order]
    x_sorted = hidden[tok_sorted]  # [A, H]
    counts = torch.bincount(assign.expert, minlength=gate_up.shape[0])  # [E]
    swiglu = _swiglu_grouped if _has_grouped_gemm(hidden) else _swiglu_per_expert
    y_sorted = swiglu(x_sorted, counts, gate_up, down)
    out.index_add_(0, tok_sorted, y_sorted * assign.weight[order, None])
    return out
