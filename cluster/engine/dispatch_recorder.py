"""What /metrics reports about dispatch: per-layer round latency and tokens routed to each expert.

`RecordingBackend` wraps any `ExpertBackend` (local, remote, epoch-following) and records into a
`DispatchRecorder`, which the metrics drain (deltas since the previous drain). E = experts per layer.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future

import torch
from torch import Tensor

from nextserve.model.expert_backend import ExpertBackend

MAX_PENDING_OBSERVATIONS = 100_000
"""Latency observations kept between drains; older ones are dropped, so an unscraped head stays bounded."""


class DispatchRecorder:
    """Per-layer dispatch latency samples and per-(layer, expert) routed tokens, drained by the metrics."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # Bounded: only a /metrics scrape drains it, and a head may go unscraped for hours.
        self.latency_s: dict[int, deque[float]] = {}
        self.tokens: dict[int, Tensor] = {}  # layer -> [E] routed tokens since the last drain

    def record_tokens(self, layer: int, ids: Tensor, num_experts: int) -> None:
        counts = torch.bincount(ids.reshape(-1).cpu(), minlength=num_experts)
        with self.lock:
            self.tokens[layer] = self.tokens[layer] + counts if layer in self.tokens else counts

    def record_latency(self, layer: int, seconds: float) -> None:
        with self.lock:
            self.latency_s.setdefault(layer, deque(maxlen=MAX_PENDING_OBSERVATIONS)).append(seconds)

    def drain(self) -> tuple[dict[int, list[float]], dict[tuple[int, int], int]]:
        with self.lock:
            latency, tokens = self.latency_s, self.tokens
            self.latency_s, self.tokens = {}, {}
        samples = {layer: list(values) for layer, values in latency.items()}
        routed = {(layer, int(e)): int(counts[e]) for layer, counts in tokens.items() for e in counts.nonzero()[:, 0]}
        return samples, routed


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
