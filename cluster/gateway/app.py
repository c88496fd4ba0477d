"""The HTTP gateway: a plain FastAPI factory the Ray Serve gateway deployment wraps.

    POST /v1/completions, /v1/chat/completions         OpenAI (openai_api.py)
    POST /v1/messages, /v1/messages/count_tokens        Anthropic Messages (anthropic_api.py)
    POST /v1/responses                                  OpenAI Responses, stateless (responses_api.py; Codex)
    GET  /v1/models, /metrics (Prometheus text)
    GET  /health/live    200 while this process serves HTTP; checks nothing else (Kubernetes' liveness)
    GET  /health/ready   200 when this replica can serve a request now: a head reachable, every expert with
                         a live replica; a degraded cluster (a worker down, R = 2) stays ready and says so
                         in the body; else 503 (Kubernetes' readiness: the pod leaves the Service)
    GET  /health         200 only when the whole cluster is up: every head and worker (the operator's view)

/v1 needs an API key, when keys are given, as `Authorization: Bearer <key>` or `x-api-key: <key>` (what
the anthropic SDK sends); the key names the tenant (tenants.py), which goes on every engine request (its
prefix cache salt, its share of admissions) and is held to its limits (429 + Retry-After). /health* and
/metrics stay open for probes and scrapers. Client mistakes are
4xx and anything unexpected a 500, in the error shape of the API the path belongs to, and serving goes
on. A client error carries a stable message, never internals (tracebacks, pids, addresses, file paths);
every response carries `x-request-id` (the client's when sane, else a fresh one: request_id.py), and the
logs of that request carry it too. When a client leaves, its engine streams are closed (`aclose`), which aborts the requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nextserve.cluster.gateway.admission import AdmittingClient, BodyLimit, GatewayLimits, with_retry_after
from nextserve.cluster.gateway.anthropic_api import AnthropicApi
from nextserve.cluster.gateway.generation import EngineClient, Readiness
from nextserve.cluster.gateway.metrics import GatewayMetrics, RequestCounter
from nextserve.cluster.gateway.openai_api import OpenAIApi, check_model
from nextserve.cluster.gateway.protocols import anthropic
from nextserve.cluster.gateway.protocols.openai import SERVER_ERROR, RequestError, error_body, validation_error
from nextserve.cluster.gateway.request_id import RequestIdMiddleware, current_request_id
from nextserve.cluster.gateway.responses_api import ResponsesApi
from nextserve.cluster.gateway.tenants import TenantDirectory
from nextserve.cluster.control.scaling_status import ScalingStatus
from nextserve.cluster.engine.contract import SamplingDefaults, SamplingError

log = logging.getLogger(__name__)

ScalingSource = Callable[[], Awaitable[ScalingStatus | None]]
"""Where /metrics reads the autoscaling loop's status (the gateway deployment: the Redis registry)."""

ANTHROPIC_PATHS = "/v1/messages"
"""Paths under this prefix answer errors in Anthropic's shape."""


def _authorizer(directory: TenantDirectory) -> Any:
    """The /v1 dependency: the request's Caller (request.state.caller) from its key, or a 401."""
    async def authorize(request: Request) -> None:
        if directory.is_open:
            request.state.caller = directory.open_caller()
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key", "").strip()
        if not token:
            raise RequestError(401, "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                               code="invalid_api_key")
        caller = directory.authenticate(token)
        if caller is None:
            raise RequestError(401, "Incorrect API key provided.", code="invalid_api_key")
        request.state.caller = caller
    return authorize


def _as_anthropic(e: Exception) -> anthropic.AnthropicError:
    if isinstance(e, anthropic.AnthropicError):
        return e
    if isinstance(e, RequestValidationError):
        return anthropic.validation_error(list(e.errors()))
    if isinstance(e, RequestError):
        error = anthropic.AnthropicError(e.status_code, e.message)
        error.headers = e.headers
        return error
    if isinstance(e, SamplingError):
        return anthropic.AnthropicError(400, f"{e.param}: {e.message}")
    assert isinstance(e, HTTPException)
    return anthropic.AnthropicError(e.status_code, str(e.detail))


async def _on_error(request: Request, e: Exception) -> JSONResponse:
    """Errors in the shape of the path's API: ours, FastAPI's validation errors, Starlette's 404 and 405."""
    if request.url.path.startswith(ANTHROPIC_PATHS):
        error = _as_anthropic(e)
        return JSONResponse(error.body, error.status, headers=error.headers)
    if isinstance(e, RequestValidationError):
        e = validation_error(list(e.errors()))
    if isinstance(e, SamplingError):  # a sampling value SamplingParams refuses: the client's, naming the field
        e = RequestError(400, e.message, e.param, code="invalid_value")
    if isinstance(e, RequestError):
        return JSONResponse(e.body(), e.status_code, headers=e.headers)
    if isinstance(e, anthropic.AnthropicError):
        return JSONResponse(error_body(e.message), e.status)
    assert isinstance(e, HTTPException)
    return JSONResponse(error_body(str(e.detail)), e.status_code, headers=e.headers)


def _crash_barrier(app: ASGIApp) -> ASGIApp:
    """A 500 error body for what no handler took (Starlette's 500 handler re-raises: the server drops the link)."""
    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        is_started = False

        async def send_tracked(message: Message) -> None:
            nonlocal is_started
            is_started = is_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, receive, send_tracked)
        except Exception:
            log.exception("request %s: unhandled error serving %s %s", current_request_id(), scope.get("method"),
                          scope.get("path"))
            if not is_started:
                is_anthropic = str(scope.get("path", "")).startswith(ANTHROPIC_PATHS)
                body = anthropic.error_body(500, "internal server error") if is_anthropic else \
                    error_body("internal server error", SERVER_ERROR)
                await JSONResponse(body, 500)(scope, receive, send)
    return guarded


class Gateway:
    """The routes that are not an API's own: models, health, metrics."""

    def __init__(self, engine: EngineClient, model_name: str, defaults: SamplingDefaults,
                 tenants: TenantDirectory, scaling: ScalingSource | None = None) -> None:
        self.engine, self.model_name = engine, model_name
        self.scaling = scaling
        self.metrics = GatewayMetrics(tenants.tenant_names)
        self.openai = OpenAIApi(engine, model_name, self.metrics, defaults)
        self.anthropic = AnthropicApi(engine, model_name, self.metrics, defaults)
        self.responses = ResponsesApi(engine, model_name, self.metrics, defaults)
        self.card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "nextserve",
                     "max_model_len": engine.max_model_len}

    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.card]}

    async def retrieve_model(self, model: str) -> dict[str, Any]:
        check_model(model, self.card["id"])
        return self.card

    async def health(self) -> Response:
        try:
            if await self.engine.is_ready():
                return JSONResponse({"status": "ok"})
        except Exception:
            log.warning("readiness check failed", exc_info=True)
        body = error_body("not ready: heads or expert workers are not up", SERVER_ERROR, code="not_ready")
        return JSONResponse(body, 503)

    async def live(self) -> Response:
        return JSONResponse({"status": "live"})

    async def ready(self) -> Response:
        try:
            readiness = await self.engine.readiness()
        except Exception as exc:  # its text may hold addresses: logged, only its type in the body
            log.warning("readiness check failed", exc_info=True)
            readiness = Readiness(False, f"the readiness check failed ({type(exc).__name__}); it was logged")
        if not readiness.is_ready:
            body = error_body(f"not ready: {readiness.reason}", SERVER_ERROR, code="not_ready")
            return JSONResponse({**body, "workers_down": list(readiness.workers_down)}, 503)
        if readiness.is_degraded:
            return JSONResponse({"status": "degraded", "reason": readiness.reason,
                                 "workers_down": list(readiness.workers_down)})
        return JSONResponse({"status": "ok"})

    async def metrics_text(self) -> Response:
        try:
            self.metrics.observe_engine_stats(await self.engine.stats())
        except Exception:
            log.warning("engine stats unavailable; serving the gateway's own metrics", exc_info=True)
        try:
            status = await self.scaling() if self.scaling is not None else None
            if status is not None:
                self.metrics.observe_scaling(status)
        except Exception:
            log.warning("the scaling status is unavailable; serving the other metrics", exc_info=True)
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)


def build_app(engine: EngineClient, model_name: str, api_key: str | None = None,
              defaults: SamplingDefaults | None = None, limits: GatewayLimits | None = None,
              tenants: TenantDirectory | None = None, scaling: ScalingSource | None = None) -> FastAPI:
    """The gateway app serving `engine` under the name `model_name`. `tenants` (the keys file's) or else
    `api_key` (one tenant) guard /v1; neither leaves it open. `defaults` are what requests that leave
    temperature / top_p / top_k unset sample with; `limits` what a client may send and how long a stream
    may go unread (admission.py); `scaling` where /metrics reads the autoscaling status (a cluster's
    registry; None in one process)."""
    if tenants is not None and api_key is not None:
        raise ValueError("give api_key (one tenant) or tenants (a keys file), not both")
    tenants = tenants or TenantDirectory.single(api_key)
    limits = limits or GatewayLimits()
    gateway = Gateway(AdmittingClient(engine, limits), model_name, defaults or SamplingDefaults(), tenants, scaling)
    app = FastAPI(title="nextserve", docs_url=None, redoc_url=None)
    app.state.gateway = gateway
    for exc in (RequestError, anthropic.AnthropicError, RequestValidationError, HTTPException, SamplingError):
        app.add_exception_handler(exc, with_retry_after(_on_error))
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_body_bytes)
    app.add_middleware(_crash_barrier)
    app.add_middleware(RequestCounter, metrics=gateway.metrics)  # outside the barrier: counts its 500s
    app.add_middleware(RequestIdMiddleware)  # outermost: every response carries x-request-id
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_authorizer(tenants))])
    v1.add_api_route("/completions", gateway.openai.completions, methods=["POST"])
    v1.add_api_route("/chat/completions", gateway.openai.chat_completions, methods=["POST"])
    v1.add_api_route("/messages", gateway.anthropic.messages, methods=["POST"])
    v1.add_api_route("/messages/count_tokens", gateway.anthropic.count_tokens, methods=["POST"])
    v1.add_api_route("/responses", gateway.responses.responses, methods=["POST"])
    v1.add_api_route("/models", gateway.list_models, methods=["GET"])
    v1.add_api_route("/models/{model:path}", gateway.retrieve_model, methods=["GET"])
    app.include_router(v1)
    app.add_api_route("/health", gateway.health, methods=["GET"])
    app.add_api_route("/health/live", gateway.live, methods=["GET"])
    app.add_api_route("/health/ready", gateway.ready, methods=["GET"])
    app.add_api_route("/metrics", gateway.metrics_text, methods=["GET"])
    return app
