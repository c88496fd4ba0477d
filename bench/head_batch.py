"""A fixed batch of sequences run through the head model outside the engine: the benches' one way to
prefill B prompts and then take decode steps (bench model, bench step and bench gpu time exactly this).

The cache is the engine's pooled one (model/cache/pools.py), laid out contiguously: sequence i in slot i, with
room for its prompt plus `max_new_tokens` decode steps. B = sequences, L = prompt length, V = vocab.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nextserve.cluster.engine.model_runner import split_micro_batches
from nextserve.model.cache.pools import HybridCache
from nextserve.model.cache.budget import CacheConfig
from nextserve.model.expert_backend import ExpertBackend
from nextserve.model.forward_batch import ForwardBatch
from nextserve.model.qwen3_next import HeadModel


class HeadBatch:
    def __init__(self, head: HeadModel, batch: int, device: torch.device, max_new_tokens: int = 1024) -> None:
        """`max_new_tokens`: the decode steps the cache has room for after the prompt."""
        self.head, self.device, self.max_new_tokens = head, device, max_new_tokens
        self.num_cached = [0] * batch
        self.cache: HybridCache | None = None  # sized at prefill, by the prompt length

    def prefill(self, prompts: Tensor, experts: ExpertBackend) -> Tensor:
        """prompts [B, L] -> logits [B, V] of each prompt's last token."""
        B, L = prompts.shape
        self.cache = HybridCache.contiguous(self.head.config, B, L + self.max_new_tokens, CacheConfig.block_size,
                                            self.head.lm_head.weight.dtype, self.device)
        self.num_cached = [0] * B
        batch = ForwardBatch.build([L] * B, self.num_cached, list(range(B)), self.cache)
        logits = self.head(prompts.reshape(-1).to(self.device), batch, experts)
        self.num_cached = [L] * B
        return logits

    def decode(self, ids: Tensor, experts: ExpertBackend, micro_batches: int = 1) -> Tensor:
        """ids [B], one new token per sequence -> logits [B, V]; split as the engine splits a step."""
        if self.cache is None or max(self.num_cached) >= self.cache.block_table.shape[1] * self.cache.block_size:
            raise RuntimeError(f"decode needs a prefill first, and at most max_new_tokens={self.max_new_tokens} steps")
        parts = [(ids[lo:hi].to(self.device), ForwardBatch.build([1] * (hi - lo), self.num_cached[lo:hi],
                                                                 list(range(lo, hi)), self.cache))
                 for lo, hi in split_micro_batches([1] * len(self.num_cached), micro_batches, 1)]
        logits = self.head.forward_micro_batches(parts, experts)
        self.num_cached = [n + 1 for n in self.num_cached]
        return logits
