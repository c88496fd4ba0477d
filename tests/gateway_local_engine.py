"""The real engine (cluster/engine/engine.py) on the tiny checkpoint behind `LocalEngineClient`, with test hooks;
`Server`: the gateway app over it in uvicorn on a free loopback port in a thread; HTTP test helpers.

    Engine(head, RecordingBackend(FaultyBackend(LocalExpertBackend)))   <- LocalEngineClient <- build_app

`FaultyBackend` fails one forward pass on demand (the engine then fails every sequence in that step), and
`ObservedEngine` remembers which requests were aborted, so tests can prove how the gateway handles both.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from nextserve.cluster.engine.engine import Engine
from nextserve.cluster.engine.scheduler import SchedulerConfig
from nextserve.cluster.gateway.admission import GatewayLimits
from nextserve.cluster.gateway.app import build_app
from nextserve.cluster.gateway.tenants import TenantDirectory
from nextserve.model.expert_backend import ExpertBackend
from nextserve.router.local_backend import LocalExpertBackend, load_local_backend
from nextserve.model.loader import load_head
from nextserve.model.qwen3_next import HeadModel
from nextserve.model.sampling import SamplingParams
from engine_run import engine_tokens
from local_engine_client import LocalEngineClient
from recording_backend import RecordingBackend

RELEASE_TIMEOUT_S = 30.0
"""How long a forward pass armed to fail waits for the test's release before failing anyway."""


class InjectedFailure(RuntimeError):
    """Raised by FaultyBackend when a test asked for it (to prove the gateway survives engine failures)."""


class FaultyBackend:
    """Forwards to `inner`; `fail_after(n)` makes the forward pass after the next n ones raise."""

    def __init__(self, inner: ExpertBackend, first_moe_layer: int) -> None:
        self.inner = inner
        self.first_moe_layer = first_moe_layer  # a new forward pass starts at its first MoE layer
        self.forwards_before_failure: int | None = None
        self.release = threading.Event()

    def fail_after(self, forwards: int) -> threading.Event:
        """Arm a failure; it waits for the returned event, so a test can first read the outputs before it."""
        self.release = threading.Event()
        self.forwards_before_failure = forwards
        return self.release

    def submit(self, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor) -> Future[Tensor]:
        if layer == self.first_moe_layer and self.forwards_before_failure is not None:
            if self.forwards_before_failure == 0:
                self.forwards_before_failure = None
                self.release.wait(RELEASE_TIMEOUT_S)
                raise InjectedFailure("injected failure of a forward pass")
            self.forwards_before_failure -= 1
        return self.inner.submit(layer, hidden, ids, weights)


class ObservedEngine(Engine):
    """The engine, remembering the ids of the requests whose streams were closed before they finished."""

    def __init__(self, head: HeadModel, experts: ExpertBackend, tokenizer: PreTrainedTokenizerBase,
                 max_model_len: int, config: SchedulerConfig | None = None) -> None:
        self.aborted: list[str] = []  # before the engine thread starts
        super().__init__(head, experts, tokenizer, config, max_model_len=max_model_len)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        super().abort(request_id)

    def is_dropped(self, request_id: str) -> bool:
        """The request was aborted and the engine has freed it (nothing is running any more)."""
        return request_id in self.aborted and self.stats().num_running == 0


class TinyEngine:
    """The tiny checkpoint served by the real engine: `client` for the gateway, the pieces for the tests."""

    def __init__(self, checkpoint_dir: str | Path, max_model_len: int, config: SchedulerConfig | None = None) -> None:
        head = load_head(checkpoint_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
        self.experts: LocalExpertBackend = load_local_backend(checkpoint_dir)
        self.faults = FaultyBackend(self.experts, head.config.moe_layers[0])
        recording = RecordingBackend(self.faults, head.config.num_experts)
        self.engine = ObservedEngine(head, recording, self.tokenizer, max_model_len, config)
        self.client = LocalEngineClient(self.engine, recording.recorder)

    def reference(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """The output ids of the same engine run on this prompt alone, in this process."""
        (output_ids,) = engine_tokens(self.engine.head, self.experts, [prompt_ids], params, self.tokenizer)
        return output_ids


class Server:
    """A uvicorn server in a thread, on a free loopback port; the engine is shut down on exit."""

    def __init__(self, engine: TinyEngine, model_name: str, api_key: str | None = None,
                 limits: GatewayLimits | None = None, tenants: TenantDirectory | None = None) -> None:
        self.engine = engine
        self.app = build_app(engine.client, model_name, api_key, limits=limits, tenants=tenants)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        self.engine.faults.release.set()
        self.engine.client.shutdown()


def sse_events(text: str) -> list[str]:
    """The data payloads of an SSE body, checking the framing: every event is one `data: ` line."""
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e.removeprefix("data: ") for e in events]


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def scrape(http: httpx.Client) -> dict[str, float]:
    """/metrics as {name + sorted JSON labels: value}."""
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {s.name + json.dumps(s.labels, sort_keys=True): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def completions_total(status: int) -> str:
    """The scrape() key of the request counter for /v1/completions with `status`."""
    return f'nextserve_requests_total{{"endpoint": "/v1/completions", "status": "{status}"}}'
