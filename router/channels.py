"""Persistent gRPC channels to the expert workers, driven by one event-loop thread of this process.

A head's forward runs on ordinary threads; `run` hands a coroutine to the loop thread and returns a
`concurrent.futures.Future`, so the head can keep computing (the shared expert) while calls fly.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc

from nextserve.proto import expert_pb2_grpc
from nextserve.proto.codec import MESSAGE_SIZE_OPTIONS

T = TypeVar("T")

CHANNEL_OPTIONS = [
    *MESSAGE_SIZE_OPTIONS,
    # A killed worker must fail fast and be retried soon after it comes back, not after minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.enable_retries", 0),  # the dispatcher fails over to replicas itself
]


class WorkerChannels:
    def __init__(self, addresses: Sequence[str]) -> None:
        self.addresses = list(addresses)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="expert-dispatch", daemon=True)
        self._thread.start()
        self._channels: list[grpc.aio.Channel] = []
        self.stubs: list[expert_pb2_grpc.ExpertServiceStub] = self.run(self._open()).result()

    async def _open(self) -> list[expert_pb2_grpc.ExpertServiceStub]:
        self._channels = [grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for a in self.addresses]
        return [expert_pb2_grpc.ExpertServiceStub(c) for c in self._channels]

    @property
    def thread_id(self) -> int | None:
        """The OS id of the loop thread (for CPU accounting in benchmarks)."""
        return self._thread.native_id

    def run(self, coro: Coroutine[Any, Any, T]) -> "Future[T]":
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def _close() -> None:
            await asyncio.gather(*(c.close() for c in self._channels))

        self.run(_close()).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
