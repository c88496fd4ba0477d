"""What a head reports about itself at each scrape of /metrics (the gateway turns it into Prometheus
series, cluster/gateway/metrics.py). Crosses Ray as this dataclass (Ray pickles it).

The dispatch fields are deltas drained on every call: behind a Ray handle each call may land on a
different head replica, so cumulative values would jump between replicas, while drained deltas add up
to the right totals whichever gateway replica pulls them. The load fields (`LOAD_FIELDS`: queue, cache
usage, preemptions since start) describe the one head that answered; each head also publishes them with
its heartbeat (`load_fields`), and the gateway sums them over the live heads (`summed_load`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

LOAD_FIELDS = ("num_running", "num_waiting", "blocks_used", "blocks_total", "slots_used", "slots_total",
               "num_preemptions", "blocks_cached", "prefix_cache_queried_tokens", "prefix_cache_hit_tokens")
"""The fields a head publishes with its heartbeat and the gateway sums over heads."""

@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int = 0
    """Sequences in the running batch now."""
    num_waiting: int = 0
    """Sequences admitted but not yet running (preempted ones included)."""
    num_steps: int = 0
    """Batched forward steps run since start."""
    dispatch_latency_s: dict[int, list[float]] = field(default_factory=dict)
    """MoE layer -> one dispatch round's latency per sample, observed since the previous call."""
    expert_tokens: dict[tuple[int, int], int] = field(default_factory=dict)
    """(layer, expert) -> tokens routed to it since the previous call."""
    blocks_used: int = 0
    """KV blocks held by running sequences now."""
    blocks_total: int = 0
    """KV blocks of the cache (its budget's, fixed at start)."""
    slots_used: int = 0
    """DeltaNet state slots held by running sequences now."""
    slots_total: int = 0
    """State slots of the cache: the most sequences that can run at once."""
    num_preemptions: int = 0
    """Sequences preempted (blocks taken back, recomputed later) since this head started."""
    blocks_cached: int = 0
    """KV blocks no running sequence holds, kept for the prefix cache (evicted when blocks run out):
    blocks_used + blocks_cached + free blocks = blocks_total."""
    snapshots_used: int = 0
    """Prefix-cache state snapshots holding a state now."""
    snapshots_total: int = 0
    """Snapshots of the cache (its budget's share, fixed at start; 0 without a prefix cache)."""
    prefix_cache_queried_tokens: int = 0
    """Tokens to prefill that admissions looked up in the prefix cache since start (readmissions too)."""
    prefix_cache_hit_tokens: int = 0
    """Of those, tokens found there and not run."""

    def load_fields(self) -> dict[str, int]:
        """The load fields, for the head's registry entry."""
        return {name: getattr(self, name) for name in LOAD_FIELDS}


def summed_load(heads: Iterable[Mapping[str, str]]) -> dict[str, int]:
    """The load fields summed over heads' registry entries (a field a head lacks counts 0)."""
    heads = list(heads)
    return {name: sum(int(h.get(name, 0)) for h in heads) for name in LOAD_FIELDS}
