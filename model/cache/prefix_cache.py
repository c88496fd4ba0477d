"""The exact prefix cache's bookkeeping: refcounted KV blocks, content-addressed once full, and DeltaNet
state snapshots keyed by the block they end on. Pure ids and dicts (the tensors are model/cache/pools.py's).

    key(block i) = blake2b(key(block i-1) | token ids of block i)        (128 bits)
    key(block -1) = salt_key(tenant, cache_salt)                           (None, no parent, when both are "")

    block:     free --allocate--> used (ref >= 1) --release, ref 0--> cached (keyed, LRU) --evict--> free
                                   ^                                      |
                                   +---------- acquire (a hit) -----------+
                a used block that was never keyed (partial, or a duplicate of a keyed one) goes back free

    snapshot:  free --take--> held by one sequence (filled after its step) --publish--> cached (keyed, LRU)
                 ^                                                                          |
                 +--------------------------------- evict (a take finds none free) ---------+

A full block is never written again (a sequence writes only into its own last, partial block), so
every sequence whose prompt starts with the same tokens can point its block table at the same blocks.
A DeltaNet layer's state cannot be rebuilt from KV, so a hit is the longest prefix whose blocks are all
cached *and* whose last block has a snapshot (the state after exactly those tokens): the lookup walks
the blocks from the first and checks the snapshot at each boundary, so a snapshot past an evicted block
is never used (it stays until the snapshot LRU drops it).

Eviction is LRU, blocks and snapshots each: allocation takes a free id first, then the least recently
released cached block (a sequence releases its blocks last first, so of one sequence's blocks the leaves
go before the shared root; a hit re-acquires a block, which refreshes it). Keys are a cryptographic hash
of the whole prefix, so two different prefixes never share an entry; the salt is the chain's root, so
two tenants (or two cache salts) never share one either: no tenant can learn from a hit (a fast first
token, `cached_tokens`) whether another sent a prompt.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

BlockKey = bytes
"""16 bytes: the hash of a full block's tokens and of every block before it."""


class CacheAccountingError(RuntimeError):
    """A block or slot freed twice, or one that does not exist: a bug in the caller, named with the id."""


def salt_key(tenant: str, cache_salt: str) -> BlockKey | None:
    """The root of a request's key chain: None (unsalted) when both are empty, else a hash of the two,
    each length-prefixed so ("ab", "c") and ("a", "bc") differ."""
    if not tenant and not cache_salt:
        return None
    digest = hashlib.blake2b(b"salt", digest_size=16)
    for part in (tenant.encode(), cache_salt.encode()):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.digest()


def block_key(parent: BlockKey | None, token_ids: Sequence[int]) -> BlockKey:
    """The key of a full block holding `token_ids`, after the block whose key is `parent`."""
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class PrefixCache:
    def __init__(self, num_blocks: int, num_snapshots: int, max_held_snapshots: int | None = None) -> None:
        """`max_held_snapshots`: most snapshots sequences may hold unpublished at once (their tails);
        default half the pool, so running sequences never crowd out every published snapshot."""
        if num_blocks < 1 or num_snapshots < 0:
            raise ValueError(f"need >= 1 block and >= 0 snapshots, got {num_blocks} and {num_snapshots}")
        self.num_blocks, self.num_snapshots = num_blocks, num_snapshots
        self.max_held_snapshots = num_snapshots // 2 if max_held_snapshots is None else max_held_snapshots
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest ids go first at start
        self._ref = [0] * num_blocks
        self._key_of: list[BlockKey | None] = [None] * num_blocks
        self._block_of: dict[BlockKey, int] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()
        """Keyed blocks with no reference, least recently released first: what allocation evicts."""
        self._free_snapshots = list(range(num_snapshots - 1, -1, -1))
        self._snapshot_of: dict[BlockKey, int] = {}
        self._key_of_snapshot: list[BlockKey | None] = [None] * num_snapshots
        self._published: OrderedDict[int, None] = OrderedDict()
        """Published snapshots, least recently used first."""
        self.num_held_snapshots = 0
        """Snapshots taken and not yet published or freed (in flight or a sequence's tail)."""

    # ---- blocks -------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks holding nothing."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a cached prefix that no sequence references (evictable)."""
        return len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - len(self._free) - len(self._cached)

    def num_allocatable(self, reusing: Sequence[int] = ()) -> int:
        """Blocks `allocate` can hand out after the hit blocks `reusing` are acquired."""
        return len(self._free) + len(self._cached) - sum(1 for b in reusing if self._ref[b] == 0)

    def allocate(self, n: int) -> list[int]:
        """n blocks (ref 1): free ones first, then the least recently released cached ones (their keys
        are dropped)."""
        if n > self.num_allocatable():
            raise CacheAccountingError(f"{n} blocks asked for, {self.num_allocatable()} free or cached; "
                                       f"check can_allocate first")
        blocks = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._cached.popitem(last=False)
                del self._block_of[self._key_of[block]]  # type: ignore[arg-type]
                self._key_of[block] = None
            self._ref[block] = 1
            blocks.append(block)
        return blocks

    def acquire(self, blocks: Sequence[int]) -> None:
        """One more reference to each of `blocks` (keyed blocks a lookup returned)."""
        for block in blocks:
            if self._ref[block] == 0:
                del self._cached[block]
            self._ref[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """One reference less; a block left with none is cached when keyed, else free. Release a
        sequence's blocks last first, so its leaves are evicted before its root."""
        for block in blocks:
            if not 0 <= block < self.num_blocks:
                raise CacheAccountingError(f"block {block} does not exist (pool of {self.num_blocks})")
            if self._ref[block] == 0:
                raise CacheAccountingError(f"block {block} is freed twice")
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if self._key_of[block] is None:
                    self._free.append(block)
                else:
                    self._cached[block] = None

    def register(self, block: int, key: BlockKey) -> None:
        """`block` is full and its K/V written: later prefixes with `key` may share it. A key already
        held by another block keeps that one (this block then goes free on release)."""
        if key not in self._block_of and self._key_of[block] is None:
            self._block_of[key] = block
            self._key_of[block] = key

    def match(self, keys: Sequence[BlockKey]) -> list[int]:
        """The cached blocks of the longest run of `keys` from the first."""
        blocks = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    # ---- snapshots ----------------------------------------------------------------------------------

    @property
    def num_used_snapshots(self) -> int:
        return self.num_snapshots - len(self._free_snapshots)

    def snapshot_for(self, key: BlockKey) -> int | None:
        """The published snapshot of the state after the block keyed `key`; a hit refreshes it."""
        snapshot = self._snapshot_of.get(key)
        if snapshot is not None:
            self._published.move_to_end(snapshot)
        return snapshot

    def has_snapshot(self, key: BlockKey) -> bool:
        return key in self._snapshot_of

    def take_snapshot(self, is_tail: bool = False) -> int | None:
        """A snapshot to fill: a free one, else the least recently used published one (dropped). None
        when there is none, or when `is_tail` and sequences already hold `max_held_snapshots`."""
        if is_tail and self.num_held_snapshots >= self.max_held_snapshots:
            return None
        if self._free_snapshots:
            snapshot = self._free_snapshots.pop()
        elif self._published:
            snapshot, _ = self._published.popitem(last=False)
            del self._snapshot_of[self._key_of_snapshot[snapshot]]  # type: ignore[arg-type]
            self._key_of_snapshot[snapshot] = None
        else:
            return None
        self.num_held_snapshots += 1
        return snapshot

    def publish_snapshot(self, snapshot: int, key: BlockKey) -> None:
        """A held snapshot, now filled with the state after the block keyed `key`, is found by lookups
        (or freed, when another snapshot already holds that key)."""
        if key in self._snapshot_of:
            self.free_snapshot(snapshot)
            return
        self.num_held_snapshots -= 1
        self._snapshot_of[key] = snapshot
        self._key_of_snapshot[snapshot] = key
        self._published[snapshot] = None

    def free_snapshot(self, snapshot: int) -> None:
        """A held snapshot given back unpublished."""
        if self._key_of_snapshot[snapshot] is not None or snapshot in self._free_snapshots:
            raise CacheAccountingError(f"snapshot {snapshot} is not held by a sequence")
        self.num_held_snapshots -= 1
        self._free_snapshots.append(snapshot)
