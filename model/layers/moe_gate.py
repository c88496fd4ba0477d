"""The MoE router gate, MODEL.md §6: softmax over all E (fp32) -> top-k -> renormalise -> cast back.

Letters: T = tokens, H = hidden, E = routed experts, k = experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MoEGate(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, H] -> (expert ids [T, k] int64, weights [T, k] in the model dtype)."""
        logits = F.linear(x, self.weight)  # [T, E], model dtype
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(logits.dtype)
