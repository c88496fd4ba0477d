"""The head model over its pooled cache: one scheduled step (a `StepPlan`) in, logits out.

    StepPlan --new and shared blocks--> HybridCache.block_table (one write each)
             --restores--> snapshots into the admitted sequences' slots (prefix-cache hits)
             --sequences--> micro-batches of ForwardBatch (positions, slots, block rows)
             --> HeadModel.forward_micro_batches --> logits [R, V], rows in plan order (one per sequence,
                 k + 1 for a sequence verifying k drafts)
             --saves--> slots' states into snapshots (sequences that reached a snapshot boundary)
    roll_back(slot -> positions kept): a verify chunk's rejected positions undone (DeltaNet states)

Rollback of a verify chunk (speculative decoding): its K/V rows past the last accepted position stay in
the blocks unread (attention masks by length, and the next step writes those rows again; the scheduler
gives back the blocks past the kept tokens); its DeltaNet conv and recurrent states are set to the
states after the last accepted position, which the verify pass kept for every position
(ForwardBatch.verify_states). Keeping them costs (k + 1) states per verifying sequence and DeltaNet layer
for one step, against replaying the accepted tokens' recurrence from a copy of the state before the step;
kept because the accepted states come out of the decode arithmetic itself (nothing recomputed) and the
drafting batch is small (SpeculativeConfig.disable_by_batch_size).

The runner allocates the cache once, at start, from the budget (`cache_capacity`); the scheduler decides
which sequence holds which slot and blocks, and counts the tokens each has in the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from nextserve.cluster.engine.scheduler import SchedulerConfig, StepPlan
from nextserve.model.cache.pools import HybridCache
from nextserve.model.cache.budget import CacheCapacity, CacheConfig, cache_capacity
from nextserve.model.expert_backend import ExpertBackend
from nextserve.model.forward_batch import ForwardBatch
from nextserve.model.qwen3_next import HeadModel
from nextserve.model.sizes import model_sizes

log = logging.getLogger(__name__)


def split_micro_batches(num_tokens: Sequence[int], parts: int, min_seqs: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges of the step's sequences, about equal in tokens, each with at least
    `min_seqs` sequences (fewer parts when there are too few sequences)."""
    parts = max(1, min(parts, len(num_tokens) // min_seqs))
    total, bounds, acc, lo = sum(num_tokens), [], 0, 0
    for i, n in enumerate(num_tokens):
        acc += n
        remaining_parts = parts - len(bounds) - 1
        if remaining_parts and acc >= total * (len(bounds) + 1) / parts and i + 1 - lo >= min_seqs \
                and len(num_tokens) - (i + 1) >= remaining_parts * min_seqs:
            bounds.append((lo, i + 1))
            lo = i + 1
    bounds.append((lo, len(num_tokens)))
    return bounds


def head_cache_capacity(head: HeadModel, cache: CacheConfig, max_num_seqs: int, max_model_len: int) -> CacheCapacity:
    """What `cache` buys for this head's model and dtype (the planner's `cache_capacity`, on the head)."""
    return cache_capacity(model_sizes(head.config, head.lm_head.weight.dtype), cache, max_num_seqs, max_model_len)


class ModelRunner:
    def __init__(self, head: HeadModel, experts: ExpertBackend, capacity: CacheCapacity,
                 config: SchedulerConfig, keep_hidden_states: bool = False) -> None:
        """`keep_hidden_states`: every step keeps its final-norm hidden states in `hidden` (a drafter's)."""
        self.head, self.experts, self.config = head, experts, config
        self.keep_hidden_states = keep_hidden_states
        self.hidden: Tensor | None = None
        """[T, H] the last step's hidden states of every token, in plan order (with keep_hidden_states)."""
        self._batches: list[ForwardBatch] = []  # the last step's, while its verify states may be rolled back
        device = head.lm_head.weight.device
        self.cache = HybridCache(head.config, capacity.num_slots, capacity.num_blocks, capacity.block_size,
                                 capacity.max_blocks_per_seq, head.lm_head.weight.dtype, device,
                                 capacity.num_snapshots)
        log.info("head cache: %s", capacity.describe())

    def run(self, plan: StepPlan) -> Tensor:
        """The plan's sequences through the head -> logits [R, V] of each one's last new token, and of
        every token of a verify chunk (a sequence with drafts)."""
        if plan.new_blocks:
            slots, indices, blocks = zip(*plan.new_blocks)
            self.cache.assign_blocks(slots, indices, blocks)
        if plan.shared_blocks:
            slots, indices, blocks = zip(*plan.shared_blocks)
            self.cache.assign_blocks(slots, indices, blocks, zero=False)
        if plan.restores:
            self.cache.restore_states(*zip(*plan.restores))
        items = plan.scheduled
        inputs = [item.input_ids() for item in items]
        parts = []
        for lo, hi in split_micro_batches([len(x) for x in inputs], self.config.micro_batches,
                                          self.config.min_micro_batch_seqs):
            seqs = [item.seq for item in items[lo:hi]]
            batch = ForwardBatch.build([len(x) for x in inputs[lo:hi]], [s.num_computed_tokens for s in seqs],
                                       [s.slot for s in seqs], self.cache,
                                       [item.num_draft_tokens > 0 for item in items[lo:hi]])
            ids = torch.tensor([t for x in inputs[lo:hi] for t in x], dtype=torch.int64, device=self.cache.device)
            parts.append((ids, batch))
        if self.keep_hidden_states:
            logits, self.hidden = self.head.forward_micro_batches(parts, self.experts, with_hidden=True)
        else:
            logits = self.head.forward_micro_batches(parts, self.experts)  # rows in plan order
        if plan.saves:
            self.cache.save_states(*zip(*plan.saves))
        self._batches = [batch for _, batch in parts if batch.verify_groups]
        return logits

    def roll_back(self, kept: dict[int, int]) -> None:
        """Slot -> positions of its last step's verify chunk that stay (1 .. k + 1): the DeltaNet states of
        each slot keeping fewer than all become the states after its last kept position."""
        for batch in self._batches:
            for (layer, i), (conv_after, rec_after) in batch.verify_states.items():
                group = batch.verify_groups[i]
                t = conv_after.shape[1]
                rows = [b for b, slot in enumerate(group.slots.tolist()) if kept.get(slot, t) < t]
                if not rows:
                    continue
                at = torch.tensor(rows, dtype=torch.int64, device=self.cache.device)
                pos = torch.tensor([kept[group.slots[b].item()] - 1 for b in rows], dtype=torch.int64,
                                   device=self.cache.device)
                self.cache.conv[layer].index_copy_(0, group.slots[at], conv_after[at, pos])
                self.cache.recurrent[layer].index_copy_(0, group.slots[at], rec_after[at, pos])
        self._batches = []
