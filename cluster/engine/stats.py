"""What a head reports about itself at each scrape of /metrics (the gateway turns it into Prometheus
series, cluster/gateway/metrics.py). Crosses Ray as this dataclass (Ray pickles it).

The dispatch fields are deltas drained on every call: behind a Ray handle each call may land on a
different head replica, so cumulative values would jump between replicas, while drained deltas add up
to the right totals whichever gateway replica pulls them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int = 0
    """Sequences in the running batch now."""
    num_waiting: int = 0
    """Sequences admitted but not yet running."""
    num_steps: int = 0
    """Batched forward steps run since start."""
    dispatch_latency_s: dict[int, list[float]] = field(default_factory=dict)
    """MoE layer -> one dispatch round's latency per sample, observed since the previous call."""
    expert_tokens: dict[tuple[int, int], int] = field(default_factory=dict)
    """(layer, expert) -> tokens routed to it since the previous call."""
