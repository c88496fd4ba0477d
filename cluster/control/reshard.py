"""Moving from one placement to another under live traffic (scaling, rebalancing, no stop-the-world).

    waves:    old -> P1 -> ... -> new, each step small enough that no worker holds more than its
              memory allows (`max_experts_per_worker`) at any moment: `plan_waves`, pure
    per step  grow:     new workers start with their experts; surviving workers LoadExperts what they
                        gain (they keep what they had: both placements are servable)
              publish:  the step's placement under a new epoch, once every expert of it is loaded
              switch:   heads pick the epoch up between MoE layers (250 ms poll); wait until every
                        live head reports it
              drain:    wait until no worker computes a Dispatch of an older epoch (its count of calls
                        in flight per epoch, InfoReply.inflight_by_epoch), not a timer
              shrink:   surviving workers DropExperts what they lost; retired workers stop, are killed

A worker's Redis assignment is always what it must hold now (the step's old ∪ new), so a worker that
Ray restarts mid-move comes back holding the right experts. A call that still reaches a worker for an
expert it dropped is answered FAILED_PRECONDITION and failed over by the head: draining avoids that
cost, it is not what keeps the answers right.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import ray

from nextserve.cluster.control import worker_admin
from nextserve.cluster.control.registry import Registry
from nextserve.model.checkpoint import Checkpoint
from nextserve.router.placement import Placement, build_placement

log = logging.getLogger(__name__)

SWITCH_TIMEOUT_S = 15.0
"""How long to wait for every live head to report the new epoch (they poll every 250 ms)."""
DRAIN_TIMEOUT_S = 30.0
"""The most a step waits for the calls of older epochs to finish (one MoE round takes milliseconds; a
worker that stays busy past this is logged and the move goes on: its late calls fail over)."""
DRAIN_POLL_S = 0.05


class ReshardError(RuntimeError):
    """A move that cannot keep every worker within its memory; the message names the workers and the room."""


def check_fits(placement: Placement, max_experts_per_worker: int | None) -> None:
    """ReshardError when a worker of `placement` would hold more than `max_experts_per_worker` pairs."""
    if max_experts_per_worker is None:
        return
    counts = [len(placement.experts_of(w)) for w in range(placement.num_workers)]
    if max(counts, default=0) > max_experts_per_worker:
        raise ReshardError(f"{placement.num_workers} workers would hold up to {max(counts)} (layer, expert) pairs "
                           f"each, more than max_experts_per_worker={max_experts_per_worker}; use more workers "
                           f"or raise max_experts_per_worker (nextserve plan computes what a GPU holds)")


def serving_placement(model: str, num_workers: int, replication: int) -> Placement:
    """The placement a cluster serving the checkpoint `model` on N workers (R replicas) starts with and
    scales to: build_placement over its expert layers (its MTP layers included, counted from the tensors).
    The controller places by it, and `nextserve scale` waits until it is published."""
    config = Checkpoint(model).config
    return build_placement(config.expert_layers, config.num_experts, num_workers, replication)


def plan_waves(old: Placement, new: Placement, max_experts_per_worker: int | None) -> list[Placement]:
    """The placements to step through from `old` to `new` (the last one is `new`), so that during each
    step (holding the previous placement's experts ∪ the next one's) no worker holds more than
    `max_experts_per_worker` (layer, expert) pairs; None: one step.

    Greedy, expert by expert: an expert moves to its new workers in the first wave where every worker
    it gains has room (a worker's room grows only after a wave ends, when it drops what it lost). The
    intermediate placements keep every expert on >= R workers (its old set or its new set) and keep the
    retiring workers until the last wave."""
    check_fits(new, max_experts_per_worker)
    if max_experts_per_worker is None or old.layers != new.layers or old.num_experts != new.num_experts:
        return [new]
    width = max(old.num_workers, new.num_workers)
    current = {layer: [tuple(ws) for ws in old.layer_to_expert_workers[layer]] for layer in old.layers}
    waves: list[Placement] = []
    while True:
        held = [0] * width
        for experts in current.values():
            for ws in experts:
                for w in ws:
                    held[w] += 1
        over = [w for w in range(width) if held[w] > max_experts_per_worker]
        if over and not waves:
            raise ReshardError(f"workers {over} already hold more than max_experts_per_worker="
                               f"{max_experts_per_worker} pairs ({[held[w] for w in over]}); raise it")
        moved = False
        nxt = {layer: list(experts) for layer, experts in current.items()}
        for layer in new.layers:
            for e, target in enumerate(new.layer_to_expert_workers[layer]):
                now = current[layer][e]
                if set(now) == set(target):
                    continue
                gained = [w for w in target if w not in now]
                if all(held[w] + 1 <= max_experts_per_worker for w in gained):
                    for w in gained:
                        held[w] += 1  # loaded in this wave, before anything is dropped
                    nxt[layer][e] = tuple(target)
                    moved = True
        if not moved:
            short = sorted({w for layer in new.layers for e, target in enumerate(new.layer_to_expert_workers[layer])
                            for w in target if w not in current[layer][e]})
            raise ReshardError(f"no expert can move without a worker holding more than max_experts_per_worker="
                               f"{max_experts_per_worker} pairs: workers {short} are full ({[held[w] for w in short]}); "
                               f"raise max_experts_per_worker or move in smaller scale steps")
        if all(set(nxt[layer][e]) == set(new.layer_to_expert_workers[layer][e])
               for layer in new.layers for e in range(new.num_experts)):
            return waves + [new]
        waves.append(Placement(width, new.replication, {layer: tuple(ws) for layer, ws in nxt.items()}))
        current = {layer: list(ws) for layer, ws in nxt.items()}


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
            return
        time.sleep(0.1)
    log.warning("not every head reported epoch %d within %s s; shrinking anyway", epoch, SWITCH_TIMEOUT_S)


def drain(addresses: list[str], epoch: int, admin_token: str) -> None:
    """Wait until none of `addresses` computes a Dispatch sent under an epoch below `epoch` (their Info,
    which carries `admin_token`)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    pending = list(addresses)
    while pending:
        busy = []
        for address in pending:
            try:
                calls = worker_admin.info(address, admin_token).inflight_by_epoch
            except Exception as exc:  # gone or restarting: nothing of ours runs there
                log.info("drain: worker at %s did not answer (%s)", address, exc)
                continue
            if any(n for e, n in calls.items() if e < epoch):
                busy.append(address)
        pending = busy
        if pending and time.monotonic() > deadline:
            log.warning("workers %s still compute calls older than epoch %d after %s s; going on", pending, epoch,
                        DRAIN_TIMEOUT_S)
            return
        if pending:
            time.sleep(DRAIN_POLL_S)


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
