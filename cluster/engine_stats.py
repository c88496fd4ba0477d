"""What the engine records about itself: a snapshot of its queues, and counters and latency
observations that the gateway exports (cluster/metrics.py turns them into Prometheus series)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from nextserve.cluster.scheduler import FinishReason

MAX_PENDING_OBSERVATIONS = 100_000
"""Latency observations kept between drains; older ones are dropped, so an unscraped engine stays bounded."""


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    cache_bytes: int  # held by the running sequences' hybrid caches
    num_steps: int


@dataclass(slots=True)
class EngineMetrics:
    """Recorded by the engine thread; the gateway exports them (counters, and histograms fed by
    `drain`). Reads are safe from any thread."""
    num_prompt_tokens: int = 0
    """Prompt tokens run through the model (counter)."""
    num_generation_tokens: int = 0
    num_finished: dict[FinishReason, int] = field(default_factory=lambda: dict.fromkeys(FinishReason, 0))
    ttft_s: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_PENDING_OBSERVATIONS))
    """Time to first token per request, arrival to first sampled token."""
    tpot_s: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_PENDING_OBSERVATIONS))
    """Mean time per output token after the first, per finished request with >= 2 tokens."""

    @staticmethod
    def drain(observations: deque[float]) -> list[float]:
        """Pop all of `ttft_s` or `tpot_s` for a histogram (safe while the engine thread appends)."""
        return [observations.popleft() for _ in range(len(observations))]
