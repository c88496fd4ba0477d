"""The OpenAI-compatible HTTP app: a plain FastAPI factory the Ray Serve gateway deployment wraps.

    POST /v1/completions | /v1/chat/completions: parse + validate (openai_protocol) -> model -> tokenize
      (chat template) -> admit (prompt, max_tokens vs context) -> engine.generate -> await the first output
      (an engine refusal is still a 4xx) -> JSON, or SSE chunks ending in `data: [DONE]`
    GET /v1/models, /health (200 only when the engine is ready), /metrics (Prometheus text)

/v1 needs `Authorization: Bearer <api_key>` when an api_key is given; /health and /metrics stay open for
probes and scrapers. Client mistakes are 4xx and anything unexpected a 500, both with the OpenAI error body,
and serving goes on. When a client leaves, the engine stream is closed (`aclose`), which aborts the request.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from transformers import PreTrainedTokenizerBase

from nextserve.cluster.metrics import EngineStats, GatewayMetrics, RequestCounter, RequestTracker
from nextserve.cluster.openai_protocol import (SERVER_ERROR, SSE_DONE, ChatCompletionRequest, CompletionRequest, Endpoint,
                                     FinishReason, GenerationRequest, RequestError, ResponseHeader, Usage,
                                     chunk_body, error_body, parse_request, response_body, sse, usage_chunk_body,
                                     validation_error)
from nextserve.model.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineOutput(Protocol):
    """One item of an engine stream; the gateway reads only these."""
    @property
    def token_ids(self) -> Sequence[int]: ...  # the tokens new in this item
    @property
    def text(self) -> str: ...  # the text new in this item (stop strings already cut)
    @property
    def finish_reason(self) -> FinishReason: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...  # cumulative, including this item's


class EngineClient(Protocol):
    """What the gateway needs from the model side: an in-process engine, or a Ray handle to the heads."""
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...  # encodes prompts and applies the chat template
    @property
    def max_model_len(self) -> int: ...  # context length in tokens: prompt + completion

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 stop: list[str]) -> AsyncGenerator[EngineOutput, None]:
        """Stream one request's outputs. A refused request raises ValueError at the first iteration (naming
        the field in a `param` or `field` attribute, if known). The gateway calls `aclose()` when it stops
        early (the client went away); that must abort the request in the engine."""
        ...

    async def stats(self) -> EngineStats: ...
    async def is_ready(self) -> bool: ...  # heads and expert workers are up


@dataclass(frozen=True, slots=True)
class Admitted:
    header: ResponseHeader
    request: GenerationRequest
    prompt_ids: list[int]
    params: SamplingParams


def _prompt_ids(prompt: str | list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=False)
    vocab = len(tokenizer)
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise RequestError(400, f"prompt has token ids outside the vocabulary [0, {vocab}): {bad[:8]}", "prompt")
    return prompt


def _chat_ids(req: ChatCompletionRequest, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The checkpoint's chat template with the assistant's generation prompt appended."""
    try:
        text = tokenizer.apply_chat_template([m.as_template_input() for m in req.messages],
                                             add_generation_prompt=True, tokenize=False)
    except TemplateError as e:
        raise RequestError(400, f"the model's chat template refused these messages: {e}", "messages") from None
    return tokenizer.encode(str(text), add_special_tokens=False)


def _admit(endpoint: Endpoint, req: GenerationRequest, prompt_ids: list[int], model_name: str,
           max_model_len: int) -> Admitted:
    """Check the prompt and max_tokens against the context; an unset max_tokens fills the rest of it."""
    n, param = len(prompt_ids), req.prompt_param
    if n == 0:
        raise RequestError(400, f"{param} is empty: it must encode to at least one token", param)
    if n >= max_model_len:
        raise RequestError(400, f"{param} is {n} tokens, but this model's context is {max_model_len} tokens: "
                           f"shorten it to at most {max_model_len - 1}", param, code="context_length_exceeded")
    room = max_model_len - n
    max_tokens, max_tokens_param, is_explicit = req.max_tokens_request()
    if max_tokens is not None and max_tokens > room and is_explicit:
        raise RequestError(400, f"{max_tokens_param}={max_tokens} plus the prompt's {n} tokens exceeds this "
                           f"model's context of {max_model_len} tokens: ask for at most {room}",
                           max_tokens_param, code="context_length_exceeded")
    header = ResponseHeader(endpoint, f"{endpoint.id_prefix}-{uuid.uuid4().hex}", int(time.time()), model_name)
    params = req.sampling_params(room if max_tokens is None else min(max_tokens, room))
    return Admitted(header, req, prompt_ids, params)


async def _outputs(first: EngineOutput, stream: AsyncGenerator[EngineOutput, None],
                   tracker: RequestTracker) -> AsyncGenerator[EngineOutput, None]:
    """`first`, then the rest of `stream`; closes the stream and finishes the tracker however it ends."""
    async with aclosing(stream):
        try:
            tracker.on_output(first)
            yield first
            async for out in stream:
                tracker.on_output(out)
                yield out
        finally:
            tracker.finish()


async def _start(engine: EngineClient, job: Admitted, tracker: RequestTracker) -> AsyncGenerator[EngineOutput, None]:
    """Start generating and wait for the first output, so that an engine refusal is still a 4xx."""
    stream = engine.generate(job.header.id, job.prompt_ids, job.params, job.request.stop)
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        raise RuntimeError(f"the engine ended request {job.header.id} without any output") from None
    except ValueError as e:  # a refusal; it may name the field as `param` or `field`, in the engine's words
        f = str(getattr(e, "param", None) or getattr(e, "field", None) or "")
        param = {"prompt": job.request.prompt_param, "max_tokens": job.request.max_tokens_request()[1]}.get(f, f)
        raise RequestError(400, f"the engine refused the request: {e}", param or None) from None
    except BaseException:
        await stream.aclose()
        raise
    return _outputs(first, stream, tracker)


async def _events(outs: AsyncGenerator[EngineOutput, None], job: Admitted) -> AsyncIterator[str]:
    """SSE: a first chunk (a chat one carries the role), text chunks, a finish chunk, usage, [DONE]."""
    h, last, include_usage = job.header, None, job.request.include_usage
    async with aclosing(outs):
        try:
            async for out in outs:
                if last is None or out.text:
                    yield sse(chunk_body(h, out.text, None, last is None, include_usage))
                if out.finish_reason is not None:
                    yield sse(chunk_body(h, "", out.finish_reason, False, include_usage))
                last = out
        except Exception as e:
            log.exception("request %s failed while streaming", h.id)
            yield sse(error_body(f"generation failed: {e}", SERVER_ERROR))
            yield SSE_DONE
            return
    if include_usage and last is not None:
        yield sse(usage_chunk_body(h, Usage(last.prompt_tokens, last.completion_tokens)))
    yield SSE_DONE


async def _respond(request: Request, engine: EngineClient, job: Admitted, metrics: GatewayMetrics) -> Response:
    outs = await _start(engine, job, metrics.track())
    if job.request.stream:
        return StreamingResponse(_events(outs, job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    parts, last = [], None
    async with aclosing(outs):
        async for out in outs:
            parts.append(out.text)
            last = out
            if out.finish_reason is None and await request.is_disconnected():
                return Response(status_code=499)  # nobody reads it; leaving the loop aborts the engine request
    assert last is not None  # _start returned only after a first output
    usage = Usage(last.prompt_tokens, last.completion_tokens)
    return JSONResponse(response_body(job.header, "".join(parts), last.finish_reason, usage))


def _authorizer(api_key: str) -> Any:
    async def authorize(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise RequestError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise RequestError(401, "Incorrect API key provided.", code="invalid_api_key")
    return authorize


async def _on_error(_: Request, e: Exception) -> JSONResponse:
    """Errors as the OpenAI body: ours, FastAPI's validation errors, Starlette's 404 and 405."""
    if isinstance(e, RequestValidationError):
        e = validation_error(list(e.errors()))
    if isinstance(e, RequestError):
        return JSONResponse(e.body(), e.status_code)
    assert isinstance(e, HTTPException)
    return JSONResponse(error_body(str(e.detail)), e.status_code, headers=e.headers)


def _crash_barrier(app: ASGIApp) -> ASGIApp:
    """A 500 OpenAI body for what no handler took (Starlette's 500 handler re-raises: the server drops the link)."""
    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        is_started = False

        async def send_tracked(message: Message) -> None:
            nonlocal is_started
            is_started = is_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, receive, send_tracked)
        except Exception:
            log.exception("unhandled error serving %s %s", scope.get("method"), scope.get("path"))
            if not is_started:
                await JSONResponse(error_body("internal server error", SERVER_ERROR), 500)(scope, receive, send)
    return guarded


class Gateway:
    """The routes' handlers over one engine, served under one model name."""

    def __init__(self, engine: EngineClient, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name
        self.metrics = GatewayMetrics()
        self.card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "nextserve",
                     "max_model_len": engine.max_model_len}

    async def completions(self, request: Request) -> Response:
        req = parse_request(await request.body(), CompletionRequest)
        self._check_model(req.model)
        ids = _prompt_ids(req.prompt, self.engine.tokenizer)
        job = _admit(Endpoint.COMPLETIONS, req, ids, self.model_name, self.engine.max_model_len)
        return await _respond(request, self.engine, job, self.metrics)

    async def chat_completions(self, request: Request) -> Response:
        req = parse_request(await request.body(), ChatCompletionRequest)
        self._check_model(req.model)
        ids = _chat_ids(req, self.engine.tokenizer)
        job = _admit(Endpoint.CHAT, req, ids, self.model_name, self.engine.max_model_len)
        return await _respond(request, self.engine, job, self.metrics)

    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.card]}

    async def retrieve_model(self, model: str) -> dict[str, Any]:
        self._check_model(model)
        return self.card

    async def health(self) -> Response:
        try:
            if await self.engine.is_ready():
                return JSONResponse({"status": "ok"})
        except Exception:
            log.warning("readiness check failed", exc_info=True)
        body = error_body("not ready: heads or expert workers are not up", SERVER_ERROR, code="not_ready")
        return JSONResponse(body, 503)

    async def metrics_text(self) -> Response:
        try:
            self.metrics.observe_engine_stats(await self.engine.stats())
        except Exception:
            log.warning("engine stats unavailable; serving the gateway's own metrics", exc_info=True)
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    def _check_model(self, requested: str) -> None:
        if requested != self.model_name:
            raise RequestError(404, f"The model '{requested}' does not exist; this server serves "
                               f"'{self.model_name}'.", "model", code="model_not_found")


def build_app(engine: EngineClient, model_name: str, api_key: str | None = None) -> FastAPI:
    """The gateway app serving `engine` under the name `model_name`; `api_key` None leaves /v1 open."""
    gateway = Gateway(engine, model_name)
    app = FastAPI(title="nextserve", docs_url=None, redoc_url=None)
    app.state.gateway = gateway
    for exc in (RequestError, RequestValidationError, HTTPException):
        app.add_exception_handler(exc, _on_error)
    app.add_middleware(_crash_barrier)
    app.add_middleware(RequestCounter, metrics=gateway.metrics)  # outside the barrier: counts its 500s
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_authorizer(api_key))] if api_key else [])
    v1.add_api_route("/completions", gateway.completions, methods=["POST"])
    v1.add_api_route("/chat/completions", gateway.chat_completions, methods=["POST"])
    v1.add_api_route("/models", gateway.list_models, methods=["GET"])
    v1.add_api_route("/models/{model:path}", gateway.retrieve_model, methods=["GET"])
    app.include_router(v1)
    app.add_api_route("/health", gateway.health, methods=["GET"])
    app.add_api_route("/metrics", gateway.metrics_text, methods=["GET"])
    return app
