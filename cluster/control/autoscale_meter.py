"""The expert workers' load over a window, from two successive readings of what each reports in Info.

    reading i: (time, busy_s, inflight_s)   (experts/busy_clock.py: cumulative since the worker started)
    window:    busy fraction = Δbusy_s / Δt,  mean calls in flight = Δinflight_s / Δt

A worker seen for the first time, or on a new address (Ray restarted it: its counters started over), gives
no load until its second reading. Pure: the caller reads the workers (cluster/control/autoscaler.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from nextserve.cluster.control.autoscale_policy import WorkerLoad


@dataclass(frozen=True)
class BusyReading:
    worker: int
    address: str
    at_s: float
    """The reader's monotonic clock when the reply came."""
    busy_s: float
    inflight_s: float


class WorkerLoadMeter:
    def __init__(self) -> None:
        self.last: dict[int, BusyReading] = {}

    def measure(self, readings: list[BusyReading]) -> list[WorkerLoad]:
        """The load of every worker read now and at the previous call on the same address."""
        loads = []
        for now in readings:
            before = self.last.get(now.worker)
            self.last[now.worker] = now
            if before is None or before.address != now.address or now.at_s <= before.at_s:
                continue
            elapsed = now.at_s - before.at_s
            busy = min(1.0, max(0.0, (now.busy_s - before.busy_s) / elapsed))
            inflight = max(0.0, (now.inflight_s - before.inflight_s) / elapsed)
            loads.append(WorkerLoad(now.worker, busy, inflight))
        for gone in set(self.last) - {r.worker for r in readings}:
            del self.last[gone]
        return loads
