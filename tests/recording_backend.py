"""An `ExpertBackend` wrapper that records dispatch metrics, for tests that serve the in-process engine.

In a head the epoch-following backend records its own rounds (router/epoch_follower.py); a test that
serves local experts behind the gateway wraps them in `RecordingBackend`, so /metrics has the same
dispatch latency and routed-token series to report. E = experts per layer.
"""

from __future__ import annotations

import time
from concurrent.futures import Future

from torch import Tensor

from nextserve.model.expert_backend import ExpertBackend
from nextserve.router.dispatch_recorder import DispatchRecorder


class RecordingBackend:
    """An `ExpertBackend` that records each dispatch round's latency and the tokens routed to each expert
    (what /metrics exports), then forwards to `inner`."""

    def __init__(self, inner: ExpertBackend, num_experts: int) -> None:
        self.inner = inner
        self.num_experts = num_experts
        self.recorder = DispatchRecorder()

    def submit(self, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor) -> Future[Tensor]:
        """hidden [T, H], ids / weights [T, k]; the future's result is [T, H]."""
        start = time.perf_counter()
        self.recorder.record_tokens(layer, ids, self.num_experts)
        future = self.inner.submit(layer, hidden, ids, weights)
        future.add_done_callback(lambda _: self.recorder.record_latency(layer, time.perf_counter() - start))
        return future
