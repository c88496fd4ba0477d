"""How busy a worker is: seconds with at least one Dispatch being computed, and calls in flight over time.

    busy_s      ∫ [inflight > 0] dt   (Δbusy_s / Δt over a window: the busy fraction, 0..1)
    inflight_s  ∫ inflight dt         (Δinflight_s / Δt: the mean calls in flight; above 1, calls queue)

Both are cumulative since the worker started and reported in InfoReply; the controller's autoscaler
(cluster/control/autoscale_meter.py) turns two readings into a window's fractions. Touched only on the
worker's event-loop thread (where calls start and end); `now` is injected so the arithmetic is tested
without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class BusyClock:
    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self._inflight = 0
        self._since = now()
        self._busy_s = 0.0
        self._inflight_s = 0.0

    def _advance(self) -> float:
        now = self._now()
        elapsed = now - self._since
        if self._inflight:
            self._busy_s += elapsed
            self._inflight_s += self._inflight * elapsed
        self._since = now
        return now

    def start(self) -> None:
        """A call began computing."""
        self._advance()
        self._inflight += 1

    def end(self) -> None:
        """A call ended (answered or failed)."""
        self._advance()
        self._inflight -= 1

    def totals(self) -> tuple[float, float]:
        """(busy_s, inflight_s) up to now, the interval still open included."""
        self._advance()
        return self._busy_s, self._inflight_s
