"""The head's hybrid cache: pools preallocated once, which every running sequence indexes into.

    DeltaNet layer i   conv[i]              [S, C, K]          model dtype  the last K pre-conv inputs
                       recurrent[i]         [S, nv, dk, dv]    fp32         the delta-rule state
    attention layer i  key[i], value[i]     [N, bs, nkv, hd]   model dtype  post-norm, post-RoPE K and V
    MTP layer i        key[i], value[i]     [N, bs, nkv, hd]   model dtype  the same, for its rows (i =
                                                                            num_hidden_layers + j)
    all layers         block_table          [S, max_blocks]    int64        each slot's blocks, in order
    DeltaNet layer i   snapshot_conv[i]     [P, C, K]          model dtype  prefix-cache snapshots of
                       snapshot_recurrent[i][P, nv, dk, dv]    fp32         the states at a block boundary

A sequence owns one slot (its DeltaNet states and its block-table row) for its life, and the blocks
holding its tokens: token p lives at row p % bs of block block_table[slot, p // bs]. The MTP layer's row p (its pass over
(t_{p+1}, h_p), written in the step that computes h_p) lives at the same place in its own pools, so its
cache follows the sequence's blocks (allocation, preemption, prefix sharing) with no bookkeeping of its own.
Which sequence owns
which slot and blocks is decided outside (model/cache/block_manager.py); this file holds the tensors,
so a step reads and writes every sequence's state by index, never one sequence at a time. A full block
may be in several sequences' tables at once (the prefix cache shares it; nobody writes it again), and a
snapshot is copied into a slot to resume a cached prefix, or out of one after a step (one indexed copy
per DeltaNet layer for all the step's sequences).

What a decode step gathers (the decodes' K/V blocks, their recurrent states when their slots are not one
run) lands in workspaces kept across steps and layers, grown to the largest step seen: a fresh buffer of
that size per layer costs more in page faults than the copy itself (measured 4.7x on the CPU at 256
sequences of 512 tokens). They sit outside the budget and hold at most one layer's gather at a time.

Letters: S = state slots, P = state snapshots, N = KV blocks, bs = block size, C = conv channels ([Q | K | V] order),
K = conv kernel, nv = value heads, dk / dv = DeltaNet head dims, nkv = kv heads, hd = head dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nextserve.model.config import LayerType, Qwen3NextConfig


class HybridCache:
    def __init__(self, config: Qwen3NextConfig, num_slots: int, num_blocks: int, block_size: int,
                 max_blocks_per_seq: int, dtype: torch.dtype, device: torch.device, num_snapshots: int = 0) -> None:
        """Uninitialised pools (pages are touched as they are used): a slot's states are zeroed by the
        first chunk of its sequence (model/layers/deltanet.py), a block when it is assigned."""
        self.num_slots, self.num_blocks, self.block_size = num_slots, num_blocks, block_size
        S, N, bs = num_slots, num_blocks, block_size
        self.conv: dict[int, Tensor] = {}
        self.recurrent: dict[int, Tensor] = {}
        self.key: dict[int, Tensor] = {}
        self.value: dict[int, Tensor] = {}
        self.snapshot_conv: dict[int, Tensor] = {}
        self.snapshot_recurrent: dict[int, Tensor] = {}
        for i, kind in enumerate(config.layer_types):
            if kind is LayerType.LINEAR_ATTENTION:
                conv = (config.linear_conv_dim, config.linear_conv_kernel_dim)
                recurrent = (config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim)
                self.conv[i] = torch.empty(S, *conv, dtype=dtype, device=device)
                self.recurrent[i] = torch.empty(S, *recurrent, dtype=torch.float32, device=device)
                self.snapshot_conv[i] = torch.empty(num_snapshots, *conv, dtype=dtype, device=device)
                self.snapshot_recurrent[i] = torch.empty(num_snapshots, *recurrent, dtype=torch.float32,
                                                         device=device)
            else:
                shape = (N, bs, config.num_key_value_heads, config.head_dim)
                self.key[i] = torch.empty(shape, dtype=dtype, device=device)
                self.value[i] = torch.empty(shape, dtype=dtype, device=device)
        for i in config.mtp_layers:  # the MTP layers' attention: rows at the same positions, same block table
            shape = (N, bs, config.num_key_value_heads, config.head_dim)
            self.key[i] = torch.empty(shape, dtype=dtype, device=device)
            self.value[i] = torch.empty(shape, dtype=dtype, device=device)
        self.block_table = torch.zeros(S, max_blocks_per_seq, dtype=torch.int64, device=device)
        """Entries past a sequence's own blocks are stale or 0: a batched decode reads them masked."""
        self._kv_workspace = torch.empty(0, dtype=dtype, device=device)
        self._state_workspace = torch.empty(0, dtype=torch.float32, device=device)
        self._zero_blocks(torch.zeros(1, dtype=torch.int64, device=device))  # what a fresh table points at

    @classmethod
    def contiguous(cls, config: Qwen3NextConfig, num_seqs: int, max_tokens: int, block_size: int,
                   dtype: torch.dtype, device: torch.device) -> "HybridCache":
        """A cache for a fixed batch (benchmarks, tests): sequence i in slot i, holding up to `max_tokens`
        tokens in its own run of blocks."""
        per_seq = -(-max_tokens // block_size)
        cache = cls(config, num_seqs, num_seqs * per_seq, block_size, per_seq, dtype, device)
        slots = [s for s in range(num_seqs) for _ in range(per_seq)]
        cache.assign_blocks(slots, list(range(per_seq)) * num_seqs, list(range(num_seqs * per_seq)))
        return cache

    @property
    def device(self) -> torch.device:
        return self.block_table.device

    def assign_blocks(self, slots: Sequence[int], indices: Sequence[int], blocks: Sequence[int],
                      zero: bool = True) -> None:
        """The sequence in slots[j] holds block blocks[j] as its indices[j]-th (one table write for all).
        New blocks are zeroed: a batched decode reads whole blocks, masked past each sequence's length,
        and a masked NaN of uninitialised memory would still poison the softmax-weighted sum. Shared
        (prefix-cached) blocks are not: `zero` False."""
        to = dict(dtype=torch.int64, device=self.device)
        block_ids = torch.tensor(blocks, **to)
        self.block_table[torch.tensor(slots, **to), torch.tensor(indices, **to)] = block_ids
        if zero:
            self._zero_blocks(block_ids)

    def restore_states(self, snapshots: Sequence[int], slots: Sequence[int]) -> None:
        """Every DeltaNet layer's conv and recurrent state of slots[j] := snapshot snapshots[j]."""
        self._copy_states(self.snapshot_conv, self.snapshot_recurrent, snapshots, self.conv, self.recurrent, slots)

    def save_states(self, slots: Sequence[int], snapshots: Sequence[int]) -> None:
        """Snapshot snapshots[j] := every DeltaNet layer's conv and recurrent state of slots[j]."""
        self._copy_states(self.conv, self.recurrent, slots, self.snapshot_conv, self.snapshot_recurrent, snapshots)

    def _copy_states(self, src_conv: dict[int, Tensor], src_recurrent: dict[int, Tensor], src: Sequence[int],
                     dst_conv: dict[int, Tensor], dst_recurrent: dict[int, Tensor], dst: Sequence[int]) -> None:
        to = dict(dtype=torch.int64, device=self.device)
        src_ids, dst_ids = torch.tensor(src, **to), torch.tensor(dst, **to)
        for i in src_conv:  # [n, C, K] and [n, nv, dk, dv] per layer, one gather and one scatter each
            dst_conv[i].index_copy_(0, dst_ids, src_conv[i].index_select(0, src_ids))
            dst_recurrent[i].index_copy_(0, dst_ids, src_recurrent[i].index_select(0, src_ids))

    def gather_kv(self, layer: int, blocks: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [n, bs, nkv, hd] of an attention layer's `blocks` [n], in the KV workspace
        (valid until the next gather)."""
        pool, n = self.key[layer], blocks.numel()
        if self._kv_workspace.numel() < 2 * n * pool[0].numel():
            self._kv_workspace = pool.new_empty(2 * max(n, 2 * self._kv_workspace.numel() // (2 * pool[0].numel())),
                                                *pool.shape[1:])
        key, value = self._kv_workspace[:n], self._kv_workspace[n:2 * n]
        torch.index_select(pool, 0, blocks, out=key)
        torch.index_select(self.value[layer], 0, blocks, out=value)
        return key, value

    def gather_recurrent(self, layer: int, slots: Tensor) -> Tensor:
        """Recurrent states [n, nv, dk, dv] of a DeltaNet layer's `slots` [n], in the state workspace
        (valid until the next gather; write them back with `index_copy_`)."""
        pool, n = self.recurrent[layer], slots.numel()
        if self._state_workspace.numel() < n * pool[0].numel():
            self._state_workspace = pool.new_empty(max(n, 2 * self._state_workspace.numel() // pool[0].numel()),
                                                   *pool.shape[1:])
        return torch.index_select(pool, 0, slots, out=self._state_workspace[:n])

    def _zero_blocks(self, block_ids: Tensor) -> None:
        for pool in (*self.key.values(), *self.value.values()):
            pool.index_fill_(0, block_ids, 0)

    def nbytes(self) -> int:
        pools = (*self.conv.values(), *self.recurrent.values(), *self.key.values(), *self.value.values(),
                 *self.snapshot_conv.values(), *self.snapshot_recurrent.values())
        return sum(t.nbytes for t in pools) + self.block_table.nbytes
