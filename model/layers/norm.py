"""RMS norms of Qwen3-Next (shared/MODEL.md §3).

`RMSNorm` is zero-centred: the stored weight is an offset, the scale is (1 + w), and the multiply
happens in fp32 before the cast back. `GatedRMSNorm` (inside DeltaNet) uses the plain weight,
multiplies in the model dtype, then gates with silu(z) in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:  # [..., D] -> [..., D]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:  # x, gate: [..., D]
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * xf.to(dtype)
        y = y * F.silu(gate.float())
        return y.to(dtype)


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x * rsqrt(sum(x^2) + eps): the eps is inside the rsqrt (F.normalize clamps instead)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)
