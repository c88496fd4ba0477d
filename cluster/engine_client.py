"""The gateway's `EngineClient` over an `Engine` in this process, for single-process serving and tests.

    build_app(LocalEngineClient(Engine(head, RecordingBackend(experts, E), tokenizer), max_model_len, recorder))
    (RecordingBackend: cluster/dispatch_metrics.py)
      generate -> Engine.generate (closing the stream aborts the request)
      stats    -> Engine.stats() + the dispatch latency / routed tokens the RecordingBackend saw since the last call

E = num_experts (logical experts per MoE layer).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

from transformers import PreTrainedTokenizerBase

from nextserve.cluster.detokenizer import StepOutput
from nextserve.cluster.engine import Engine
from nextserve.cluster.dispatch_metrics import DispatchRecorder
from nextserve.cluster.metrics import EngineStats
from nextserve.model.sampling import SamplingParams


class LocalEngineClient:
    """`gateway_app.EngineClient` over an in-process engine; `recorder` (a RecordingBackend's, if the engine
    dispatches through one) feeds the dispatch metrics. Call `shutdown` when done serving."""

    def __init__(self, engine: Engine, max_model_len: int, recorder: DispatchRecorder | None = None) -> None:
        context = engine.head.config.max_position_embeddings
        if not 2 <= max_model_len <= context:
            raise ValueError(f"max_model_len={max_model_len} must be in [2, {context}] (the model's context "
                             f"window, max_position_embeddings); lower it or omit it to use the full context")
        self.engine = engine
        self.recorder = recorder
        self._max_model_len = max_model_len

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def generate(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                 stop: Sequence[str]) -> AsyncGenerator[StepOutput, None]:
        """The engine's own stream: it raises EngineRequestError (a ValueError naming `param`) at the first
        iteration for a refused request, and `aclose()` aborts the request."""
        return self.engine.generate(request_id, prompt_ids, params, stop)

    async def stats(self) -> EngineStats:
        now = self.engine.stats()
        stats: EngineStats = {"num_running": now.num_running, "num_waiting": now.num_waiting}
        if self.recorder is not None:
            stats["dispatch_latency_s"], stats["expert_tokens"] = self.recorder.drain()
        return stats

    async def is_ready(self) -> bool:
        return self.engine.is_running

    def shutdown(self) -> None:
        """Stop the engine; its unfinished requests end with finish_reason ABORT, and /health turns 503."""
        self.engine.shutdown()
