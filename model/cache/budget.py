"""The head's cache budget: how many bytes the hybrid cache may hold, and what they buy.

A head preallocates its whole cache at start (model/cache/pools.py): KV blocks of `block_size` tokens for the
full-attention layers, one state slot per running sequence for the DeltaNet layers, and the prefix
cache's state snapshots (a slot's worth each). `cache_capacity` turns a byte budget into those counts; the engine and the capacity planner (`nextserve plan`) both
call it, so they compute the same numbers. Pure arithmetic over `ModelSizes`; no tensors, no I/O.

    bytes_per_block = block_size * kv_bytes_per_token            (K and V, every full-attention layer)
    bytes_per_slot  = deltanet_state_bytes_per_sequence          (conv + fp32 recurrent, every DeltaNet layer)
    num_snapshots   = budget * prefix_snapshot_memory_fraction // bytes_per_slot     (0 when disabled, and
                      fewer when the rest could not hold one sequence); budget -= their bytes
    kv_reserve      = min(one sequence at max_model_len, budget / 2)
    num_slots       = min(max_num_seqs, (budget - kv_reserve) // bytes_per_slot)            (>= 1)
    num_blocks      = min((budget - num_slots * bytes_per_slot) // bytes_per_block,
                          num_slots * ceil(max_model_len / block_size))                      (>= 1)

The reserve keeps one full-context sequence admissible when the budget allows it, without letting the
state slots of a small budget starve the KV blocks (the published model's state is 74 MiB a sequence).
Blocks past what every slot at full context could use are never allocated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nextserve.model.config import ConfigError
from nextserve.model.sizes import ModelSizes

MiB = 2**20
GiB = 2**30

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 2**10, "m": 1000**2, "mb": 1000**2, "mib": MiB,
          "g": 1000**3, "gb": 1000**3, "gib": GiB, "t": 1000**4, "tb": 1000**4, "tib": 2**40}


class CacheConfigError(ConfigError):
    """A cache budget that cannot hold one sequence; names the sizes and the fix."""


@dataclass(frozen=True)
class CacheConfig:
    cache_memory_bytes: int = 4 * GiB
    """Bytes the head's cache may hold (KV blocks + DeltaNet state slots), allocated at engine start.
    4 GiB: on the published model, 27 sequences' state and 89k tokens of KV; the tiny and test models use
    a sliver of it (blocks no slot could fill are not allocated). CPU pages are touched only as blocks are
    handed out, so an unused budget costs address space, not memory."""
    block_size: int = 16
    """Tokens per KV block. 16 as vLLM: a sequence wastes < 16 tokens of KV; larger blocks (32, 64) mean
    fewer table entries and gathers per decode, at more waste."""
    enable_prefix_cache: bool = True
    """Keep full KV blocks and DeltaNet state snapshots after their sequence, so a request that resends a
    prefix (an agent's system prompt, tools and conversation so far) prefills only what is new."""
    prefix_snapshot_every: int = 256
    """Tokens between the state snapshots a prefill takes (a multiple of block_size): a hit restores the
    last snapshot inside the shared prefix, so up to this many shared tokens are run again. 256: on the
    published model a snapshot (74 MiB) costs as much as ~3,200 tokens of KV, so one per 256 tokens keeps
    the pool from flooding on a long prompt while re-running at most one prefill chunk."""
    prefix_snapshot_memory_fraction: float = 0.2
    """Share of cache_memory_bytes for the snapshot pool. 0.2: on the published model at 4 GiB, 11
    snapshots beside 22 running sequences (27 without them); enough for the last boundary of a few conversations plus the
    snapshots of a shared system prompt. The snapshots' blocks come out of the rest of the budget."""

    def __post_init__(self) -> None:
        if self.cache_memory_bytes < 1:
            raise CacheConfigError(f"cache_memory_bytes must be >= 1, got {self.cache_memory_bytes}")
        if not 1 <= self.block_size <= 1024:
            raise CacheConfigError(f"block_size must be in [1, 1024] tokens (16-64 serve best), got {self.block_size}")
        if self.prefix_snapshot_every < 1 or self.prefix_snapshot_every % self.block_size:
            raise CacheConfigError(f"prefix_snapshot_every ({self.prefix_snapshot_every}) must be a positive multiple "
                                   f"of block_size ({self.block_size}); e.g. {self.block_size * 16}")
        if not 0 <= self.prefix_snapshot_memory_fraction < 1:
            raise CacheConfigError(f"prefix_snapshot_memory_fraction must be in [0, 1), got "
                                   f"{self.prefix_snapshot_memory_fraction}")


@dataclass(frozen=True)
class CacheCapacity:
    block_size: int
    num_blocks: int
    num_slots: int
    """State slots: the most sequences that can run at once."""
    bytes_per_block: int
    bytes_per_slot: int
    max_model_len: int
    num_snapshots: int = 0
    """Prefix-cache state snapshots (bytes_per_slot each); 0: no prefix cache."""
    snapshot_every: int = CacheConfig.prefix_snapshot_every

    @property
    def max_tokens(self) -> int:
        """Tokens the KV blocks hold in all, and so the most one sequence can hold."""
        return self.num_blocks * self.block_size

    @property
    def max_blocks_per_seq(self) -> int:
        """Entries of a block table: a sequence never holds more blocks than its context or the pool."""
        return min(self.num_blocks, -(-self.max_model_len // self.block_size))

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block + (self.num_slots + self.num_snapshots) * self.bytes_per_slot

    def describe(self) -> str:
        return (f"{self.num_blocks} KV blocks of {self.block_size} tokens ({self.max_tokens} tokens) and "
                f"{self.num_slots} state slots (sequences), {self.num_snapshots} prefix-cache snapshots, "
                f"{self.total_bytes / MiB:.1f} MiB")


def snapshot_count(sizes: ModelSizes, cache: CacheConfig) -> int:
    """The prefix cache's state snapshots in `cache`'s budget: its share, leaving room for one sequence."""
    bytes_per_block = cache.block_size * sizes.kv_bytes_per_token
    bytes_per_slot, budget = sizes.deltanet_state_bytes_per_sequence, cache.cache_memory_bytes
    if not cache.enable_prefix_cache or not bytes_per_slot:
        return 0
    return max(0, min(int(budget * cache.prefix_snapshot_memory_fraction) // bytes_per_slot,
                      (budget - bytes_per_block - bytes_per_slot) // bytes_per_slot))


def cache_capacity(sizes: ModelSizes, cache: CacheConfig, max_num_seqs: int, max_model_len: int) -> CacheCapacity:
    """KV blocks and state slots that `cache.cache_memory_bytes` buys (see the module docstring)."""
    budget, bs = cache.cache_memory_bytes, cache.block_size
    bytes_per_block = bs * sizes.kv_bytes_per_token
    bytes_per_slot = sizes.deltanet_state_bytes_per_sequence
    if budget < bytes_per_block + bytes_per_slot:
        raise CacheConfigError(f"a cache of {budget:,} B cannot hold one sequence: one state slot is "
                               f"{bytes_per_slot:,} B and one KV block of {bs} tokens {bytes_per_block:,} B; "
                               f"raise --cache-memory to at least {bytes_per_slot + bytes_per_block:,} B")
    num_snapshots = snapshot_count(sizes, cache)
    budget -= num_snapshots * bytes_per_slot
    blocks_per_seq = -(-max_model_len // bs)
    kv_reserve = min(blocks_per_seq * bytes_per_block, budget // 2)
    # max(..., 1): a model without DeltaNet layers has 0-byte slots, then the count is max_num_seqs.
    by_budget = (budget - kv_reserve) // bytes_per_slot if bytes_per_slot else max_num_seqs
    num_slots = max(1, min(max_num_seqs, by_budget))
    by_budget = (budget - num_slots * bytes_per_slot) // bytes_per_block if bytes_per_block else blocks_per_seq
    num_blocks = max(1, min(by_budget, num_slots * blocks_per_seq))
    return CacheCapacity(bs, num_blocks, num_slots, bytes_per_block, bytes_per_slot, max_model_len, num_snapshots,
                         cache.prefix_snapshot_every)


def parse_memory_size(text: str) -> int:
    """'512MiB', '40GiB', '1.5G', '1000000' -> bytes (k/M/G/T are powers of 1000, KiB/MiB/GiB/TiB of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise CacheConfigError(f"memory size {text!r} is not a number with an optional unit, e.g. 512MiB or 40GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_memory_size(nbytes: int) -> str:
    """bytes -> the text parse_memory_size reads back to them, in the largest binary unit that divides
    them (4 * GiB -> '4GiB'); how a default budget is shown (`nextserve up --help`)."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if nbytes and nbytes % _UNITS[unit.lower()] == 0:
            return f"{nbytes // _UNITS[unit.lower()]}{unit}"
    return str(nbytes)


def parse_cache_memory(text: str, device_free_bytes: int | None) -> int:
    """`--cache-memory` -> bytes: a size (see parse_memory_size), or a fraction in (0, 1) such as `0.9` of
    `device_free_bytes` (a GPU head's memory left after its weights, as vLLM's gpu_memory_utilization)."""
    try:
        fraction = float(text)
    except ValueError:
        return parse_memory_size(text)
    if not 0 < fraction < 1:
        return parse_memory_size(text)
    if device_free_bytes is None:
        raise CacheConfigError(f"cache memory {text!r} is a fraction of a GPU's free memory, and this head has no "
                               f"GPU; give a size such as 4GiB")
    return int(fraction * device_free_bytes)
