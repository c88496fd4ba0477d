"""One API request as engine requests: its n choices started together, their outputs merged as they come.

    start_choices(engine, request_id, prompt_ids, [params per choice], metrics, caller)
      -> the caller's tenant quota: over a limit, EngineError OVERLOADED (429 + Retry-After), nothing started
      -> one engine request per choice ("{request_id}-{i}"), carrying the caller's tenant, weight and
         cache salt, each awaited to its first output, so an
         engine refusal or unavailability (an EngineError with its code) is raised here, before any
         response starts, for each API to map to its own error shape
      -> Choices: `async for index, out in choices` in arrival order; `aclose()` aborts what is left

Choice i of a request with a seed samples with seed + i: reproducible per choice, different between
choices. Until the engine shares a prefill between sequences (prefix caching), n choices prefill the
prompt n times.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import suppress
from typing import Protocol

from transformers import PreTrainedTokenizerBase

from nextserve.cluster.engine.contract import EngineError, EngineRequest, EngineStats, SamplingParams, StepOutput
from nextserve.cluster.gateway.metrics import GatewayMetrics, RequestTracker
from nextserve.cluster.gateway.tenants import Caller, TenantQuota


@dataclass(frozen=True)
class Readiness:
    """Whether this gateway replica can serve a request now (GET /health/ready; Kubernetes' readiness)."""
    is_ready: bool
    reason: str = ""
    """Why not (when not ready), or what is degraded (when ready but not whole)."""
    workers_down: tuple[int, ...] = ()
    """Expert workers of the placement not heartbeating: with R >= 2 their experts have other replicas."""

    @property
    def is_degraded(self) -> bool:
        return self.is_ready and bool(self.reason or self.workers_down)


class EngineClient(Protocol):
    """What the gateway needs from the model side: an in-process engine, or a Ray handle to the heads."""
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...  # encodes prompts and applies the chat template
    @property
    def max_model_len(self) -> int: ...  # context length in tokens: prompt + completion

    def generate(self, request: EngineRequest) -> AsyncGenerator[StepOutput, None]:
        """Stream one request's outputs. A refused or failed request raises its EngineError (the code says
        why) at the first iteration or where it failed. The gateway calls `aclose()` when it stops early
        (the client went away); that must abort the request in the engine."""
        ...

    async def stats(self) -> EngineStats: ...
    async def is_ready(self) -> bool: ...  # the whole cluster is up: every head and worker (GET /health)
    async def readiness(self) -> Readiness: ...  # this replica can serve now: a head, every expert (/health/ready)


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n choices: the same params, choice i seeded with seed + i when a seed is given."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(n)]


class Choices:
    """The merged outputs of a request's choices; each stream is closed (aborting its engine request)
    when iteration ends, however it ends."""

    def __init__(self, firsts: list[StepOutput], streams: list[AsyncGenerator[StepOutput, None]],
                 trackers: list[RequestTracker], quota: TenantQuota | None = None) -> None:
        self.firsts, self.streams, self.trackers, self.quota = firsts, streams, trackers, quota
        self.prompt_tokens = firsts[0].prompt_tokens
        self.cached_tokens = firsts[0].cached_tokens
        """Of the prompt, the tokens the head served from its prefix cache (the first choice's)."""

    @property
    def n(self) -> int:
        return len(self.streams)

    async def __aiter__(self) -> AsyncIterator[tuple[int, StepOutput]]:
        queue: asyncio.Queue[tuple[int, StepOutput | BaseException | None]] = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                await queue.put((i, self.firsts[i]))
                if self.firsts[i].finish_reason is None:
                    async for out in self.streams[i]:
                        await queue.put((i, out))
                await queue.put((i, None))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i)) for i in range(self.n)]
        try:
            live = self.n
            while live:
                i, item = await queue.get()
                if item is None:
                    live -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                self.trackers[i].on_output(item)
                yield i, item
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with suppress(BaseException):
                    await task
            await self.aclose()

    async def aclose(self) -> None:
        for stream, tracker in zip(self.streams, self.trackers):
            await stream.aclose()
            tracker.finish()
        if self.quota is not None:
            self.quota.release()
            self.quota = None


async def start_choices(engine: EngineClient, request_id: str, prompt_ids: Sequence[int],
                        params: Sequence[SamplingParams], metrics: GatewayMetrics, caller: Caller) -> Choices:
    """Start every choice and wait for each one's first output; on any failure close them all and raise."""
    tenant = caller.tenant
    try:
        if caller.quota is not None:
            caller.quota.acquire()
    except EngineError:
        metrics.tenant_refusals.labels(tenant=tenant.name).inc()
        raise
    metrics.tenant_requests.labels(tenant=tenant.name).inc()
    streams = [engine.generate(EngineRequest(f"{request_id}-{i}" if len(params) > 1 else request_id,
                                             tuple(prompt_ids), p, tenant.name, tenant.weight, caller.cache_salt))
               for i, p in enumerate(params)]
    trackers = [metrics.track(tenant.name, caller.quota) for _ in streams]
    try:
        firsts = list(await asyncio.gather(*(anext(s) for s in streams)))
    except BaseException:
        for stream, tracker in zip(streams, trackers):
            with suppress(Exception):
                await stream.aclose()
            tracker.finish()
        if caller.quota is not None:
            caller.quota.release()
        raise
    return Choices(firsts, streams, trackers, caller.quota)
