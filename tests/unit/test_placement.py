"""router/placement.py: balanced, replicated, reproducible, serialisable."""

from __future__ import annotations

from collections import Counter

import pytest

from nextserve.router.placement import Placement, PlacementError, build_placement

CASES = [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (5, 1), (5, 2), (7, 3), (8, 4), (16, 2), (16, 4)]


@pytest.mark.parametrize("num_workers,replication", CASES)
@pytest.mark.parametrize("num_experts", [1, 13, 64, 512])
def test_balanced_and_replicated(num_workers: int, replication: int, num_experts: int) -> None:
    layers = [0, 1, 2, 5]
    p = build_placement(layers, num_experts, num_workers, replication)
    total: Counter[int] = Counter()
    for layer in layers:
        held: Counter[int] = Counter()
        primaries: Counter[int] = Counter()
        for e in range(num_experts):
            workers = p.workers_of(layer, e)
            assert len(workers) == replication == len(set(workers))
            held.update(workers)
            primaries[workers[0]] += 1
        counts = [held[w] for w in range(num_workers)]
        assert max(counts) - min(counts) <= 1, f"layer {layer} holdings {counts}"
        prim = [primaries[w] for w in range(num_workers)]
        assert max(prim) - min(prim) <= 1, f"layer {layer} primaries {prim}"
        total.update(held)
    counts = [total[w] for w in range(num_workers)]
    assert max(counts) - min(counts) <= 1, f"total holdings {counts}"
    assert sum(counts) == len(layers) * num_experts * replication


def test_reproducible_and_round_trips_json() -> None:
    a = build_placement(range(48), 512, 7, 2, epoch=3)
    b = build_placement(range(48), 512, 7, 2, epoch=3)
    assert a == b and a.to_json() == b.to_json()
    back = Placement.from_json(a.to_json())
    assert back == a and back.epoch == 3


def test_experts_of_inverts_workers_of() -> None:
    p = build_placement([0, 3], 13, 5, 2)
    for w in range(5):
        for layer, e in p.experts_of(w):
            assert w in p.workers_of(layer, e)
    assert sum(len(p.experts_of(w)) for w in range(5)) == 2 * 13 * 2


def test_replication_above_workers_is_a_clear_error() -> None:
    with pytest.raises(PlacementError, match="replication 3 needs 1 <= R <= num_workers \\(2\\)"):
        build_placement([0], 8, 2, 3)


def test_invalid_mapping_is_rejected() -> None:
    with pytest.raises(PlacementError, match="need 2 distinct"):
        Placement(3, 2, {0: ((1, 1),)})
    with pytest.raises(PlacementError, match="outside"):
        Placement(2, 1, {0: ((4,),)})
    with pytest.raises(PlacementError, match="malformed"):
        Placement.from_json('{"num_workers": 2}')
