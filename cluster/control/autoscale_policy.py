"""When the expert-worker pool grows or shrinks: a pure policy over measured loads (no I/O, no clock).

    loads (per worker: busy fraction, mean calls in flight, over the last window), current size, now
      -> hot:  pool busy > busy_high, or any worker's mean calls in flight > queue_high (calls queue)
         cold: pool busy < busy_low, no worker queueing, and one worker fewer would still run below
               busy_high (busy * N / (N - 1)): a scale-down that the next window would undo never happens
      -> hot for upscale_delay_s                   -> grow to ceil(N * busy / target), at least N + 1
         cold for downscale_delay_s                -> shrink by one worker
         within cooldown_s of the last change, or neither: hold
      -> ScalingDecision(current, desired, direction, reason), desired within [minimum, maximum]

The band between busy_low and busy_high, the sustained-for delays and the cool-down after each change
are the hysteresis: the pool never flaps on one noisy window. The floor is at least `expert_replicas`
(R distinct workers per expert), so a scale-down never drops the last replica of an expert; the
reshard that applies a decision keeps old ∪ new until every head switched (cluster/control/reshard.py).
The controller applies decisions (cluster/control/autoscaler.py); this file only decides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any


class ScaleRangeError(ValueError):
    """A MIN:MAX range that does not parse or is empty; the message names it and the form expected."""


@dataclass(frozen=True)
class ScaleRange:
    minimum: int
    maximum: int

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.maximum:
            raise ScaleRangeError(f"scale range {self.minimum}:{self.maximum} needs 1 <= MIN <= MAX")

    @classmethod
    def parse(cls, text: str) -> "ScaleRange":
        """`"2:3"` -> ScaleRange(2, 3)."""
        low, sep, high = text.partition(":")
        try:
            if not sep:
                raise ValueError
            return cls(int(low), int(high))
        except ValueError:
            raise ScaleRangeError(f"scale range {text!r} is not MIN:MAX (two integers, 1 <= MIN <= MAX), "
                                  f"e.g. 2:3") from None

    def clamp(self, n: int) -> int:
        return max(self.minimum, min(self.maximum, n))

    def __str__(self) -> str:
        return f"{self.minimum}:{self.maximum}"


class Direction(str, Enum):
    UP = "up"
    DOWN = "down"
    HOLD = "hold"


@dataclass(frozen=True)
class WorkerLoad:
    """One worker over the last window: from the differences of its InfoReply.busy_s and inflight_s."""
    worker: int
    busy_fraction: float
    """Share of the window with at least one Dispatch being computed, 0..1."""
    mean_inflight: float
    """Dispatch calls in flight on average; above 1, calls wait behind each other."""


@dataclass(frozen=True)
class ScalingDecision:
    pool: str
    """"workers" or "heads"."""
    current: int
    desired: int
    direction: Direction
    reason: str
    """What was measured and which rule fired, in words (shown by `nextserve status`)."""
    at: float
    """When it was decided (the caller's clock: unix seconds in the controller)."""

    def as_dict(self) -> dict[str, object]:
        return {"pool": self.pool, "current": self.current, "desired": self.desired,
                "direction": self.direction.value, "reason": self.reason, "at": self.at}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> "ScalingDecision":
        return cls(str(d["pool"]), int(d["current"]), int(d["desired"]),  # type: ignore[arg-type]
                   Direction(d["direction"]), str(d["reason"]), float(d["at"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class WorkerAutoscaleConfig:
    range: ScaleRange
    expert_replicas: int = 1
    """R: the floor is never below it (each expert on R distinct workers)."""
    busy_high: float = 0.6
    """Pool busy fraction above which workers are added."""
    busy_low: float = 0.25
    """Pool busy fraction below which one is removed (when N - 1 would stay below busy_high)."""
    queue_high: float = 1.5
    """A worker's mean Dispatch calls in flight above which the pool is hot whatever its busy fraction."""
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 30.0
    cooldown_s: float = 20.0
    """After any change, no other for this long (a reshard's waves settle; loads re-measured)."""

    def __post_init__(self) -> None:
        if not 0 <= self.busy_low < self.busy_high <= 1:
            raise ValueError(f"busy_low={self.busy_low} and busy_high={self.busy_high} need "
                             f"0 <= busy_low < busy_high <= 1 (the band between them is the hysteresis)")
        if self.expert_replicas > self.range.maximum:
            raise ValueError(f"expert_replicas={self.expert_replicas} exceeds the range's maximum "
                             f"{self.range.maximum}: every expert needs that many distinct workers")

    @classmethod
    def from_fields(cls, values: Mapping[str, Any]) -> "WorkerAutoscaleConfig | None":
        """From the AppArgs fields of the same names (`autoscale_expert_workers`, `autoscale_busy_high`,
        ...: a head's args, the controller's ClusterSpec); None when autoscale_expert_workers is unset."""
        if values.get("autoscale_expert_workers") is None:
            return None
        return cls(ScaleRange.parse(values["autoscale_expert_workers"]), int(values.get("expert_replicas", 1)),
                   **{name: float(values[f"autoscale_{name}"]) for name in AUTOSCALE_FIELDS
                      if values.get(f"autoscale_{name}") is not None})

    @property
    def floor(self) -> int:
        return max(self.range.minimum, self.expert_replicas)

    @property
    def target_busy(self) -> float:
        """The busy fraction a scale-up aims each worker at: the middle of the band."""
        return (self.busy_high + self.busy_low) / 2


AUTOSCALE_FIELDS = ("busy_high", "busy_low", "upscale_delay_s", "downscale_delay_s", "cooldown_s")
"""The settings AppArgs / ClusterSpec carry as `autoscale_<name>`."""


class WorkerAutoscalePolicy:
    """Decides the pool's size from successive windows; holds only the timers of its hysteresis."""

    POOL = "workers"

    def __init__(self, config: WorkerAutoscaleConfig) -> None:
        self.config = config
        self.hot_since: float | None = None
        self.cold_since: float | None = None
        self.last_change: float | None = None

    def decide(self, loads: Sequence[WorkerLoad], current: int, now: float) -> ScalingDecision:
        c = self.config
        floor, ceiling = c.floor, c.range.maximum
        if not floor <= current <= ceiling:
            return self._change(current, max(floor, min(ceiling, current)), now,
                                f"{current} workers is outside the range {floor}:{ceiling}")
        if not loads:
            self.hot_since = self.cold_since = None
            return self._hold(current, now, "no load measured this window (a first reading, or no worker answered)")
        busy = sum(w.busy_fraction for w in loads) / len(loads)
        queue = max(w.mean_inflight for w in loads)
        measured = f"pool busy {busy:.2f}, most calls in flight {queue:.2f}"
        fewer_busy = busy * current / (current - 1) if current > 1 else math.inf
        is_hot = busy > c.busy_high or queue > c.queue_high
        is_cold = busy < c.busy_low and queue <= 1.0 and fewer_busy < c.busy_high
        self.hot_since = (self.hot_since if self.hot_since is not None else now) if is_hot else None
        self.cold_since = (self.cold_since if self.cold_since is not None else now) if is_cold else None
        if self.last_change is not None and now - self.last_change < c.cooldown_s:
            return self._hold(current, now, f"{measured}; cooling down {c.cooldown_s - (now - self.last_change):.0f} s "
                                            f"more after the last change")
        if is_hot and current < ceiling and now - self.hot_since >= c.upscale_delay_s:  # type: ignore[operator]
            want = max(current + 1, math.ceil(current * busy / c.target_busy))
            why = (f"busy {busy:.2f} > {c.busy_high}" if busy > c.busy_high
                   else f"calls in flight {queue:.2f} > {c.queue_high}")
            return self._change(current, min(ceiling, want), now,
                                f"{measured}: {why} for {c.upscale_delay_s:.0f} s")
        if is_cold and current > floor and now - self.cold_since >= c.downscale_delay_s:  # type: ignore[operator]
            return self._change(current, current - 1, now,
                                f"{measured}: busy < {c.busy_low} for {c.downscale_delay_s:.0f} s and "
                                f"{current - 1} workers would run at {fewer_busy:.2f} < {c.busy_high}")
        return self._hold(current, now, measured)

    def _hold(self, current: int, now: float, reason: str) -> ScalingDecision:
        return ScalingDecision(self.POOL, current, current, Direction.HOLD, reason, now)

    def _change(self, current: int, desired: int, now: float, reason: str) -> ScalingDecision:
        self.last_change = now
        self.hot_since = self.cold_since = None
        direction = Direction.UP if desired > current else Direction.DOWN
        return ScalingDecision(self.POOL, current, desired, direction, reason, now)
