"""Expert placement: which workers hold each (layer, expert). Pure functions, no I/O.

A placement maps every routed expert of every MoE layer to R distinct workers (its replicas). The
first replica of an expert is its primary: the dispatcher sends to the first replica still alive,
so primaries are balanced as well as holdings. Serialised to JSON (it is stored in Redis later).

Letters: N = workers, R = replication factor, E = routed experts per layer, L = MoE layers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass


class PlacementError(ValueError):
    """A placement that cannot be built or does not hold together; the message names the values."""


@dataclass(frozen=True)
class Placement:
    num_workers: int
    replication: int
    layer_to_expert_workers: dict[int, tuple[tuple[int, ...], ...]]
    """layer -> [E] tuples of R distinct worker indices; the first is the primary."""
    epoch: int = 0
    """Bumped by the controller on every change, so workers and routers can tell plans apart."""

    def __post_init__(self) -> None:
        for layer, experts in self.layer_to_expert_workers.items():
            for e, workers in enumerate(experts):
                if len(workers) != self.replication or len(set(workers)) != len(workers):
                    raise PlacementError(f"layer {layer} expert {e} has workers {workers}; "
                                         f"need {self.replication} distinct ones")
                if not all(0 <= w < self.num_workers for w in workers):
                    raise PlacementError(f"layer {layer} expert {e} names workers {workers} outside "
                                         f"[0, {self.num_workers})")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.layer_to_expert_workers))

    @property
    def num_experts(self) -> int:
        return len(next(iter(self.layer_to_expert_workers.values()), ()))

    def workers_of(self, layer: int, expert: int) -> tuple[int, ...]:
        return self.layer_to_expert_workers[layer][expert]

    def experts_of(self, worker: int) -> list[tuple[int, int]]:
        """The sorted (layer, expert) pairs that `worker` holds."""
        return [(layer, e) for layer in self.layers
                for e, workers in enumerate(self.layer_to_expert_workers[layer]) if worker in workers]

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


def build_placement(layers: Sequence[int], num_experts: int, num_workers: int, replication: int = 1,
                    epoch: int = 0) -> Placement:
    """Balanced, reproducible placement of E experts per layer over N workers, R replicas each.

    Greedy over replica ranks (all primaries of a layer, then all second replicas, ...): each slot goes
    to the worker, not yet holding that expert, with the fewest experts of the layer, then the fewest
    overall, then the next after the previous pick on the ring. Primaries come out round-robin, so
    they (the load a dispatcher without failures puts on workers) differ by at most one between
    workers, and so do per-layer and total holdings for R <= 8 (tests check N <= 16, R <= 4); the
    replicas of a worker's experts are spread over many workers, so failover load spreads too.
    """
    if num_workers < 1:
        raise PlacementError(f"num_workers must be >= 1, got {num_workers}")
    if not 1 <= replication <= num_workers:
        raise PlacementError(f"replication {replication} needs 1 <= R <= num_workers ({num_workers}); "
                             f"add workers or lower the replication factor")
    if num_experts < 1:
        raise PlacementError(f"num_experts must be >= 1, got {num_experts}")
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
