"""One head's long-lived DispatchStream to one expert worker, shared by every round in flight.

    send(request) -> call_id stamped -> written (one writer at a time) -> a future, which the reader
    task completes with the reply matched by call_id -> reply_of(future): the reply, or WorkerCallError

A message on an open stream costs each end about half a unary call (measured with 32 x 256 float32
payloads on 2 cores: server 175 vs 360 us of CPU, client 156 vs 240 us, round trip 299 vs 589 us).
The stream opens on first use and again after it failed. A failure of the stream (worker gone,
connection reset) fails every request in flight on it with the stream's status; a request not answered
within its timeout fails with DEADLINE_EXCEEDED and resets the stream (a worker that stopped answering
is treated as gone); a reply with an error_code fails only its request. The stream sends the cluster's
token once, when it opens (a worker checks it then; its messages carry nothing more). Runs on the
channels' loop thread only (router/channels.py).
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from nextserve.proto import expert_pb2, expert_pb2_grpc
from nextserve.proto.codec import STATUS_BY_VALUE

log = logging.getLogger(__name__)


class WorkerCallError(Exception):
    """A Dispatch to one worker failed, with the gRPC status it failed with (`code()`, `details()`, as an
    `AioRpcError` has them): the stream's, the reply's, or DEADLINE_EXCEEDED."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def reply_of(future: "asyncio.Future[expert_pb2.DispatchReply]") -> expert_pb2.DispatchReply:
    """A done future's reply; WorkerCallError for a failed request or one whose reply carries an error."""
    reply = future.result()
    if reply.error_code:
        raise WorkerCallError(STATUS_BY_VALUE[reply.error_code], reply.error)
    return reply


class WorkerStream:
    def __init__(self, stub: expert_pb2_grpc.ExpertServiceStub, address: str,
                 metadata: tuple[tuple[str, str], ...] | None) -> None:
        """`metadata`: sent when the stream opens (proto/admin_auth.admin_metadata; None: nothing)."""
        self.stub, self.address, self.metadata = stub, address, metadata
        self._call: grpc.aio.StreamStreamCall | None = None
        self._pending: dict[int, asyncio.Future[expert_pb2.DispatchReply]] = {}  # of the open call
        self._write_lock = asyncio.Lock()
        self._next_id = 0
        self._reader: asyncio.Future[None] | None = None

    async def send(self, request: expert_pb2.DispatchRequest,
                   deadline: float) -> "asyncio.Future[expert_pb2.DispatchReply]":
        """Write `request` (its call_id is set here); -> the future of its reply, which fails with a
        WorkerCallError (the reply's status, or the stream's end). A write that fails, or that cannot be
        made before `deadline` (the loop's clock; a worker that stopped reading), fails the future and
        the stream, as UNAVAILABLE / DEADLINE_EXCEEDED: the caller fails over, whatever gRPC said."""
        if self._call is None:
            self._open()
        call, pending = self._call, self._pending
        assert call is not None
        self._next_id += 1
        request.call_id = self._next_id
        future: asyncio.Future[expert_pb2.DispatchReply] = asyncio.get_running_loop().create_future()
        pending[request.call_id] = future
        future.add_done_callback(lambda _: pending.pop(request.call_id, None))
        try:
            async with asyncio.timeout_at(deadline), self._write_lock:
                await call.write(request)
        except TimeoutError:
            self._fail(call, pending, WorkerCallError(grpc.StatusCode.DEADLINE_EXCEEDED, f"could not write to "
                                                      f"{self.address} in time; the stream is reset"))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # our caller is cancelled, not the stream
                raise
            self._fail(call, pending, self._lost(call, "the stream was reset during the write"))
        except Exception as exc:  # noqa: BLE001 - AioRpcError (INTERNAL when the peer died mid-write),
            # InvalidStateError / UsageError (written after the stream or channel ended): the stream is gone
            self._fail(call, pending, await self._ended(call, deadline, f"{type(exc).__name__}: {exc}"))
        return future

    async def _ended(self, call: grpc.aio.StreamStreamCall, deadline: float, why: str) -> WorkerCallError:
        """A write failed because the stream ended: UNAUTHENTICATED when the worker refused the token (which
        no replica would take: the caller is told, it does not fail over), else UNAVAILABLE (`_lost`). The
        stream's status is on its way (a dead peer's too: the transport is gone); waited for until `deadline`.
        Best effort: when the refusal races the first write, grpc-python gives the call INTERNAL instead
        (measured: 14 of 40 refused streams), which is failed over like a lost stream."""
        try:
            async with asyncio.timeout_at(deadline):
                code = await call.code()
        except TimeoutError:
            return self._lost(call, why)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return WorkerCallError(code, f"{self.address} refused the stream: {await call.details()}")
        return self._lost(call, why)

    def _lost(self, call: grpc.aio.StreamStreamCall, why: str) -> WorkerCallError:
        """The stream to this worker is gone: UNAVAILABLE (the caller fails over), naming what happened."""
        return WorkerCallError(grpc.StatusCode.UNAVAILABLE, f"the dispatch stream to {self.address} was lost: {why}")

    def expire(self, future: "asyncio.Future[expert_pb2.DispatchReply]", timeout: float) -> None:
        """`future` got no reply within `timeout` s: fail it (and everything on its stream) with
        DEADLINE_EXCEEDED and reset the stream; a worker that stopped answering is treated as gone."""
        error = WorkerCallError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply from {self.address} within "
                                                                    f"{timeout} s; the stream is reset")
        if self._call is not None and any(f is future for f in self._pending.values()):  # still the open stream's
            self._fail(self._call, self._pending, error)
        if not future.done():
            future.set_exception(error)

    def _open(self) -> None:
        self._call, self._pending = self.stub.DispatchStream(metadata=self.metadata), {}
        self._reader = asyncio.ensure_future(self._read(self._call, self._pending))

    async def close(self) -> None:
        """End the stream and wait for its reader (before the channel closes and the loop stops)."""
        if self._call is not None:
            self._fail(self._call, self._pending, WorkerCallError(grpc.StatusCode.CANCELLED,
                                                                  f"the dispatch stream to {self.address} was closed"))
        if self._reader is not None:
            await asyncio.wait((self._reader,))

    async def _read(self, call: grpc.aio.StreamStreamCall,
                    pending: dict[int, asyncio.Future[expert_pb2.DispatchReply]]) -> None:
        """Hand each reply to its request; when the stream ends, fail what is left on it."""
        try:
            while (reply := await call.read()) is not grpc.aio.EOF:
                future = pending.get(reply.call_id)
                if future is not None and not future.done():
                    future.set_result(reply)
            error = self._lost(call, "the worker ended it")
        except grpc.aio.AioRpcError as exc:  # a stream's own status is the transport's or a crash: fail over,
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:  # except a refused token: no replica takes it
                error = WorkerCallError(exc.code(), f"{self.address} refused the stream: {exc.details()}")
            else:
                error = self._lost(call, f"{exc.code().name}: {exc.details()}")
        except asyncio.CancelledError:
            error = WorkerCallError(grpc.StatusCode.CANCELLED, f"the dispatch stream to {self.address} was closed")
        self._fail(call, pending, error)

    def _fail(self, call: grpc.aio.StreamStreamCall, pending: dict[int, asyncio.Future[expert_pb2.DispatchReply]],
              error: WorkerCallError) -> None:
        """End `call` (if it is still the open one, the next dispatch opens another) and fail the requests
        in flight on it (`pending`, its own)."""
        if self._call is call:
            self._call = None
            call.cancel()
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
