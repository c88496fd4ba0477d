"""What /metrics reports about dispatch: per-layer round latency and tokens routed to each expert.

The head's backend (router/epoch_follower.py) records each round into a `DispatchRecorder`, which the
metrics drain (deltas since the previous drain). E = experts per layer.
"""

from __future__ import annotations

import threading
from collections import deque

import torch
from torch import Tensor

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

