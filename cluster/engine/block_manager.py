"""Who owns which part of the head's cache pools: free lists of KV blocks and DeltaNet state slots.

Pure bookkeeping over ids (the tensors are model/cache.py's): a running sequence holds one slot for its
life and the blocks its tokens fill. Ids come off a stack (the most recently freed first), in O(1);
freeing an id that is already free (or was never handed out) raises, so a double free shows at once
instead of two sequences sharing a block.
"""

from __future__ import annotations


class CacheAccountingError(RuntimeError):
    """A block or slot freed twice, or one that does not exist: a bug in the caller, named with the id."""


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
    def __init__(self, num_blocks: int, num_slots: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._blocks = _IdPool("block", num_blocks)
        self._slots = _IdPool("slot", num_slots)

    @property
    def num_blocks(self) -> int:
        return self._blocks.size

    @property
    def num_slots(self) -> int:
        return self._slots.size

    @property
    def num_free_blocks(self) -> int:
        return self._blocks.num_free

    @property
    def num_free_slots(self) -> int:
        return self._slots.num_free

    @property
    def num_used_blocks(self) -> int:
        return self._blocks.size - self._blocks.num_free

    @property
    def num_used_slots(self) -> int:
        return self._slots.size - self._slots.num_free

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int, slot: bool = False) -> bool:
        return num_blocks <= self._blocks.num_free and (not slot or self._slots.num_free > 0)

    def allocate_slot(self) -> int:
        return self._slots.take(1)[0]

    def allocate_blocks(self, n: int) -> list[int]:
        return self._blocks.take(n)

    def free_slot(self, slot: int) -> None:
        self._slots.give_back([slot])

    def free_blocks(self, blocks: list[int]) -> None:
        self._blocks.give_back(blocks)
