"""An `ExpertBackend` that follows the placement epoch published in Redis.

A watcher thread polls the registry's epoch (cheap: one HGET) and, on a new epoch, builds a
`RemoteExpertBackend` for the new placement and addresses, then swaps it in. A step already in flight
finishes on the backend it started with (the old channels close after a grace period); the next
MoE layer uses the new one. Both hold the same weights, so the swap changes no result. If Redis is
unreachable the current backend keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from nextserve.cluster.control.registry import Registry
from nextserve.router.dispatcher import ExpertsUnavailableError, RemoteExpertBackend

log = logging.getLogger(__name__)

POLL_S = 0.25
CLOSE_GRACE_S = 30.0
"""Old channels stay open this long after a swap, so in-flight calls (and their retries) finish."""


class EpochFollowingBackend:
    def __init__(self, registry: Registry, dtype: torch.dtype, deadline_s: float, unavailable_wait_s: float = 30.0,
                 wait_s: float = 300.0) -> None:
        self.registry = registry
        self.dtype = dtype
        self.deadline_s = deadline_s
        self.unavailable_wait_s = unavailable_wait_s
        self._retries = ThreadPoolExecutor(2, thread_name_prefix="unavailable-wait")
        self.epoch = 0
        self.current: RemoteExpertBackend | None = None
        self._stop = threading.Event()
        deadline = time.monotonic() + wait_s
        while not self.refresh():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no placement appeared in Redis ({registry.url}) within {wait_s} s")
            time.sleep(POLL_S)
        threading.Thread(target=self._watch, name="epoch-follower", daemon=True).start()

    def refresh(self) -> bool:
        """Swap in the published placement if it is newer; True when a backend is in place."""
        if self.current is not None and self.registry.epoch() == self.epoch:
            return True  # one HGET; the whole placement (48 x 512 entries) only when it changed
        record = self.registry.placement()
        if record is None or record.epoch == self.epoch:
            return self.current is not None
        backend = RemoteExpertBackend(list(record.addresses), record.placement, self.dtype, self.deadline_s)
        old, self.current, self.epoch = self.current, backend, record.epoch
        log.info("dispatching with placement epoch %d (%s)", record.epoch, ", ".join(record.addresses))
        if old is not None:
            threading.Timer(CLOSE_GRACE_S, old.close).start()
        return True

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.refresh()
            except Exception as exc:  # Redis restarting: keep the current backend
                log.debug("epoch poll failed: %s", exc)

    def submit(self, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor) -> "Future[Tensor]":
        """hidden [T, H], ids / weights [T, k] -> Future of [T, H]."""
        outer: Future[Tensor] = Future()
        self._attempt(outer, (layer, hidden, ids, weights), time.monotonic() + self.unavailable_wait_s)
        return outer

    def _attempt(self, outer: "Future[Tensor]", args: tuple[int, Tensor, Tensor, Tensor], give_up_at: float) -> None:
        assert self.current is not None
        epoch = self.epoch

        def done(inner: "Future[Tensor]") -> None:
            exc = inner.exception()
            if exc is None:
                outer.set_result(inner.result())
            elif isinstance(exc, ExpertsUnavailableError) and time.monotonic() < give_up_at:
                self._retries.submit(self._retry_on_new_epoch, outer, args, give_up_at, epoch, exc)
            else:
                outer.set_exception(exc)

        self.current.submit(*args).add_done_callback(done)

    def _retry_on_new_epoch(self, outer: "Future[Tensor]", args: tuple[int, Tensor, Tensor, Tensor],
                            give_up_at: float, epoch: int, exc: BaseException) -> None:
        while self.epoch == epoch and time.monotonic() < give_up_at:
            time.sleep(POLL_S / 5)
        if self.epoch == epoch:
            outer.set_exception(exc)
        else:
            log.info("layer %d: retrying on placement epoch %d", args[0], self.epoch)
            self._attempt(outer, args, give_up_at)

    def close(self) -> None:
        self._stop.set()
        self._retries.shutdown(wait=False)
        if self.current is not None:
            self.current.close()
