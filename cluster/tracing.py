"""OpenTelemetry traces of a request across the cluster, off by default (--otlp-traces-endpoint).

    gateway  span "POST /v1/chat/completions"       (RequestSpan: request id, model, endpoint, tokens, finish)
      | W3C traceparent in EngineRequest.trace_context (crosses Ray with the request)
      v
    head     span "head.generate"                   (HeadSpan, child of the gateway's: events admitted,
                                                     first_token, finished)
               span "head.step"                      (StepSpan: one per engine step holding a traced
                                                     request, covering its MoE dispatch rounds to the
                                                     expert workers; linked to each traced request)

Each process calls `configure_tracing(args.otlp_traces_endpoint, role)` once at start. With an empty
endpoint (the default) it does nothing: `opentelemetry` is never imported, `is_enabled()` is False, and
every `start_*` returns None, so the serving path pays one None check per request and one bool check per
engine step. The packages are the optional extra `nextserve[otel]`. Spans leave through OTLP/HTTP
(protobuf) to the endpoint, batched off the serving thread; a test hands in its own exporter instead.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["HeadSpan", "RequestSpan", "StepSpan", "TracingRole", "TracingSetupError", "configure_tracing", "is_enabled",
           "shutdown_tracing", "start_head_span", "start_request_span", "start_step_span", "traces_url"]

TRACES_PATH = "/v1/traces"
"""OTLP/HTTP's path for traces, added to an endpoint given without a path."""


class TracingRole(enum.Enum):
    """A process's role: its spans' `service.name`."""
    GATEWAY = "nextserve-gateway"
    HEAD = "nextserve-head"


_tracer: Any = None  # an opentelemetry Tracer once configured; None: tracing is off in this process
_provider: Any = None  # its TracerProvider (flushed and shut down by shutdown_tracing)


class TracingSetupError(RuntimeError):
    """--otlp-traces-endpoint is set but the OpenTelemetry packages are missing."""


def traces_url(endpoint: str) -> str:
    """The URL spans are POSTed to: `endpoint` as given when it has a path, else with /v1/traces added
    (`http://collector:4318` -> `http://collector:4318/v1/traces`)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or not rest:
        raise ValueError(f"otlp_traces_endpoint={endpoint!r} is not a URL; give http(s)://HOST:PORT "
                         f"(OTLP/HTTP, e.g. http://otel-collector:4318)")
    has_path = "/" in rest and rest[rest.index("/"):] not in ("", "/")
    return endpoint if has_path else endpoint.rstrip("/") + TRACES_PATH


def configure_tracing(endpoint: str, role: TracingRole, exporter: Any = None) -> bool:
    """Turn tracing on in this process when `endpoint` (OTLP/HTTP) or `exporter` (an SDK SpanExporter,
    exported synchronously: tests) is given; returns whether it is on. Empty endpoint and no exporter:
    nothing happens and nothing of OpenTelemetry is imported. Configuring again replaces the previous
    setup (flushed first)."""
    global _tracer, _provider
    if not endpoint and exporter is None:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise TracingSetupError(f"otlp_traces_endpoint={endpoint!r} needs the OpenTelemetry SDK and its OTLP/HTTP "
                                f"exporter ({exc.name} is missing): pip install 'nextserve[otel]', or leave the "
                                f"endpoint empty") from exc
    shutdown_tracing()
    if exporter is None:
        processor: Any = BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint)))
    else:
        processor = SimpleSpanProcessor(exporter)
    provider = TracerProvider(resource=Resource.create({"service.name": role.value}))
    provider.add_span_processor(processor)
    _provider, _tracer = provider, provider.get_tracer("nextserve")
    return True


def shutdown_tracing() -> None:
    """Flush the spans not yet sent and turn tracing off in this process."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer, _provider = None, None


def is_enabled() -> bool:
    return _tracer is not None


def _parent_context(trace_context: str) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    return TraceContextTextMapPropagator().extract({"traceparent": trace_context})


def _traceparent(span: Any) -> str:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def _mark_error(span: Any, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


class RequestSpan:
    """The gateway's span of one API request, from its start to its reply's end."""

    def __init__(self, span: Any) -> None:
        self.span = span
        self.traceparent = _traceparent(span)
        """The W3C traceparent the head's span continues (EngineRequest.trace_context)."""

    def started(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.span.set_attribute("nextserve.prompt_tokens", prompt_tokens)
        self.span.set_attribute("nextserve.cached_tokens", cached_tokens)

    def completed(self, completion_tokens: int, finish_reasons: Sequence[str]) -> None:
        self.span.set_attribute("nextserve.completion_tokens", completion_tokens)
        self.span.set_attribute("nextserve.finish_reasons", list(finish_reasons))

    def end(self, error: BaseException | None = None) -> None:
        if error is not None:
            _mark_error(self.span, error)
        self.span.end()


def start_request_span(endpoint: str, request_id: str, model: str, http_request_id: str = "") -> RequestSpan | None:
    """The span of an API request at `endpoint` (its path): `request_id` is its response id (what the
    engine requests are named after), `http_request_id` its x-request-id; None when tracing is off."""
    if _tracer is None:
        return None
    from opentelemetry.trace import SpanKind
    span = _tracer.start_span(f"POST {endpoint}", kind=SpanKind.SERVER,
                              attributes={"nextserve.request_id": request_id, "nextserve.model": model,
                                          "nextserve.endpoint": endpoint, "http.route": endpoint,
                                          "nextserve.http_request_id": http_request_id})
    return RequestSpan(span)


class HeadSpan:
    """The head's span of one engine request (a child of the gateway's): admitted, first_token, finished."""

    def __init__(self, span: Any) -> None:
        self.span = span
        self.traceparent = _traceparent(span)
        """What the engine's step spans link to (the admitted request's trace_context)."""
        self.has_first_token = False

    def admitted(self) -> None:
        self.span.add_event("admitted")

    def on_output(self, token_ids: Sequence[int], finish_reason: str | None, prompt_tokens: int,
                  completion_tokens: int) -> None:
        if token_ids and not self.has_first_token:
            self.has_first_token = True
            self.span.add_event("first_token")
        if finish_reason is not None:
            self.span.add_event("finished", {"finish_reason": finish_reason})
            self.span.set_attribute("nextserve.prompt_tokens", prompt_tokens)
            self.span.set_attribute("nextserve.completion_tokens", completion_tokens)
            self.span.set_attribute("nextserve.finish_reason", finish_reason)

    def end(self, error: BaseException | None = None) -> None:
        if error is not None:
            _mark_error(self.span, error)
        self.span.end()


def start_head_span(request_id: str, trace_context: str) -> HeadSpan | None:
    """The head's span of a request carrying a gateway's traceparent, or None (tracing off in this process,
    or the request is not traced)."""
    if _tracer is None or not trace_context:
        return None
    from opentelemetry.trace import SpanKind
    span = _tracer.start_span("head.generate", context=_parent_context(trace_context), kind=SpanKind.SERVER,
                              attributes={"nextserve.request_id": request_id})
    return HeadSpan(span)


class StepSpan:
    """One engine step holding traced requests: the time of its forward, MoE dispatch rounds included."""

    def __init__(self, span: Any) -> None:
        self.span = span

    def end(self, error: BaseException | None = None) -> None:
        if error is not None:
            _mark_error(self.span, error)
        self.span.end()


def start_step_span(trace_contexts: Iterable[str], num_sequences: int, num_tokens: int) -> StepSpan | None:
    """A span of one engine step, linked to the traced requests in it (`trace_contexts`: their
    traceparents, "" for untraced ones); None when tracing is off or none of them is traced."""
    if _tracer is None:
        return None
    from opentelemetry import trace
    links = [trace.Link(trace.get_current_span(_parent_context(c)).get_span_context())
             for c in trace_contexts if c]
    if not links:
        return None
    from opentelemetry.context import Context
    span = _tracer.start_span("head.step", context=Context(), links=links,
                              attributes={"nextserve.sequences": num_sequences, "nextserve.tokens": num_tokens})
    return StepSpan(span)
