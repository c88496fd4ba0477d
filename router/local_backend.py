"""The routed experts in this process: an `ExpertBackend` (model/expert_backend.py) for one-process
generation, tests and benchmarks, and the reference the remote backends are checked against.

`LocalExpertBackend` holds every routed expert stacked per layer and answers at once; `ZeroExperts`
answers zeros (what is left of a step is the head's own work). `load_local_backend` builds the former
from a checkpoint. Letters: T = tokens, H = hidden, k = experts per token, E = experts, I = moe
intermediate.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import torch
from torch import Tensor

from nextserve.model.checkpoint import Checkpoint
from nextserve.model.layers.experts import Assignments, ExpertWeights, experts_forward
from nextserve.model.loader import load_experts


class LocalExpertBackend:
    """All routed experts in this process, stacked per layer: gate_up [E, 2I, H], down [E, H, I] (an FP8
    checkpoint's: `Fp8Experts`, FP8 + block scales)."""

    def __init__(self, gate_up: dict[int, ExpertWeights], down: dict[int, ExpertWeights]) -> None:
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


def load_local_backend(path: str | Path, dtype: str | torch.dtype = "float32") -> LocalExpertBackend:
    """Every routed expert of every MoE layer (the MTP layers' included), in this process (single-process use
    and tests)."""
    config = Checkpoint(path).config
    pairs = [(layer, e) for layer in config.expert_layers for e in range(config.num_experts)]
    loaded = load_experts(path, pairs, dtype)
    return LocalExpertBackend({l: x.gate_up for l, x in loaded.items()}, {l: x.down for l, x in loaded.items()})
