"""Expert placement: which workers hold each (layer, expert). Pure functions, no I/O.

A placement maps every routed expert of every MoE layer to at least R distinct workers (its replicas);
hot experts may have more (router/eplb.py gives them spare slots). The dispatcher splits an expert's
tokens over its alive replicas, so replicas are peers: the first is no longer special, except that
`build_placement` balances first replicas too (the load if every other replica fails).
Serialised to JSON (stored in Redis); a ragged placement keeps the same JSON shape.

Letters: N = workers, R = minimum replicas per expert, E = routed experts per layer, L = MoE layers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass


class PlacementError(ValueError):
    """A placement that cannot be built or does not hold together; the message names the values."""


@dataclass(frozen=True)
class Placement:
    num_workers: int
    replication: int
    """The minimum number of distinct workers per expert (R); an expert may have up to N."""
    layer_to_expert_workers: dict[int, tuple[tuple[int, ...], ...]]
    """layer -> [E] tuples of >= R distinct worker indices (its replicas)."""
    epoch: int = 0
    """Bumped by the controller on every change, so workers and routers can tell plans apart."""

    def __post_init__(self) -> None:
        sizes = {len(experts) for experts in self.layer_to_expert_workers.values()}
        if len(sizes) > 1:
            raise PlacementError(f"layers have different expert counts {sorted(sizes)}; need one E")
        for layer, experts in self.layer_to_expert_workers.items():
            for e, workers in enumerate(experts):
                if len(workers) < self.replication or len(set(workers)) != len(workers):
                    raise PlacementError(f"layer {layer} expert {e} has workers {workers}; "
                                         f"need {self.replication} distinct ones or more")
                if not all(0 <= w < self.num_workers for w in workers):
                    raise PlacementError(f"layer {layer} expert {e} names workers {workers} outside "
                                         f"[0, {self.num_workers})")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.layer_to_expert_workers))

    @property
    def num_experts(self) -> int:
        return len(next(iter(self.layer_to_expert_workers.values()), ()))

    @property
    def max_replicas(self) -> int:
        """The most replicas any expert has (the width of `router.plan.replica_table`)."""
        return max((len(ws) for experts in self.layer_to_expert_workers.values() for ws in experts), default=0)

    def workers_of(self, layer: int, expert: int) -> tuple[int, ...]:
        return self.layer_to_expert_workers[layer][expert]

    def experts_of(self, worker: int) -> list[tuple[int, int]]:
        """The sorted (layer, expert) pairs that `worker` holds."""
        return [(layer, e) for layer in self.layers
                for e, workers in enumerate(self.layer_to_expert_workers[layer]) if worker in workers]

    def slots_of(self, worker: int, layer: int | None = None) -> int:
        """How many experts `worker` holds in `layer`, or over all layers (its expert memory, in slots)."""
        layers = self.layers if layer is None else (layer,)
        return sum(worker in ws for l in layers for ws in self.layer_to_expert_workers[l])

    def with_epoch(self, epoch: int) -> "Placement":
        return dataclasses.replace(self, epoch=epoch)

    def to_json(self) -> str:
        return json.dumps({
            "num_workers": self.num_workers, "replication": self.replication, "epoch": self.epoch,
            "layers": {str(layer): [list(w) for w in self.layer_to_expert_workers[layer]]
                       for layer in self.layers},
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Placement":
        raw = json.loads(text)
        try:
            mapping = {int(layer): tuple(tuple(int(w) for w in ws) for ws in experts)
                       for layer, experts in raw["layers"].items()}
            return cls(int(raw["num_workers"]), int(raw["replication"]), mapping, int(raw.get("epoch", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlacementError(f"placement JSON is malformed: {exc!r}") from None


def check_sizes(num_experts: int, num_workers: int, replication: int) -> None:
    """Raise PlacementError naming the value when E, N or R cannot make a placement."""
    if num_workers < 1:
        raise PlacementError(f"num_workers must be >= 1, got {num_workers}")
    if not 1 <= replication <= num_workers:
        raise PlacementError(f"replication {replication} needs 1 <= R <= num_workers ({num_workers}); "
                             f"add workers or lower the replication factor")
    if num_experts < 1:
        raise PlacementError(f"num_experts must be >= 1, got {num_experts}")


def build_placement(layers: Sequence[int], num_experts: int, num_workers: int, replication: int = 1,
                    epoch: int = 0) -> Placement:
    """Balanced, reproducible placement of E experts per layer over N workers, R replicas each.

    Greedy over replica ranks (all first replicas of a layer, then all second replicas, ...): each slot
    goes to the worker, not yet holding that expert, with the fewest experts of the layer, then the
    fewest overall, then the next after the previous pick on the ring. First replicas come out
    round-robin, so they differ by at most one between workers, and so do per-layer and total
    holdings for R <= 8 (tests check N <= 16, R <= 4); the replicas of a worker's experts are spread
    over many workers, so failover load spreads too. Load-blind: router/eplb.py weighs experts by load.
    """
    check_sizes(num_experts, num_workers, replication)
    total, cursor = [0] * num_workers, 0
    mapping: dict[int, tuple[tuple[int, ...], ...]] = {}
    for layer in sorted(set(layers)):
        held = [0] * num_workers
        rows: list[list[int]] = [[] for _ in range(num_experts)]
        for _ in range(replication):
            for row in rows:
                w = min((w for w in range(num_workers) if w not in row),
                        key=lambda w: (held[w], total[w], (w - cursor) % num_workers))
                row.append(w)
                held[w] += 1
                total[w] += 1
                cursor = (w + 1) % num_workers
        mapping[layer] = tuple(tuple(row) for row in rows)
    return Placement(num_workers, replication, mapping, epoch)


@dataclass(frozen=True)
class PlacementRecord:
    """A placement as published (cluster/control/registry.py): its epoch and the address of each worker
    (addresses[i] is worker i)."""
    epoch: int
    placement: Placement
    addresses: tuple[str, ...]
