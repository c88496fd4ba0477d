"""The seam between the head model and the routed experts.

At each MoE layer the head hands `(hidden [T, H], expert ids [T, k], weights [T, k])` to an
`ExpertBackend` and adds what comes back. `submit` returns a future so the head can compute the
shared expert while the routed experts run elsewhere (the remote backend lives in router/).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

import torch
from torch import Tensor

from nextserve.model.layers.experts import Assignments, experts_forward


class ExpertBackend(Protocol):
    def submit(self, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor) -> "Future[Tensor]":
        """Start the routed experts of `layer` for hidden [T, H], ids/weights [T, k]; result [T, H]."""
        ...


class LocalExpertBackend:
    """All routed experts in this process, stacked per layer: gate_up [E, 2I, H], down [E, H, I]."""

    def __init__(self, gate_up: dict[int, Tensor], down: dict[int, Tensor]) -> None:
        if gate_up.keys() != down.keys():
            raise ValueError(f"gate_up layers {sorted(gate_up)} differ from down layers {sorted(down)}")
        self.gate_up = gate_up
        self.down = down

    def submit(self, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor) -> "Future[Tensor]":
        future: Future[Tensor] = Future()
        future.set_result(self.forward(layer, hidden, ids, weights))
        return future

    def forward(self, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        return experts_forward(hidden, Assignments.from_topk(ids, weights), self.gate_up[layer], self.down[layer])


class ZeroExperts:
    """Routed experts that return zeros at once: what is left of a step is the head's own work
    (benchmarks time the head part with it)."""

    def submit(self, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor) -> "Future[Tensor]":
        future: Future[Tensor] = Future()
        future.set_result(torch.zeros_like(hidden))  # [T, H]
        return future
