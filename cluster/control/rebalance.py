"""Load statistics and load-aware re-placement (EPLB) for the controller.

`LoadCollector` reads every worker's tokens-served counters (gRPC Info) and adds the deltas to Redis
(`{p}:load` per (layer, expert), `{p}:worker_load` per (worker, layer)). `plan_rebalance` turns the aggregated
load into a new placement with router.eplb (pure); the controller applies it like a scale event.
"""

from __future__ import annotations

import logging

import torch

from nextserve.cluster.control import worker_admin
from nextserve.cluster.control.registry import Registry
from nextserve.router.eplb import imbalance, rebalance, worker_load
from nextserve.router.placement import Placement

log = logging.getLogger(__name__)

SPARE_SLOTS_PER_WORKER = 2
"""Extra expert replicas each worker may hold per layer, for the hottest experts (memory headroom)."""


class LoadCollector:
    def __init__(self, registry: Registry, admin_token: str) -> None:
        """`admin_token`: the cluster's, which the workers' Info needs."""
        self.registry = registry
        self.admin_token = admin_token
        self.last: dict[str, dict[tuple[int, int], int]] = {}  # by address: a restarted worker starts over

    def collect(self, addresses: list[str]) -> None:
        expert_delta: dict[tuple[int, int], int] = {}
        worker_delta: dict[tuple[int, int], int] = {}
        for index, address in enumerate(addresses):
            now = worker_admin.tokens_served(worker_admin.info(address, self.admin_token))
            prev = self.last.get(address, {})
            for pair, n in now.items():
                delta = n - prev.get(pair, 0)
                delta = n if delta < 0 else delta  # the counter restarted (expert dropped and reloaded)
                if delta:
                    expert_delta[pair] = expert_delta.get(pair, 0) + delta
                    worker_delta[(index, pair[0])] = worker_delta.get((index, pair[0]), 0) + delta
            self.last[address] = now
        if expert_delta:
            self.registry.add_load(expert_delta, worker_delta)

    def reset(self) -> None:
        self.registry.reset_load()


def load_tensors(load: dict[tuple[int, int], int], layers: tuple[int, ...], num_experts: int) -> dict[int, torch.Tensor]:
    out = {layer: torch.zeros(num_experts, dtype=torch.float64) for layer in layers}
    for (layer, expert), n in load.items():
        if layer in out:
            out[layer][expert] = n
    return out


def measured_imbalance(worker_tokens: dict[tuple[int, int], int], num_workers: int) -> float | None:
    """Σ_layers max_worker / Σ_layers mean_worker of the tokens served, per MoE layer (each layer waits
    for its busiest worker); max/mean for one layer. None before any traffic."""
    layers = sorted({layer for _, layer in worker_tokens})
    if not layers:
        return None
    loads = torch.zeros(len(layers), num_workers, dtype=torch.float64)  # [L, N]
    for (worker, layer), n in worker_tokens.items():
        if worker < num_workers:
            loads[layers.index(layer), worker] = n
    return imbalance(loads) if loads.sum() > 0 else None


def plan_rebalance(current: Placement, load: dict[tuple[int, int], int], epoch: int) -> tuple[Placement, dict[str, float]]:
    """The new placement for `load`, and the predicted max/mean worker load before and after."""
    tensors = load_tensors(load, current.layers, current.num_experts)
    new = rebalance(tensors, current.num_workers, current.replication, SPARE_SLOTS_PER_WORKER, epoch,
                    previous=current)
    before = imbalance(worker_load(current, tensors))
    after = imbalance(worker_load(new, tensors))
    log.info("rebalance: predicted max/mean worker load %.3f -> %.3f", before, after)
    return new, {"predicted_before": before, "predicted_after": after}
