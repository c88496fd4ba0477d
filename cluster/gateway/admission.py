"""What the gateway refuses or cuts off before a head spends anything on it, and how a refusal reads.

    body past max_request_body_bytes (Content-Length, or as it streams in)  -> 413 in the path's API shape
    prompt of >= max_model_len tokens (contract.check_prompt_fits)           -> 400 context_length_exceeded,
                                                                                before the request leaves
    the head's queue full (engine or Serve: ErrorCode.OVERLOADED)           -> 429 (Anthropic: 529)
    every 429 / 503 / 529 error response                                    -> `Retry-After: RETRY_AFTER_S`
    a stream whose client reads nothing for stream_idle_timeout_s          -> aborted: slot and blocks freed

Streams are bounded end to end: the engine merges what a consumer has not taken into one item
(engine/detokenizer.py OutputStream), `idle_bounded` holds STREAM_BUFFER_ITEMS of a request's outputs,
`Choices` one per choice, and the HTTP server stops taking chunks when the client's socket is full.
When a client stops reading, that chain fills and `idle_bounded` waits stream_idle_timeout_s for room,
then closes the engine stream (which aborts the request in its head) instead of buffering up to
max_tokens. The HTTP connection itself stays until the client closes it; it holds nothing of the head's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from transformers import PreTrainedTokenizerBase

from nextserve.cluster.engine.contract import (RETRY_AFTER_S, EngineError, EngineRequest, EngineStats, ErrorCode,
                                               StepOutput, check_prompt_fits)
from nextserve.cluster.gateway.generation import EngineClient, Readiness
from nextserve.cluster.gateway.limits import GatewayLimits
from nextserve.cluster.gateway.protocols.openai import RequestError

log = logging.getLogger(__name__)

STREAM_BUFFER_ITEMS = 4
"""Outputs of one request the gateway holds that its client has not taken (each may merge many tokens)."""

RETRYABLE_STATUSES = frozenset({429, 503, 529})
"""Error statuses a client may retry as sent: they carry `Retry-After`."""


class BodyLimit:
    """ASGI middleware: a request body past `max_bytes` fails the handler's read with a 413 RequestError
    (the app's error handler answers it in the path's API shape); nothing past the limit is read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        num_received = int(declared) if declared.isdigit() else 0

        async def limited() -> Message:
            nonlocal num_received
            if num_received > self.max_bytes:
                raise self._too_large(num_received)
            message = await receive()
            if message["type"] == "http.request" and not declared.isdigit():  # chunked: count as it comes
                num_received += len(message.get("body", b""))
                if num_received > self.max_bytes:
                    raise self._too_large(num_received)
            return message

        await self.app(scope, limited, send)

    def _too_large(self, num_bytes: int) -> RequestError:
        return RequestError(413, f"the request body has {num_bytes} bytes or more, past this server's limit of "
                                 f"{self.max_bytes} (--max-request-body-bytes); send less (fewer or shorter "
                                 f"messages, images by URL)", code="request_too_large")


ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


def with_retry_after(handler: ErrorHandler) -> ErrorHandler:
    """`handler` with `Retry-After` added to the responses a client may retry (RETRYABLE_STATUSES), unless
    the refusal set its own (a tenant's token bucket knows when it refills)."""
    async def handle(request: Request, exc: Exception) -> Response:
        response = await handler(request, exc)
        if response.status_code in RETRYABLE_STATUSES:
            response.headers.setdefault("Retry-After", str(RETRY_AFTER_S))
        return response
    return handle


async def idle_bounded(stream: AsyncGenerator[StepOutput, None], idle_timeout_s: float,
                       request_id: str) -> AsyncGenerator[StepOutput, None]:
    """`stream`'s items through a buffer of STREAM_BUFFER_ITEMS; when it stays full for `idle_timeout_s`
    (the consumer took nothing), `stream` is closed (aborting its request) and the consumer, if it ever
    comes back, gets an EngineError CLIENT_TIMEOUT after what was buffered. Closing this closes `stream`."""
    buffer: asyncio.Queue[StepOutput | BaseException | None] = asyncio.Queue(STREAM_BUFFER_ITEMS)

    async def pump() -> None:
        last: BaseException | None = None
        try:
            async for out in stream:
                if not buffer.full():  # the usual case: no timer per streamed item
                    buffer.put_nowait(out)
                    continue
                try:
                    await asyncio.wait_for(buffer.put(out), idle_timeout_s)
                except TimeoutError:
                    log.info("request %s: its client read nothing for %s s; aborting it", request_id, idle_timeout_s)
                    last = EngineError(f"this stream was not read for {idle_timeout_s} s "
                                       f"(--stream-idle-timeout-s); the request was stopped",
                                       code=ErrorCode.CLIENT_TIMEOUT)
                    break
        except Exception as e:  # noqa: BLE001 - the consumer raises it
            last = e
        finally:
            await stream.aclose()  # aborts the request unless it finished
        await buffer.put(last)  # None: the end

    task = asyncio.create_task(pump())
    try:
        while (item := await buffer.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


class AdmittingClient:
    """The `EngineClient` the APIs see: `inner`'s, with the prompt checked against the context before a
    request leaves, and every stream `idle_bounded`."""

    def __init__(self, inner: EngineClient, limits: GatewayLimits) -> None:
        self.inner, self.limits = inner, limits

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.inner.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.inner.max_model_len

    async def generate(self, request: EngineRequest) -> AsyncGenerator[StepOutput, None]:
        check_prompt_fits(len(request.prompt_ids), self.max_model_len)
        stream = idle_bounded(self.inner.generate(request), self.limits.stream_idle_timeout_s, request.request_id)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    async def stats(self) -> EngineStats:
        return await self.inner.stats()

    async def is_ready(self) -> bool:
        return await self.inner.is_ready()

    async def readiness(self) -> Readiness:
        return await self.inner.readiness()
