"""Persistent gRPC channels to the expert workers, driven by one event-loop thread of this process.

A head's forward runs on ordinary threads; `run` hands a coroutine to the loop thread and returns a
`concurrent.futures.Future`, so the head can keep computing (the shared expert) while calls fly.
The loop thread is the channels' own, or one shared by several sets of channels (a head keeps one for
every placement epoch it follows: router/epoch_follower.py), which they then never stop.
Every call and stream carries the cluster's token (`metadata`; proto/admin_auth.py): a worker answers
UNAUTHENTICATED without it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc

from nextserve.proto import expert_pb2_grpc
from nextserve.proto.admin_auth import admin_metadata
from nextserve.proto.codec import MESSAGE_SIZE_OPTIONS
from nextserve.router.worker_stream import WorkerStream

T = TypeVar("T")

CHANNEL_OPTIONS = [
    *MESSAGE_SIZE_OPTIONS,
    # A killed worker must fail fast and be retried soon after it comes back, not after minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.enable_retries", 0),  # the dispatcher fails over to replicas itself
]


class DispatchLoop:
    """An asyncio loop on a daemon thread of its own, for gRPC channels to expert workers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="expert-dispatch", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> "Future[T]":
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            self.loop.close()


class WorkerChannels:
    def __init__(self, addresses: Sequence[str], loop: DispatchLoop | None = None, *,
                 admin_token: str | None) -> None:
        """On `loop` (shared, left running by `close`), else on a loop thread of their own. Every call
        sends `admin_token` (None: none, for workers started without one)."""
        self.addresses = list(addresses)
        self.metadata = None if admin_token is None else admin_metadata(admin_token)
        """What every call on these channels passes as `metadata=`."""
        self._owns_loop = loop is None
        self._loop = loop or DispatchLoop()
        self.loop = self._loop.loop
        self._channels: list[grpc.aio.Channel] = []
        self._is_closed = False
        self.stubs: list[expert_pb2_grpc.ExpertServiceStub] = self.run(self._open()).result()
        self.streams = [WorkerStream(stub, a, self.metadata) for stub, a in zip(self.stubs, self.addresses)]
        """Each worker's DispatchStream (opened on first use; loop thread only)."""

    async def _open(self) -> list[expert_pb2_grpc.ExpertServiceStub]:
        self._channels = [grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for a in self.addresses]
        return [expert_pb2_grpc.ExpertServiceStub(c) for c in self._channels]

    @property
    def thread_id(self) -> int | None:
        """The OS id of the loop thread (for CPU accounting in benchmarks)."""
        return self._loop.thread.native_id

    def run(self, coro: Coroutine[Any, Any, T]) -> "Future[T]":
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        if self._is_closed or not self._loop.thread.is_alive():
            return
        self._is_closed = True

        async def _close() -> None:
            await asyncio.gather(*(s.close() for s in self.streams))
            await asyncio.gather(*(c.close() for c in self._channels))

        self.run(_close()).result()
        if self._owns_loop:
            self._loop.stop()
