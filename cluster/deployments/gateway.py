"""The gateway deployment: the OpenAI-compatible FastAPI app in front of the head replicas.

The app itself is `cluster.gateway_app.build_app`; this file adapts a Serve handle to the head
deployment into the `EngineClient` it needs. Requests stream from one head replica (Serve routes each
to the least busy); readiness and the running/waiting counts come from the Redis registry, which sees
every head and worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from nextserve.cluster.app_args import AppArgs
from nextserve.cluster.engine import EngineRequestError
from nextserve.cluster.gateway_app import build_app
from nextserve.cluster.metrics import EngineStats
from nextserve.cluster.openai_protocol import RequestError
from nextserve.cluster.registry import Registry
from nextserve.model.config import Qwen3NextConfig
from nextserve.model.sampling import SamplingParams


def _head_error(error: dict[str, Any]) -> Exception:
    """A head's refusal (400, raised as the engine's own error so the gateway names the field) or
    unavailability (503 with the OpenAI body, naming the experts)."""
    if error["status"] == 503:
        return RequestError(503, error["message"], None, type="service_unavailable", code="experts_unavailable")
    return EngineRequestError(error["param"], error["message"])


@dataclass(frozen=True, slots=True)
class HeadOutput:
    token_ids: list[int]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class HeadHandleClient:
    """`gateway_app.EngineClient` over a DeploymentHandle to the head replicas."""

    def __init__(self, heads: DeploymentHandle, args: AppArgs) -> None:
        self.heads = heads
        self.args = args
        self.registry = Registry(args.redis_url, args.cluster)
        self._tokenizer = AutoTokenizer.from_pretrained(args.model)
        self._max_model_len = Qwen3NextConfig.from_json(args.model).max_position_embeddings

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       stop: list[str]) -> AsyncGenerator[HeadOutput, None]:
        stream = self.heads.options(stream=True).generate.remote(
            request_id, prompt_ids, dataclasses.asdict(params), list(stop))
        finished = False
        try:
            async for item in stream:
                if "error" in item:
                    raise _head_error(item["error"])
                out = HeadOutput(**item)
                finished = out.finish_reason is not None
                yield out
        finally:
            if not finished:
                stream.cancel()  # the client left: the head's generator is cancelled and aborts the sequence

    async def stats(self) -> EngineStats:
        raw: dict[str, Any] = await self.heads.stats.remote()
        # The sync Redis client off the loop: a slow Redis must not stall the streams this loop serves.
        heads = [h for h in await asyncio.to_thread(self.registry.heads) if h.alive]
        return {"num_running": sum(int(h.fields.get("num_running", 0)) for h in heads),
                "num_waiting": sum(int(h.fields.get("num_waiting", 0)) for h in heads),
                "dispatch_latency_s": raw["dispatch_latency_s"], "expert_tokens": raw["expert_tokens"]}

    async def is_ready(self) -> bool:
        """Every head replica and every expert worker heartbeating, and a placement published."""
        return await asyncio.to_thread(self._is_ready)  # sync Redis calls, off the streams' loop

    def _is_ready(self) -> bool:
        placement = self.registry.placement()
        workers = [w for w in self.registry.workers() if w.alive]
        heads = [h for h in self.registry.heads() if h.alive]
        return (placement is not None and len(heads) >= self.args.head_replicas
                and len(workers) >= placement.placement.num_workers)


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    # The gateway only parses and relays; many concurrent streams per replica are cheap.
    max_ongoing_requests=1024,
)
@serve.ingress()
class GatewayDeployment:
    def __init__(self, heads: DeploymentHandle, args: AppArgs) -> None:
        self.client = HeadHandleClient(heads, args)
        self.args = args

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_app(self.client, self.args.served_model_name(), self.args.api_key)
