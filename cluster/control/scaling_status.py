"""What the autoscaling loop last saw and did, as the controller publishes it (Redis `{p}:scaling`) and
`nextserve status` and the gateway's /metrics show it: current / desired heads and workers, each
worker's busy fraction and calls in flight over the last window, the last decision that changed a pool
(with its reason) and how many each pool made. A plain record with a JSON form: no Ray, no Redis."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from nextserve.cluster.control.autoscale_policy import ScalingDecision


@dataclass(frozen=True)
class ScalingStatus:
    heads_current: int = 0
    """Head replicas running (Serve's RUNNING replicas)."""
    heads_desired: int = 0
    """Head replicas Serve is heading for (running + starting; its autoscaler's target)."""
    heads_range: str | None = None
    """MIN:MAX of autoscale_heads; None: fixed."""
    workers_current: int = 0
    """Expert workers of the published placement."""
    workers_desired: int = 0
    """What the controller's policy decided last (equal to current once a reshard finished)."""
    workers_range: str | None = None
    worker_busy: dict[int, float] = field(default_factory=dict)
    """Worker index -> share of the last window with a Dispatch being computed."""
    worker_inflight: dict[int, float] = field(default_factory=dict)
    """Worker index -> mean Dispatch calls in flight over the last window."""
    last_decision: ScalingDecision | None = None
    """The last decision that changed a pool (heads or workers)."""
    last_reason: str = ""
    """The workers' policy's latest reasoning, a hold included (what it measured)."""
    decisions: dict[str, int] = field(default_factory=dict)
    """"pool:direction" (workers:up, heads:down, ...) -> decisions applied since the controller started."""

    def to_json(self) -> str:
        return json.dumps({**{k: getattr(self, k) for k in self.__dataclass_fields__ if k != "last_decision"},
                           "last_decision": self.last_decision.as_dict() if self.last_decision else None})

    @classmethod
    def from_json(cls, text: str) -> "ScalingStatus":
        raw = json.loads(text)
        decision = raw.pop("last_decision")
        raw["worker_busy"] = {int(k): float(v) for k, v in raw["worker_busy"].items()}
        raw["worker_inflight"] = {int(k): float(v) for k, v in raw["worker_inflight"].items()}
        return cls(**raw, last_decision=ScalingDecision.from_dict(decision) if decision else None)
