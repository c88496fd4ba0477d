"""Live moves within memory: `plan_waves` splits a scale or rebalance into placements such that no
worker ever holds more than `max_experts_per_worker` pairs (what it holds during a step is the step's
old ∪ new), every expert keeps R replicas throughout, and a move that cannot fit says so."""

from __future__ import annotations

import pytest

from nextserve.cluster.control.reshard import ReshardError, check_fits, pairs_of, plan_waves
from nextserve.router.placement import Placement, build_placement

LAYERS = list(range(8))


def _peak(steps: list[Placement]) -> int:
    """The most pairs a worker holds at any moment stepping through `steps` (old ∪ new at each step)."""
    width = max(p.num_workers for p in steps)
    return max(len(pairs_of(a, w) | pairs_of(b, w)) for a, b in zip(steps, steps[1:]) for w in range(width))


@pytest.mark.parametrize("before,after,replicas", [(3, 4, 1), (2, 3, 1), (4, 6, 2), (5, 3, 1)])
def test_waves_keep_every_worker_within_its_bound_and_end_at_the_target(before: int, after: int,
                                                                        replicas: int) -> None:
    old, new = build_placement(LAYERS, 64, before, replicas), build_placement(LAYERS, 64, after, replicas)
    one_step = _peak([old, new])
    bound = max(len(old.experts_of(w)) for w in range(before)) + 2  # room for little more than today's load
    bound = max(bound, max(len(new.experts_of(w)) for w in range(after)))
    assert one_step > bound  # the move the issue saw: one step would overrun the memory
    waves = plan_waves(old, new, bound)
    assert len(waves) > 1 and waves[-1] == new
    assert _peak([old, *waves]) <= bound
    for wave in waves:  # a Placement validates R distinct replicas per expert on construction
        assert wave.replication == replicas and wave.num_experts == 64


def test_no_bound_or_room_enough_is_one_step() -> None:
    old, new = build_placement(LAYERS, 64, 3, 1), build_placement(LAYERS, 64, 4, 1)
    assert plan_waves(old, new, None) == [new]
    assert plan_waves(old, new, _peak([old, new])) == [new]


def test_a_move_that_cannot_fit_is_refused_naming_the_workers() -> None:
    old = build_placement(LAYERS, 64, 2, 1)
    swapped = Placement(2, 1, {layer: tuple((1 - ws[0],) for ws in old.layer_to_expert_workers[layer])
                               for layer in LAYERS})
    with pytest.raises(ReshardError, match=r"workers \[0, 1\] are full \(\[256, 256\]\)"):
        plan_waves(old, swapped, 256)  # both full: each must load before it can drop
    assert _peak([old, *plan_waves(old, swapped, 300)]) <= 300  # with some room it goes in waves
    with pytest.raises(ReshardError, match="would hold up to 342 .* max_experts_per_worker=300"):
        check_fits(build_placement(LAYERS, 64, 3, 2), 300)
