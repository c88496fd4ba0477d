"""The gateway's `EngineClient` over an `Engine` in this process, for tests that serve the gateway app
without Ray (a head serves through cluster/deployments/head.py instead).

    build_app(LocalEngineClient(Engine(head, RecordingBackend(experts, E), tokenizer, max_model_len=N), recorder))
    (RecordingBackend: tests/recording_backend.py)
      generate -> Engine.generate (closing the stream aborts the request)
      stats    -> Engine.stats() + the dispatch latency / routed tokens the RecordingBackend saw since the last call

E = num_experts (logical experts per MoE layer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator

from transformers import PreTrainedTokenizerBase

from nextserve.cluster.engine.contract import EngineRequest, EngineStats, StepOutput
from nextserve.cluster.engine.engine import Engine
from nextserve.router.dispatch_recorder import DispatchRecorder
from nextserve.cluster.gateway.generation import Readiness


class LocalEngineClient:
    """`cluster.gateway.app.EngineClient` over an in-process engine; `recorder` (a RecordingBackend's, if the engine
    dispatches through one) feeds the dispatch metrics. Call `shutdown` when done serving."""

    def __init__(self, engine: Engine, recorder: DispatchRecorder | None = None) -> None:
        self.engine = engine
        self.recorder = recorder

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def generate(self, request: EngineRequest) -> AsyncGenerator[StepOutput, None]:
        """The engine's own stream: it raises its EngineError at the first iteration for a refused request,
        and `aclose()` aborts the request."""
        return self.engine.generate(request)

    async def stats(self) -> EngineStats:
        stats = self.engine.stats()
        if self.recorder is None:
            return stats
        latency, tokens = self.recorder.drain()
        return dataclasses.replace(stats, dispatch_latency_s=latency, expert_tokens=tokens)

    async def is_ready(self) -> bool:
        return self.engine.is_running

    async def readiness(self) -> Readiness:
        """Ready while the engine's step loop runs (its experts are in this process)."""
        if self.engine.is_running:
            return Readiness(True)
        return Readiness(False, "the engine's step loop is not running")

    def shutdown(self) -> None:
        """Stop the engine; its unfinished requests end with finish_reason ABORT, and /health turns 503."""
        self.engine.shutdown()
