"""Traces (cluster/tracing.py) through the in-process gateway and engine: configured by the same
`configure_tracing` a deployment calls, with the SDK's in-memory exporter in place of OTLP/HTTP. The
disabled case in a fresh interpreter (what it imports) and the OTLP/HTTP export to a real socket are
tests/process/test_tracing_process.py's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from gateway_local_engine import wait_until
from nextserve.cluster import tracing
from nextserve.cluster.tracing import TracingRole, configure_tracing, shutdown_tracing


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert configure_tracing("", TracingRole.GATEWAY, exporter=exporter)
    try:
        yield exporter
    finally:
        shutdown_tracing()


def _named(exporter: InMemorySpanExporter, name: str) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def _chat(http: httpx.Client, max_tokens: int = 4) -> httpx.Response:
    r = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": max_tokens, "temperature": 0,
                                                "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    return r


def test_a_request_yields_a_gateway_span_and_a_head_span_as_its_child(http: httpx.Client,
                                                                      spans: InMemorySpanExporter) -> None:
    r = _chat(http)
    body = r.json()
    wait_until(lambda: _named(spans, "POST /v1/chat/completions") and _named(spans, "head.generate"),
               "the gateway's and the head's spans were exported")
    (gateway,) = _named(spans, "POST /v1/chat/completions")
    (head,) = _named(spans, "head.generate")

    assert gateway.resource.attributes["service.name"] == "nextserve-gateway"
    assert gateway.parent is None
    assert gateway.attributes["nextserve.request_id"] == body["id"]
    assert gateway.attributes["nextserve.http_request_id"] == r.headers["x-request-id"]
    assert gateway.attributes["nextserve.model"] == "tiny"
    assert gateway.attributes["nextserve.endpoint"] == "/v1/chat/completions"
    assert gateway.attributes["nextserve.prompt_tokens"] == body["usage"]["prompt_tokens"] > 0
    assert gateway.attributes["nextserve.completion_tokens"] == body["usage"]["completion_tokens"] > 0
    assert list(gateway.attributes["nextserve.finish_reasons"]) == [body["choices"][0]["finish_reason"]]
    assert gateway.status.status_code != StatusCode.ERROR

    assert head.context.trace_id == gateway.context.trace_id
    assert head.parent is not None and head.parent.span_id == gateway.context.span_id
    assert head.attributes["nextserve.request_id"] == body["id"]
    assert [e.name for e in head.events] == ["admitted", "first_token", "finished"]
    assert head.events[-1].attributes["finish_reason"] == body["choices"][0]["finish_reason"]
    assert head.attributes["nextserve.completion_tokens"] == body["usage"]["completion_tokens"]

    steps = _named(spans, "head.step")
    assert steps, "no engine step span for the traced request"
    assert all(any(link.context.span_id == head.context.span_id for link in s.links) for s in steps)
    assert sum(s.attributes["nextserve.tokens"] for s in steps) >= body["usage"]["prompt_tokens"]


def test_a_refused_request_ends_its_span_as_an_error(http: httpx.Client, spans: InMemorySpanExporter) -> None:
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi " * 400, "max_tokens": 4})
    assert r.status_code == 400, r.text  # over the context: refused before any head sees it
    (gateway,) = _named(spans, "POST /v1/completions")
    assert gateway.status.status_code == StatusCode.ERROR
    assert [e.name for e in gateway.events] == ["exception"]
    assert not _named(spans, "head.generate") and not _named(spans, "head.step")


def test_tracing_off_starts_no_span(http: httpx.Client) -> None:
    assert configure_tracing("", TracingRole.GATEWAY) is False
    assert not tracing.is_enabled()
    assert tracing.start_request_span("/v1/completions", "id", "tiny") is None
    assert tracing.start_head_span("id", "00-" + "1" * 32 + "-" + "2" * 16 + "-01") is None
    assert tracing.start_step_span(["00-" + "1" * 32 + "-" + "2" * 16 + "-01"], 1, 1) is None
    _chat(http, max_tokens=2)  # the whole path runs with tracing off


def test_traces_url_adds_the_otlp_path_only_when_none_is_given() -> None:
    assert tracing.traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert tracing.traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert tracing.traces_url("https://c.example/otlp/v1/traces") == "https://c.example/otlp/v1/traces"
    with pytest.raises(ValueError, match="otlp_traces_endpoint"):
        tracing.traces_url("collector:4318")


def test_a_streamed_request_ends_its_span_with_the_usage(http: httpx.Client, spans: InMemorySpanExporter) -> None:
    with http.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status_code == 200
        text = r.read().decode()
    assert text.rstrip().endswith("data: [DONE]")
    wait_until(lambda: _named(spans, "POST /v1/chat/completions") and _named(spans, "head.generate"),
               "the streamed request's spans were exported")
    (gateway,) = _named(spans, "POST /v1/chat/completions")
    (head,) = _named(spans, "head.generate")
    assert gateway.attributes["nextserve.completion_tokens"] == head.attributes["nextserve.completion_tokens"] > 0
    assert head.parent.span_id == gateway.context.span_id
