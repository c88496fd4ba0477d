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


@dataclass(frozen=True)
class Assignments:
    """Flat (token, expert, weight) triples; `expert` indexes the stacked weights held here."""
    token: Tensor   # [A] int64 in [0, T)
    expert: Tensor  # [A] int64 in [0, E)
    weight: Tensor  # [A] model dtype

    @classmethod
    def from_topk(cls, ids: Tensor, weights: Tensor) -> "Assignments":
        """ids, weights [T, k] -> A = T·k triples in token-major order."""
        T, k = ids.shape
        token = torch.arange(T, device=ids.device).repeat_interleave(k)
        return cls(token=token, expert=ids.reshape(-1), weight=weights.reshape(-1))


def experts_forward(hidden: Tensor, assign: Assignments, gate_up: Tensor, down: Tensor) -> Tensor:
    """hidden [T, H]; gate_up [E, 2I, H] (gate rows first); down [E, H, I] -> [T, H].

    out[t] = Σ_{a: token[a]=t} weight[a] · down_e(silu(gate_e x_t) · up_e x_t). Assignments are grouped
    by expert (one gate_up and one down matmul per active expert) and scatter-added per token; the
    order of the adds is fixed by the stable sort, so a result is reproducible.
    """
    out = torch.zeros_like(hidden)
    if assign.token.numel() == 0:
        return out
    inter = down.shape[-1]
    order = torch.argsort(assign.expert, stable=True)
    experts_sorted = assign.expert[order]
    counts = torch.bincount(experts_sorted, minlength=gate_up.shape[0]).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = order[start:start + n]
        start += n
        tok = assign.token[sel]
        gu = F.linear(hidden[tok], gate_up[e])  # [n, 2I]
        y = F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], down[e])  # [n, H]
        out.index_add_(0, tok, y * assign.weight[sel, None])
    return out
