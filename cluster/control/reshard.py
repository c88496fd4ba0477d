"""Moving from one placement to another under live traffic (scaling, rebalancing, no stop-the-world).

    grow:     new workers start with their experts; surviving workers LoadExperts what they gain
              (they keep what they had: old and new placements are both servable)
    publish:  the new placement under a new epoch, only once every expert of it is loaded
    switch:   heads pick the epoch up between MoE layers (250 ms poll); wait until every live head
              reports it, plus a grace period for the calls in flight on the old placement
    shrink:   surviving workers DropExperts what they lost; retired workers stop and are killed

A worker's Redis assignment is always what it must hold now (old ∪ new during the move), so a worker
that Ray restarts mid-move comes back holding the right experts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import ray

from nextserve.cluster.control import worker_admin
from nextserve.cluster.control.registry import Registry
from nextserve.router.placement import Placement

log = logging.getLogger(__name__)

SWITCH_TIMEOUT_S = 15.0
"""How long to wait for every live head to report the new epoch (they poll every 250 ms)."""
DRAIN_GRACE_S = 2.0
"""After the switch: a step in flight on the old placement finishes its MoE layer in well under this."""


def pairs_of(placement: Placement | None, worker: int) -> set[tuple[int, int]]:
    if placement is None or worker >= placement.num_workers:
        return set()
    return set(placement.experts_of(worker))


def grow(registry: Registry, workers: dict[int, Any], old: Placement | None, new: Placement,
         create: Callable[[int], Any], epoch: int, admin_token: str) -> None:
    """Make every worker of `new` hold its new experts while keeping its old ones (LoadExperts carries
    the cluster's `admin_token`)."""
    for index in range(new.num_workers):
        keep, want = pairs_of(old, index), pairs_of(new, index)
        registry.set_assignment(index, sorted(keep | want))
        if index not in workers:
            workers[index] = create(index)
            continue
        gained = sorted(want - keep)
        if gained:
            address = str(ray.get(workers[index].describe.remote(), timeout=60)["address"])
            worker_admin.load_experts(address, gained, epoch, admin_token)
            log.info("worker %d loaded %d experts", index, len(gained))


def wait_for_switch(registry: Registry, epoch: int) -> None:
    deadline = time.monotonic() + SWITCH_TIMEOUT_S
    while time.monotonic() < deadline:
        heads = [h for h in registry.heads() if h.alive]
        if all(int(h.fields.get("epoch", 0)) >= epoch for h in heads):
            break
        time.sleep(0.1)
    else:
        log.warning("not every head reported epoch %d within %s s; shrinking anyway", epoch, SWITCH_TIMEOUT_S)
    time.sleep(DRAIN_GRACE_S)


def shrink(registry: Registry, workers: dict[int, Any], old: Placement | None, new: Placement, epoch: int,
           admin_token: str) -> None:
    """Drop what surviving workers no longer hold (DropExperts carries `admin_token`); stop and kill
    retired workers."""
    for index in sorted(workers):
        if index >= new.num_workers:
            actor = workers.pop(index)
            try:
                ray.get(actor.stop.remote(), timeout=30)
            except Exception as exc:  # already dead: nothing to stop
                log.info("worker %d did not stop cleanly: %s", index, exc)
            ray.kill(actor, no_restart=True)
            registry.forget_worker(index)
            log.info("worker %d retired", index)
            continue
        lost = sorted(pairs_of(old, index) - pairs_of(new, index))
        registry.set_assignment(index, sorted(pairs_of(new, index)))
        if lost:
            address = str(ray.get(workers[index].describe.remote(), timeout=60)["address"])
            worker_admin.drop_experts(address, lost, epoch, admin_token)
            log.info("worker %d dropped %d experts", index, len(lost))
