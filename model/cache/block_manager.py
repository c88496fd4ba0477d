"""Who owns which part of the head's cache pools: DeltaNet state slots, KV blocks and state snapshots.

Pure bookkeeping over ids (the tensors are model/cache/pools.py's): a running sequence holds one slot for its
life and references the blocks its tokens fill. Slots come off a stack (the most recently freed first),
in O(1); blocks and snapshots are the prefix cache's (model/cache/prefix_cache.py: refcounts, keys,
LRU), so a block a sequence releases may stay cached for the next request with the same prefix.
Freeing an id that is already free (or was never handed out) raises, so a double free shows at once
instead of two sequences writing one block.
"""

from __future__ import annotations

from nextserve.model.cache.prefix_cache import CacheAccountingError, PrefixCache


class _IdPool:
    def __init__(self, kind: str, size: int) -> None:
        if size < 1:
            raise ValueError(f"a pool of {kind}s needs >= 1 of them, got {size}")
        self.kind, self.size = kind, size
        self._free = list(range(size - 1, -1, -1))  # a stack: the lowest ids go first at start
        self._is_free = [True] * size

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CacheAccountingError(f"{n} {self.kind}s asked for, {len(self._free)} free; check can_allocate first")
        ids = [self._free.pop() for _ in range(n)]
        for i in ids:
            self._is_free[i] = False
        return ids

    def give_back(self, ids: list[int]) -> None:
        for i in ids:
            if not 0 <= i < self.size:
                raise CacheAccountingError(f"{self.kind} {i} does not exist (pool of {self.size})")
            if self._is_free[i]:
                raise CacheAccountingError(f"{self.kind} {i} is freed twice")
            self._is_free[i] = True
            self._free.append(i)


class BlockManager:
    def __init__(self, num_blocks: int, num_slots: int, block_size: int, num_snapshots: int = 0,
                 snapshot_every: int | None = None) -> None:
        """`num_snapshots` > 0 turns the prefix cache on: full blocks are keyed and kept after their
        sequence, and state snapshots are taken every `snapshot_every` tokens (a multiple of
        `block_size`) and at each sequence's last block boundary."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        snapshot_every = snapshot_every or block_size
        if snapshot_every % block_size:
            raise ValueError(f"snapshot_every ({snapshot_every}) must be a multiple of block_size ({block_size})")
        self.block_size, self.snapshot_every = block_size, snapshot_every
        self.cache = PrefixCache(num_blocks, num_snapshots)
        self._slots = _IdPool("slot", num_slots)

    @property
    def is_prefix_caching(self) -> bool:
        """Blocks are kept and looked up by content: there are snapshots to restore the DeltaNet state."""
        return self.cache.num_snapshots > 0

    @property
    def num_blocks(self) -> int:
        return self.cache.num_blocks

    @property
    def num_slots(self) -> int:
        return self._slots.size

    @property
    def num_free_blocks(self) -> int:
        """Blocks holding nothing (cached ones are not counted: see num_cached_blocks)."""
        return self.cache.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a prefix no running sequence references: kept until allocation evicts them."""
        return self.cache.num_cached_blocks

    @property
    def num_free_slots(self) -> int:
        return self._slots.num_free

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by running sequences."""
        return self.cache.num_used_blocks

    @property
    def num_used_slots(self) -> int:
        return self._slots.size - self._slots.num_free

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int, slot: bool = False, reusing: list[int] | None = None) -> bool:
        """num_blocks new blocks (evicting cached ones as needed) after acquiring the hit blocks
        `reusing`, and a slot when `slot`."""
        return num_blocks <= self.cache.num_allocatable(reusing or ()) and (not slot or self._slots.num_free > 0)

    def allocate_slot(self) -> int:
        return self._slots.take(1)[0]

    def allocate_blocks(self, n: int) -> list[int]:
        return self.cache.allocate(n)

    def free_slot(self, slot: int) -> None:
        self._slots.give_back([slot])

    def free_blocks(self, blocks: list[int]) -> None:
        """Drop one reference to each block (release a sequence's in reverse, leaves first)."""
        self.cache.release(blocks)
