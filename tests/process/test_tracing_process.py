"""Tracing (cluster/tracing.py) off by default costs no import: a fresh interpreter serving a request through
the in-process gateway and engine with the default settings never loads the OpenTelemetry SDK's tracing
or the exporter.
On, spans really leave by OTLP/HTTP: a collector stand-in on a loopback socket receives the protobuf POST."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

OFF_SCRIPT = """
import sys
from nextserve.cluster.app_args import AppArgs
from nextserve.cluster import tracing
from gateway_local_engine import Server, TinyEngine
import httpx

args = AppArgs(model=sys.argv[1])
assert args.otlp_traces_endpoint == ""
assert tracing.configure_tracing(args.otlp_traces_endpoint, tracing.TracingRole.GATEWAY) is False
with Server(TinyEngine(args.model, 128), "tiny") as server:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] > 0
assert not tracing.is_enabled()
loaded = sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk.trace", "opentelemetry.exporter")))
print("LOADED", loaded)
"""


def test_tracing_off_by_default_imports_no_sdk_and_serves(tiny_dir: Path) -> None:
    """Others load parts of OpenTelemetry whenever it is installed (FastAPI its API, a no-op without a
    provider; redis-py the SDK's metrics): the SDK's tracing, which any span we made would need, and the
    OTLP exporter stay unloaded."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", OFF_SCRIPT, str(tiny_dir)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED []" in done.stdout, done.stdout[-2000:]


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    _Collector.received = []
    server = HTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Collector.received
    finally:
        server.shutdown()
        server.server_close()


def test_spans_are_posted_to_the_otlp_http_endpoint(collector: tuple[str, list[tuple[str, str, bytes]]]) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from nextserve.cluster import tracing

    url, received = collector
    assert tracing.configure_tracing(url, tracing.TracingRole.HEAD)
    try:
        request = tracing.start_request_span("/v1/completions", "cmpl-1", "tiny", "req-1")
        assert request is not None
        head = tracing.start_head_span("cmpl-1", request.traceparent)
        assert head is not None
        head.admitted()
        head.on_output([7], "length", 3, 1)
        head.end()
        request.completed(1, ["length"])
        request.end()
    finally:
        tracing.shutdown_tracing()  # flushes the batch

    assert received, "nothing was POSTed to the endpoint"
    assert {path for path, _, _ in received} == {"/v1/traces"}
    assert {content_type for _, content_type, _ in received} == {"application/x-protobuf"}
    spans, services = {}, set()
    for _, _, body in received:
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            services |= {a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"}
            for scope in resource_spans.scope_spans:
                spans |= {s.name: s for s in scope.spans}
    assert services == {"nextserve-head"}
    assert set(spans) == {"POST /v1/completions", "head.generate"}
    gateway, child = spans["POST /v1/completions"], spans["head.generate"]
    assert child.trace_id == gateway.trace_id and child.parent_span_id == gateway.span_id
    assert [e.name for e in child.events] == ["admitted", "first_token", "finished"]
    attributes = {a.key: a.value for a in gateway.attributes}
    assert attributes["nextserve.request_id"].string_value == "cmpl-1"
    assert attributes["nextserve.completion_tokens"].int_value == 1
