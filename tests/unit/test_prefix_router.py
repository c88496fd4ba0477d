"""Routing a request to the head replica most likely to hold its prefix: the key is the prompt's first
ROUTE_PREFIX_TOKENS tokens, replicas are ranked by rendezvous hashing, and a replica joining or leaving
moves only the keys it owns (about 1/M of them), not all of them as `hash % M` would."""

from __future__ import annotations

import random

from nextserve.cluster.deployments.prefix_router import ROUTE_PREFIX_TOKENS, prefix_key, rank_replicas


def test_the_key_is_the_prefix_only() -> None:
    shared = list(range(ROUTE_PREFIX_TOKENS))
    assert prefix_key(shared + [1, 2, 3]) == prefix_key(shared + [9])  # same system prompt, other turns
    assert prefix_key([5, 6]) != prefix_key([5, 7])
    assert prefix_key([5, 6]) == prefix_key((5, 6))  # lists and tuples alike (Ray may pass either)
    # the salt is hashed too: another tenant's (or cache salt's) equal prompt has another key
    assert prefix_key(shared, "A") == prefix_key(shared + [1], "A") != prefix_key(shared, "B")
    assert prefix_key(shared, "A", "s") != prefix_key(shared, "A") != prefix_key(shared)
    assert prefix_key(shared, "A", "") == prefix_key(shared, "A")


def test_a_prompt_cache_key_gives_each_session_of_one_agent_a_home_of_its_own() -> None:
    """Codex's sessions share their first ROUTE_PREFIX_TOKENS tokens (one system prompt): without its
    prompt_cache_key they would all rank one replica first; with it each session has its own home, kept
    for every turn."""
    system = list(range(ROUTE_PREFIX_TOKENS))
    replicas = ["a", "b", "c", "d"]
    assert len({rank_replicas(prefix_key(system + [i]), replicas)[0] for i in range(50)}) == 1
    homes = {rank_replicas(prefix_key(system, "", "", f"session-{i}"), replicas)[0] for i in range(50)}
    assert homes == set(replicas)
    turn1, turn2 = prefix_key(system + [1], "", "", "s1"), prefix_key(system + [1, 2, 3], "", "", "s1")
    assert turn1 == turn2 != prefix_key(system + [1], "", "", "s2")
    assert prefix_key(system, "", "", "") == prefix_key(system)


def test_rendezvous_ranking_moves_only_the_keys_of_the_replica_that_changed() -> None:
    rng = random.Random(0)
    keys = [prefix_key([rng.randrange(2000) for _ in range(20)]) for _ in range(2000)]
    four = ["a", "b", "c", "d"]
    home = {k: rank_replicas(k, four)[0] for k in keys}
    counts = {r: sum(h == r for h in home.values()) for r in four}
    assert min(counts.values()) > 400  # spread: ~500 each
    five = {k: rank_replicas(k, four + ["e"])[0] for k in keys}
    moved = [k for k in keys if five[k] != home[k]]
    assert all(five[k] == "e" for k in moved) and 300 < len(moved) < 500  # ~1/5, all to the newcomer
    three = {k: rank_replicas(k, ["a", "b", "d"])[0] for k in keys}
    assert all(three[k] == home[k] for k in keys if home[k] != "c")  # only c's keys move
    assert rank_replicas(keys[0], four) == rank_replicas(keys[0], list(reversed(four)))  # order-free
