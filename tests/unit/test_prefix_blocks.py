"""The prefix cache's bookkeeping alone (model/cache/prefix_cache.py): keys chain over the whole prefix,
shared blocks are refcounted, released blocks stay cached and are evicted least recently used (leaves of
a sequence first), snapshots are taken, published and evicted LRU; then a random walk against a plain
model of the same rules."""

from __future__ import annotations

import random

import pytest

from nextserve.model.cache.prefix_cache import CacheAccountingError, PrefixCache, block_key, salt_key


def _chain(blocks: list[list[int]]) -> list[bytes]:
    keys: list[bytes] = []
    for tokens in blocks:
        keys.append(block_key(keys[-1] if keys else None, tokens))
    return keys


def test_keys_cover_the_whole_prefix() -> None:
    a, b = _chain([[1, 2], [3, 4]]), _chain([[9, 2], [3, 4]])
    assert a[1] != b[1]  # same tokens, different parent
    assert _chain([[1, 2], [3, 4]]) == a and block_key(None, [1, 2]) != block_key(None, [2, 1])


def test_shared_blocks_are_refcounted_and_stay_cached() -> None:
    cache = PrefixCache(num_blocks=4, num_snapshots=0)
    keys = _chain([[1], [2], [3]])
    first = cache.allocate(3)
    for block, key in zip(first, keys):
        cache.register(block, key)
    assert cache.match(keys) == first and cache.match(_chain([[1], [5]])) == first[:1]
    cache.acquire(first[:2])  # a second sequence shares the first two
    cache.release(first[::-1])
    assert (cache.num_used_blocks, cache.num_cached_blocks, cache.num_free_blocks) == (2, 1, 1)
    cache.release(first[1::-1])
    assert (cache.num_used_blocks, cache.num_cached_blocks, cache.num_free_blocks) == (0, 3, 1)
    with pytest.raises(CacheAccountingError, match=f"block {first[0]} is freed twice"):
        cache.release([first[0]])
    assert cache.num_allocatable(reusing=first[:2]) == 2  # acquiring two hit blocks takes them off the table


def test_eviction_takes_free_blocks_then_the_least_recently_released_leaf() -> None:
    cache = PrefixCache(num_blocks=4, num_snapshots=0)
    keys = _chain([[1], [2], [3]])
    blocks = cache.allocate(3)
    for block, key in zip(blocks, keys):
        cache.register(block, key)
    cache.release(blocks[::-1])  # leaves first: block 2 is the least recently released
    assert cache.allocate(1) == [3]  # the free one first
    assert cache.allocate(1) == [blocks[2]] and cache.match(keys) == blocks[:2]
    cache.acquire(blocks[:1])  # a hit refreshes the root...
    cache.release(blocks[:1])
    assert cache.allocate(1) == [blocks[1]]  # ...so the other one goes first
    assert cache.match(keys) == blocks[:1]
    with pytest.raises(CacheAccountingError, match="check can_allocate"):
        cache.allocate(2)


def test_a_duplicate_block_is_not_cached_twice() -> None:
    cache = PrefixCache(num_blocks=2, num_snapshots=0)
    key = block_key(None, [7])
    a, b = cache.allocate(2)
    cache.register(a, key)
    cache.register(b, key)  # the same tokens computed by a second sequence at the same time
    cache.release([a, b])
    assert cache.match([key]) == [a] and (cache.num_cached_blocks, cache.num_free_blocks) == (1, 1)


def test_snapshots_are_published_found_and_evicted_lru() -> None:
    cache = PrefixCache(num_blocks=1, num_snapshots=2)
    k1, k2, k3 = (block_key(None, [i]) for i in range(3))
    s1, s2 = cache.take_snapshot(), cache.take_snapshot()
    assert cache.take_snapshot() is None  # both held, none published
    cache.publish_snapshot(s1, k1)
    cache.publish_snapshot(s2, k2)
    assert cache.snapshot_for(k1) == s1  # refreshes k1: k2 is now the least recently used
    s3 = cache.take_snapshot()
    assert s3 == s2 and not cache.has_snapshot(k2) and cache.has_snapshot(k1)
    cache.publish_snapshot(s3, k1)  # k1 is already held: s3 goes back free
    assert cache.snapshot_for(k1) == s1 and cache.num_used_snapshots == 1 and cache.num_held_snapshots == 0
    assert cache.take_snapshot(is_tail=True) is not None and cache.take_snapshot(is_tail=True) is None  # half
    with pytest.raises(CacheAccountingError, match=f"snapshot {s1} is not held"):
        cache.free_snapshot(s1)
    assert cache.snapshot_for(k3) is None


def test_random_operations_keep_the_books() -> None:
    """5,000 random allocate / acquire / release / register steps against a plain model: every block is
    exactly one of used, cached or free, refcounts match the holders, and a cached key maps to a block
    that holds it."""
    rng = random.Random(3)
    cache = PrefixCache(num_blocks=24, num_snapshots=0)
    holders: list[list[int]] = []
    keys = [block_key(None, [i]) for i in range(40)]
    for _ in range(5_000):
        op = rng.random()
        if op < 0.4 and cache.num_allocatable() >= 3:
            held = cache.allocate(rng.randint(0, 3))
            hit = cache.match([rng.choice(keys)])
            cache.acquire(hit)
            holders.append(hit + held)
        elif op < 0.7 and holders:
            held = holders.pop(rng.randrange(len(holders)))
            cache.release(held[::-1])
        elif holders:
            held = rng.choice(holders)
            if held:
                cache.register(rng.choice(held), rng.choice(keys))
        refs: dict[int, int] = {}
        for held in holders:
            for block in held:
                refs[block] = refs.get(block, 0) + 1
        assert cache.num_used_blocks == len(refs)
        assert cache.num_used_blocks + cache.num_cached_blocks + cache.num_free_blocks == 24
        for key in keys:
            for block in cache.match([key]):
                assert cache._key_of[block] == key


def test_salted_chains_differ() -> None:
    """The salt roots the chain: the same tokens under another tenant or cache salt key differently at
    every block, and the length prefix keeps ("ab", "c") apart from ("a", "bc")."""
    assert salt_key("", "") is None
    roots = [salt_key("A", ""), salt_key("B", ""), salt_key("A", "x"), salt_key("ab", "c"), salt_key("a", "bc")]
    assert len(set(roots)) == len(roots) and salt_key("A", "") == salt_key("A", "")
    chains = [[block_key(root, [1, 2])] for root in [None, *roots]]
    for chain in chains:
        chain.append(block_key(chain[0], [3, 4]))
    assert len({c[0] for c in chains}) == len({c[1] for c in chains}) == len(chains)
