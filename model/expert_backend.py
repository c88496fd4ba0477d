"""The seam between the head model and the routed experts: the one thing of theirs model/ knows.

At each MoE layer the head hands `(hidden [T, H], expert ids [T, k], weights [T, k])` to an
`ExpertBackend` and adds what comes back. `submit` returns a future so the head can compute the
shared expert while the routed experts run elsewhere. Every implementation lives in router/ (local,
remote over gRPC, epoch-following); the protocol stays here because model/ never imports router/.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

from torch import Tensor


class ExpertBackend(Protocol):
    def submit(self, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor) -> "Future[Tensor]":
        """Start the routed experts of `layer` for hidden [T, H], ids/weights [T, k]; result [T, H]."""
        ...
