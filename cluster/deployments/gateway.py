"""The gateway deployment: the OpenAI-compatible FastAPI app in front of the head replicas.

The app itself is `cluster.gateway.app.build_app`; this file adapts a Serve handle to the head
deployment into the `EngineClient` it needs. Requests stream from one head replica (Serve routes each
to the least busy); readiness and the running/waiting counts come from the Redis registry, which sees
every head and worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from nextserve.cluster.app_args import AppArgs
from nextserve.cluster.engine.detokenizer import StepOutput
from nextserve.cluster.engine.stats import EngineStats
from nextserve.cluster.gateway.app import build_app
from nextserve.cluster.control.registry import Registry
from nextserve.model.sampling import SamplingDefaults, SamplingParams


class HeadHandleClient:
    """`cluster.gateway.app.EngineClient` over a DeploymentHandle to the head replicas."""

    def __init__(self, heads: DeploymentHandle, args: AppArgs) -> None:
        self.heads = heads
        self.args = args
        self.registry = Registry(args.redis_url, args.cluster)
        self._tokenizer = AutoTokenizer.from_pretrained(args.model)
        self._max_model_len = args.context_length()

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       stop: list[str]) -> AsyncGenerator[StepOutput, None]:
        """The head's StepOutputs; its refusal (EngineRequestError) or unavailability (EngineUnavailableError)
        is raised here as the engine raised it there."""
        stream = self.heads.options(stream=True).generate.remote(request_id, prompt_ids, params, list(stop))
        finished = False
        try:
            async for item in stream:
                if isinstance(item, Exception):
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                stream.cancel()  # the client left: the head's generator is cancelled and aborts the sequence

    async def stats(self) -> EngineStats:
        """One head's drained dispatch deltas; running/waiting summed over every live head (from Redis)."""
        one: EngineStats = await self.heads.stats.remote()
        # The sync Redis client off the loop: a slow Redis must not stall the streams this loop serves.
        heads = [h for h in await asyncio.to_thread(self.registry.heads) if h.alive]
        return dataclasses.replace(one, num_running=sum(int(h.fields.get("num_running", 0)) for h in heads),
                                   num_waiting=sum(int(h.fields.get("num_waiting", 0)) for h in heads))

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
        return build_app(self.client, self.args.served_model_name(), self.args.api_key,
                         SamplingDefaults.from_checkpoint(self.args.model))
