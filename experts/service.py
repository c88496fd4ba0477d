"""The ExpertService servicer: gRPC calls in, `experts.compute` and `experts.store` do the work.

Dispatch comes as unary calls or, from heads, as messages of a DispatchStream; both share `_dispatch`
(a stream's failed message gets a reply with its status instead of ending the stream).
Decoding and compute of large requests run in a thread pool (torch releases the GIL in its kernels),
so the asyncio loop keeps accepting calls from several heads while others compute; small requests
are computed inline (see INLINE_MAX_PAIRS); weight tables are copy-on-write
snapshots (experts/store.py), so concurrent Dispatch, LoadExperts and DropExperts are safe.
Every call reaches this servicer only with the cluster's admin token: experts/server.py puts
proto/admin_auth.py's TokenInterceptor in front of it (so an outsider's Dispatch is neither counted into
the expert loads nor into the in-flight calls a reshard drains on).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from nextserve.experts.busy_clock import BusyClock
from nextserve.experts.compute import INDEX_BYTES, ExpertsNotHeld, InvalidDispatch, compute_partial, decode_dispatch
from nextserve.experts.store import ExpertStore
from nextserve.model.checkpoint import CheckpointError
from nextserve.proto import expert_pb2, expert_pb2_grpc
from nextserve.proto.codec import STATUS_BY_VALUE, TORCH_TO_DTYPE, tensor_bytes

log = logging.getLogger(__name__)

INLINE_MAX_PAIRS = 1024
"""Requests with at most this many (token, expert) pairs are computed on the event loop itself: a
thread-pool hop costs ~0.5-2 ms under GIL contention (measured on 2 CPU cores, T = 64 x top-4 over 4
workers: 5.6-7.0 ms per round through the pool, 4.3-4.6 ms inline), more than such a batch's compute
(~0.5 ms), and it only delays other calls by about that much. Larger batches go to the pool."""


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    def __init__(self, store: ExpertStore, executor: ThreadPoolExecutor, max_message_bytes: int) -> None:
        """`max_message_bytes`: the server's message limit, which bounds Echo's reply too."""
        self.store = store
        self.executor = executor
        self.max_message_bytes = max_message_bytes
        self._stats_lock = threading.Lock()
        self._calls = self._hidden_bytes = 0
        self._inflight = 0
        self._inflight_by_epoch: dict[int, int] = {}
        """Dispatch calls being computed, by the epoch they were sent under: the controller drains a
        placement change on it (cluster/control/reshard.py)."""
        self.busy = BusyClock()
        """Seconds busy and call-seconds in flight (InfoReply.busy_s, inflight_s): the autoscaler's input."""

    async def Dispatch(self, request: expert_pb2.DispatchRequest,
                       context: grpc.aio.ServicerContext) -> expert_pb2.DispatchReply:
        reply = await self._dispatch(request)
        if reply.error_code:
            await context.abort(STATUS_BY_VALUE[reply.error_code], reply.error)
        return reply

    async def DispatchStream(self, requests: AsyncIterator[expert_pb2.DispatchRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[expert_pb2.DispatchReply]:
        """A head's stream: each request's reply in order, a failed one carrying its status (the stream goes on).
        One stream's messages are served one after another (a head's micro-batches queue behind each other
        here; other heads' streams are served between them as the loop allows)."""
        async for request in requests:
            yield await self._dispatch(request)

    async def _dispatch(self, request: expert_pb2.DispatchRequest) -> expert_pb2.DispatchReply:
        """One Dispatch's reply, or one with error_code / error set (what a unary call aborts with)."""
        self._inflight += 1  # only touched on the loop thread, like _inflight_by_epoch
        self._inflight_by_epoch[request.epoch] = self._inflight_by_epoch.get(request.epoch, 0) + 1
        self.busy.start()
        try:
            if len(request.expert_ids) <= INLINE_MAX_PAIRS * INDEX_BYTES:
                return self._serve(request)
            return await asyncio.get_running_loop().run_in_executor(self.executor, self._serve, request)
        except ExpertsNotHeld as exc:  # the caller's placement is not what this worker holds: it fails over
            log.info("Dispatch for experts not held (epoch %d here, %d asked): %s", self.store.epoch,
                     request.epoch, exc)
            return _failed(request, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except InvalidDispatch as exc:
            log.info("rejected Dispatch: %s", exc)
            return _failed(request, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug or the device (out of memory): this message fails, a
            log.exception("Dispatch failed")  # head's stream (its other messages) goes on
            return _failed(request, grpc.StatusCode.INTERNAL, f"the worker failed: {type(exc).__name__}: {exc}")
        finally:
            self.busy.end()
            self._inflight -= 1
            left = self._inflight_by_epoch.pop(request.epoch) - 1
            if left:
                self._inflight_by_epoch[request.epoch] = left

    def _serve(self, request: expert_pb2.DispatchRequest) -> expert_pb2.DispatchReply:
        """Runs on a pool thread: decode, validate, compute, encode, count."""
        store, config = self.store, self.store.config
        batch = decode_dispatch(request, store.snapshot(), store.dtype, config.hidden_size, config.num_experts)
        partial = compute_partial(batch)  # [t, H]
        store.record(batch.layer, batch.experts)
        reply = expert_pb2.DispatchReply(num_tokens=request.num_tokens, hidden_size=request.hidden_size,
                                         dtype=request.dtype, partial=tensor_bytes(partial), call_id=request.call_id)
        with self._stats_lock:  # counts from the decoded tensors: re-reading or re-sizing a message copies it
            self._calls += 1
            self._hidden_bytes += batch.hidden.nbytes
        return reply

    async def Info(self, request: expert_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> expert_pb2.InfoReply:
        return self.info()

    def info(self) -> expert_pb2.InfoReply:
        served = self.store.tokens_served()
        busy_s, inflight_s = self.busy.totals()
        with self._stats_lock:
            return expert_pb2.InfoReply(
                experts=[expert_pb2.ExpertLoad(layer=l, expert=e, tokens_served=served.get((l, e), 0))
                         for l, e in self.store.pairs()],
                dtype=TORCH_TO_DTYPE[self.store.dtype], epoch=self.store.epoch,
                hidden_size=self.store.config.hidden_size, dispatch_calls=self._calls,
                hidden_bytes=self._hidden_bytes, inflight=self._inflight,
                inflight_by_epoch=dict(self._inflight_by_epoch), busy_s=busy_s, inflight_s=inflight_s)

    async def LoadExperts(self, request: expert_pb2.LoadExpertsRequest,
                          context: grpc.aio.ServicerContext) -> expert_pb2.InfoReply:
        pairs = [(k.layer, k.expert) for k in request.experts]
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.store.load, pairs, request.epoch)
        except CheckpointError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info("loaded %d experts, epoch %d", len(pairs), request.epoch)
        return self.info()

    async def DropExperts(self, request: expert_pb2.DropExpertsRequest,
                          context: grpc.aio.ServicerContext) -> expert_pb2.InfoReply:
        pairs = [(k.layer, k.expert) for k in request.experts]
        await asyncio.get_running_loop().run_in_executor(self.executor, self.store.drop, pairs, request.epoch)
        log.info("dropped %d experts, epoch %d", len(pairs), request.epoch)
        return self.info()

    async def Echo(self, request: expert_pb2.EchoRequest, context: grpc.aio.ServicerContext) -> expert_pb2.EchoReply:
        if request.reply_bytes > self.max_message_bytes:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._echo_too_big(request))
        return expert_pb2.EchoReply(payload=bytes(request.reply_bytes))

    async def EchoStream(self, requests: AsyncIterator[expert_pb2.EchoRequest],
                         context: grpc.aio.ServicerContext) -> AsyncIterator[expert_pb2.EchoReply]:
        async for request in requests:
            if request.reply_bytes > self.max_message_bytes:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._echo_too_big(request))
            yield expert_pb2.EchoReply(payload=bytes(request.reply_bytes))

    def _echo_too_big(self, request: expert_pb2.EchoRequest) -> str:
        return (f"reply_bytes {request.reply_bytes} exceeds this worker's message limit {self.max_message_bytes} "
                f"(its largest Dispatch); ask for less")


def _failed(request: expert_pb2.DispatchRequest, code: grpc.StatusCode, message: str) -> expert_pb2.DispatchReply:
    return expert_pb2.DispatchReply(call_id=request.call_id, error_code=code.value[0], error=message)
