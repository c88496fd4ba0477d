"""A head's expert backend: the routed experts over gRPC, following the published placement epoch.

The one object between a head's forward and the wire (the head used to stack four: device, recording,
epoch following, remote). `submit` hands one coroutine to the dispatch loop thread and returns its
future; the coroutine dispatches on the current epoch's `RemoteExpertBackend` (plan, calls, replica
failover), waits for a new epoch when some expert has no live worker, and records the round's latency
and routed tokens for /metrics. A head on an accelerator gets a `DeviceResult`: the CPU result moved
to its device by the head's own thread.

The placement comes from a `PlacementSource`: in a head, the Redis registry (cluster/control/
registry.py), handed in because router/ never imports cluster/. A watcher thread polls its epoch
(cheap: one HGET) and, on a new epoch, builds a `RemoteExpertBackend` for the new placement and
addresses on the same loop thread, then swaps it in. A round already in flight finishes on the
backend it started with (the old channels close after a grace period); the next MoE layer uses the
new one. Both hold the same weights, so the swap changes no result. If the source is unreachable
(Redis restarting) the current backend keeps serving. Epochs only move forward: a placement with an
epoch below the one in use (Redis rewritten by someone, or restored from an old dump) is refused,
logged and counted (`epochs_refused`); the current backend keeps serving. Every call to a worker
carries the cluster's token (`admin_token`).
Letters: T = tokens, H = hidden, k = experts per token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from typing import Protocol

import torch
from torch import Tensor

from nextserve.model.device import DeviceResult
from nextserve.router.channels import DispatchLoop
from nextserve.router.dispatch_recorder import DispatchRecorder
from nextserve.router.dispatcher import ExpertsUnavailableError, RemoteExpertBackend
from nextserve.router.placement import PlacementRecord

log = logging.getLogger(__name__)

POLL_S = 0.25
CLOSE_GRACE_S = 30.0
"""Old channels stay open this long after a swap, so in-flight calls (and their retries) finish."""


class PlacementSource(Protocol):
    """Where the published placement is read (cluster/control/registry.py's `Registry` is one)."""

    public_url: str
    """Named in the error when no placement appears (no password in it)."""

    def epoch(self) -> int:
        """The published epoch (0 before any placement); called every poll, so it must be cheap."""
        ...

    def placement(self) -> PlacementRecord | None:
        """The published placement with its epoch and workers' addresses; None before any."""
        ...


class EpochFollowingBackend:
    def __init__(self, source: PlacementSource, dtype: torch.dtype, deadline_s: float, num_experts: int,
                 unavailable_wait_s: float = 30.0, device: torch.device = torch.device("cpu"),
                 wait_s: float = 300.0, *, admin_token: str | None) -> None:
        """Waits up to `wait_s` for a placement from `source`. `num_experts` sizes the routed-token counts.
        `admin_token`: the cluster's, sent on every call to a worker (None: workers without one)."""
        self.source = source
        self.admin_token = admin_token
        self.dtype = dtype
        self.deadline_s = deadline_s
        self.num_experts = num_experts
        self.unavailable_wait_s = unavailable_wait_s
        self.device = device
        self.recorder = DispatchRecorder()
        self.loop = DispatchLoop()
        self.epoch = 0
        self.epochs_refused = 0
        """Placements read from Redis with an epoch below the one in use, refused (see the module doc);
        one that stays there is counted (and logged) once."""
        self._last_refused = 0
        self.current: RemoteExpertBackend | None = None
        self._retired: list[tuple[RemoteExpertBackend, threading.Timer]] = []  # closing after CLOSE_GRACE_S
        self._stop = threading.Event()
        deadline = time.monotonic() + wait_s
        while not self.refresh():
            if time.monotonic() > deadline:
                self.loop.stop()
                raise TimeoutError(f"no placement appeared in {source.public_url} within {wait_s} s")
            time.sleep(POLL_S)
        threading.Thread(target=self._watch, name="epoch-follower", daemon=True).start()

    def refresh(self) -> bool:
        """Swap in the published placement if it is newer; True when a backend is in place."""
        if self.current is not None:
            published = self.source.epoch()  # one HGET; the whole placement (48 x 512 entries) only when newer
            if 0 < published < self.epoch:  # 0: no placement (Redis lost it; the controller rewrites it)
                self._refuse(published)
            if published <= self.epoch:
                return True
        record = self.source.placement()
        if record is None or record.epoch == self.epoch:
            return self.current is not None
        if record.epoch < self.epoch:  # rewritten between the two reads
            self._refuse(record.epoch)
            return self.current is not None
        backend = RemoteExpertBackend(list(record.addresses), record.placement, self.dtype, self.deadline_s,
                                      loop=self.loop, admin_token=self.admin_token)
        old, self.current, self.epoch = self.current, backend, record.epoch
        log.info("dispatching with placement epoch %d (%s)", record.epoch, ", ".join(record.addresses))
        if old is not None:
            timer = threading.Timer(CLOSE_GRACE_S, old.close)
            timer.daemon = True
            timer.start()
            self._retired = [(b, t) for b, t in self._retired if t.is_alive()] + [(old, timer)]
        return True

    def _refuse(self, epoch: int) -> None:
        if epoch == self._last_refused:
            return
        self._last_refused = epoch
        self.epochs_refused += 1
        log.warning("refused placement epoch %d from Redis: epoch %d is in use and epochs only move forward "
                    "(%d refused so far); was Redis rewritten or restored?", epoch, self.epoch, self.epochs_refused)

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.refresh()
            except Exception as exc:  # Redis restarting: keep the current backend
                log.debug("epoch poll failed: %s", exc)

    def submit(self, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor) -> "Future[Tensor] | DeviceResult":
        """hidden [T, H], ids / weights [T, k] on the head's device -> a future of [T, H] on it."""
        if self.device.type != "cpu":  # the wire carries CPU bytes (model/device.py)
            hidden, ids, weights = hidden.cpu(), ids.cpu(), weights.cpu()
        future = self.loop.run(self._dispatch(layer, hidden, ids, weights))
        return future if self.device.type == "cpu" else DeviceResult(future, self.device)

    async def _dispatch(self, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        """On the loop thread: the current epoch's round; with experts unavailable, the next epoch's once
        one is published (within `unavailable_wait_s`), else the error."""
        start = time.perf_counter()
        self.recorder.record_tokens(layer, ids, self.num_experts)
        give_up_at = time.monotonic() + self.unavailable_wait_s
        while True:
            assert self.current is not None
            backend, epoch = self.current, self.epoch
            try:
                out = await backend.dispatch(layer, hidden, ids, weights)
                break
            except ExpertsUnavailableError:
                while self.epoch == epoch and time.monotonic() < give_up_at:
                    await asyncio.sleep(POLL_S / 5)
                if self.epoch == epoch:
                    raise
                log.info("layer %d: retrying on placement epoch %d", layer, self.epoch)
        self.recorder.record_latency(layer, time.perf_counter() - start)
        return out

    def close(self) -> None:
        """Close every backend, the retired ones too, while the loop still runs; then stop the loop."""
        self._stop.set()
        for backend, timer in self._retired:
            timer.cancel()
            backend.close()
        if self.current is not None:
            self.current.close()
        self.loop.stop()
