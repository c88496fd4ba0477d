"""An in-process EngineClient over model/generate.py's step loop (the real tiny model behind the gateway
tests), `Server`: the gateway app in uvicorn on a free loopback port in a thread, and HTTP test helpers.

Each request runs its own `model.generate.Sequence`, one `step` at a time in a worker thread; an asyncio
lock interleaves concurrent requests step by step (no batching: that is cluster/engine.py's job). The
expert backend is wrapped to record what `EngineStats` reports: per-layer dispatch latency and tokens
per (layer, expert). Text deltas are detokenized incrementally, with stop strings cut and held back.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cluster.gateway_app import build_app
from cluster.metrics import EngineStats
from model.cache import SequenceCache
from model.expert_backend import LocalExpertBackend
from model.generate import DEFAULT_PREFILL_CHUNK, Sequence, step
from model.loader import load_head, load_local_backend
from model.sampling import SamplingParams, make_generator


class LocalEngineError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class InjectedFailure(RuntimeError):
    """Raised by the engine when a test asked it to fail (to prove the gateway survives engine crashes)."""


@dataclass(frozen=True, slots=True)
class LocalOutput:
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class MeteredBackend:
    """LocalExpertBackend that records each layer's dispatch latency and the tokens each expert receives."""

    def __init__(self, inner: LocalExpertBackend) -> None:
        self.inner = inner
        self.latency_s: defaultdict[int, list[float]] = defaultdict(list)
        self.expert_tokens: Counter[tuple[int, int]] = Counter()

    def submit(self, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor) -> Future[Tensor]:
        start = time.perf_counter()
        future = self.inner.submit(layer, hidden, ids, weights)
        future.result()
        self.latency_s[layer].append(time.perf_counter() - start)
        experts, counts = torch.unique(ids, return_counts=True)
        for e, c in zip(experts.tolist(), counts.tolist(), strict=True):
            self.expert_tokens[(layer, e)] += c
        return future

    def drain(self) -> tuple[dict[int, list[float]], dict[tuple[int, int], int]]:
        latency, tokens = dict(self.latency_s), dict(self.expert_tokens)
        self.latency_s, self.expert_tokens = defaultdict(list), Counter()
        return latency, tokens


class TextTracker:
    """Incremental detokenization: the text delta of each new token, stop strings cut, held back at the end."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.emitted = 0

    def delta(self, output_ids: list[int], is_finished: bool) -> tuple[str, bool]:
        """(new text, whether a stop string ended it)."""
        text = str(self.tokenizer.decode(output_ids, skip_special_tokens=True))
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, is_finished = text[:cut], True
        end = len(text) if is_finished else max(self.emitted, len(text.rstrip("\ufffd")) - self.holdback)
        new, self.emitted = text[self.emitted:end], end
        return new, cut >= 0


class LocalEngine:
    def __init__(self, checkpoint_dir: str | Path, max_model_len: int | None = None) -> None:
        self.head = load_head(checkpoint_dir)
        self.experts = MeteredBackend(load_local_backend(checkpoint_dir))
        self._tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
        self._max_model_len = max_model_len or self.head.config.max_position_embeddings
        self._lock: asyncio.Lock | None = None
        self.num_running = 0
        self.num_waiting = 0
        self.is_up = True
        self.aborted: list[str] = []
        self.fail_after_outputs: int | None = None
        """Test hook: the next request raises InjectedFailure after this many outputs (0: at once)."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    async def is_ready(self) -> bool:
        return self.is_up

    async def stats(self) -> EngineStats:
        latency, tokens = self.experts.drain()
        return {"num_running": self.num_running, "num_waiting": self.num_waiting,
                "dispatch_latency_s": latency, "expert_tokens": tokens}

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       stop: list[str]) -> AsyncGenerator[LocalOutput, None]:
        if len(prompt_ids) + params.max_tokens > self._max_model_len:
            raise LocalEngineError("max_tokens", f"prompt + max_tokens exceeds the context {self._max_model_len}")
        fail_after, self.fail_after_outputs = self.fail_after_outputs, None
        seq = Sequence(list(prompt_ids), params, SequenceCache.empty(self.head.config),
                       generator=make_generator(params))
        text = TextTracker(self._tokenizer, stop)
        self._lock = self._lock or asyncio.Lock()
        self.num_running += 1
        try:
            while not seq.finished:
                if fail_after is not None and len(seq.output) >= fail_after:
                    raise InjectedFailure(f"injected failure in {request_id}")
                self.num_waiting += 1
                async with self._lock:
                    self.num_waiting -= 1
                    await asyncio.to_thread(step, self.head, self.experts, [seq], DEFAULT_PREFILL_CHUNK)
                if not seq.output:
                    continue  # still prefilling
                delta, is_stopped = text.delta(seq.output, seq.finished)
                reason = None
                if is_stopped or seq.finished:
                    seq.finished = True
                    is_stop_token = seq.output[-1] in params.stop_token_ids or (
                        not params.ignore_eos and seq.output[-1] in self.head.config.eos_token_ids)
                    reason = "stop" if is_stopped or is_stop_token else "length"
                yield LocalOutput((seq.output[-1],), delta, reason, len(prompt_ids), len(seq.output))
        finally:
            self.num_running -= 1
            if not seq.finished:
                self.aborted.append(request_id)


class Server:
    """A uvicorn server in a thread, on a free loopback port."""

    def __init__(self, engine: LocalEngine, model_name: str, api_key: str | None = None) -> None:
        self.engine = engine
        self.app = build_app(engine, model_name, api_key)
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
