"""Readiness from the registry (cluster/deployments/gateway.py:expert_readiness): every expert of the
placement needs a heartbeating replica; workers down whose experts live elsewhere only degrade."""

from __future__ import annotations

import time

from nextserve.cluster.control.registry import STALE_AFTER_S, MemberRecord
from nextserve.router.placement import PlacementRecord
from nextserve.cluster.deployments.gateway import expert_readiness
from nextserve.router.placement import build_placement


def _workers(num_workers: int, down: set[int]) -> list[MemberRecord]:
    return [MemberRecord({"index": str(i), "heartbeat": str(time.time())}, STALE_AFTER_S + 1 if i in down else 0.5)
            for i in range(num_workers)]


def _record(num_workers: int, replication: int) -> PlacementRecord:
    placement = build_placement([1, 3], 8, num_workers, replication)
    return PlacementRecord(1, placement, tuple(f"10.0.0.{i}:1" for i in range(num_workers)))


def test_every_worker_alive_is_ready_and_whole() -> None:
    readiness = expert_readiness(_record(3, 1), _workers(3, set()))
    assert readiness.is_ready and not readiness.is_degraded and readiness.workers_down == ()


def test_a_worker_down_with_two_replicas_stays_ready_and_says_so() -> None:
    readiness = expert_readiness(_record(3, 2), _workers(3, {1}))
    assert readiness.is_ready and readiness.is_degraded and readiness.workers_down == (1,)


def test_a_worker_down_with_one_replica_is_not_ready_naming_an_expert() -> None:
    record = _record(3, 1)
    readiness = expert_readiness(record, _workers(3, {1}))
    assert not readiness.is_ready and readiness.workers_down == (1,)
    layer, expert = record.placement.experts_of(1)[0]
    assert f"layer {layer} expert {expert} has no live replica" in readiness.reason


def test_a_worker_never_registered_counts_as_down() -> None:
    readiness = expert_readiness(_record(3, 2), _workers(2, set()))
    assert readiness.is_ready and readiness.workers_down == (2,)


def test_no_placement_in_redis_is_ready_degraded() -> None:
    """Redis lost its data: the heads still hold their placement and the controller rewrites Redis's."""
    readiness = expert_readiness(None, [])
    assert readiness.is_ready and readiness.is_degraded
