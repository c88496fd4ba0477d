"""A fixed batch of sequences run through the head model outside the engine: the benches' one way to
prefill B prompts and then take decode steps (bench model, bench step and bench gpu time exactly this).

B = sequences, L = prompt length, V = vocab.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nextserve.cluster.engine.engine import split_micro_batches
from nextserve.model.cache import SequenceCache
from nextserve.model.expert_backend import ExpertBackend
from nextserve.model.forward_batch import ForwardBatch
from nextserve.model.qwen3_next import HeadModel


class HeadBatch:
    def __init__(self, head: HeadModel, batch: int, device: torch.device) -> None:
        self.head, self.device = head, device
        self.caches = [SequenceCache.empty(head.config) for _ in range(batch)]

    def prefill(self, prompts: Tensor, experts: ExpertBackend) -> Tensor:
        """prompts [B, L] -> logits [B, V] of each prompt's last token."""
        B, L = prompts.shape
        return self.head(prompts.reshape(-1).to(self.device), ForwardBatch.build([L] * B, self.caches, self.device),
                         experts)

    def decode(self, ids: Tensor, experts: ExpertBackend, micro_batches: int = 1) -> Tensor:
        """ids [B], one new token per sequence -> logits [B, V]; split as the engine splits a step."""
        parts = [(ids[lo:hi].to(self.device), ForwardBatch.build([1] * (hi - lo), self.caches[lo:hi], self.device))
                 for lo, hi in split_micro_batches([1] * len(self.caches), micro_batches, 1)]
        return self.head.forward_micro_batches(parts, experts)
