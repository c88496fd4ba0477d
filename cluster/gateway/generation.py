"""One API request as engine requests: its n choices started together, their outputs merged as they come,
turned into the one event stream every API renders.

    start_generation(engine, request_id, spec, metrics)     spec: conversation.py's GenerationSpec
      -> prompt_of(spec.prompt): chat template or raw prompt ids (ChatTemplateError for a refused chat)
      -> output_grammar(spec.response_format, prompt): the Grammar every choice's engine request carries
         (structured outputs; a forced tool call's structure, its opening already in the prompt)
      -> start_choices -> Generation: `async for event in generation.events()` (events.py: Started,
         ChoiceUpdate..., Completed), or `await reply(generation.events(), is_disconnected)` for the
         Completed event alone (None when the client left; the engine requests are then aborted)

    start_choices(engine, request_id, prompt_ids, [params per choice], metrics, caller, grammar)
      -> the caller's tenant quota: over a limit, EngineError RATE_LIMITED (429 + Retry-After), nothing started
      -> one engine request per choice ("{request_id}-{i}"), carrying the caller's tenant, weight and
         cache salt, each awaited to its first output, so an
         engine refusal or unavailability (an EngineError with its code) is raised here, before any
         response starts, for each API to map to its own error shape
      -> Choices: `async for index, out in choices` in arrival order; `aclose()` aborts what is left

Choice i of a request with a seed samples with seed + i (modulo 2**64): reproducible per choice,
different between choices. Until the engine shares a prefill between sequences (prefix caching), n choices prefill the
prompt n times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, suppress
from typing import Protocol

from transformers import PreTrainedTokenizerBase

from nextserve.cluster.engine.contract import (EngineError, EngineRequest, EngineStats, Grammar, SamplingParams,
                                               StepOutput)
from nextserve.cluster.gateway.chat_template import ChatPrompt
from nextserve.cluster.gateway.conversation import GenerationSpec, prompt_of
from nextserve.cluster.gateway.events import ChoiceEvents, ChoiceUpdate, Completed, Event, Started, TokenUsage
from nextserve.cluster.gateway.metrics import GatewayMetrics, RequestTracker
from nextserve.cluster.gateway.output_grammar import output_grammar
from nextserve.cluster.gateway.request_id import current_request_id
from nextserve.cluster.gateway.tenants import Caller, TenantQuota
from nextserve.cluster.tracing import RequestSpan, start_request_span

log = logging.getLogger(__name__)


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
    """n choices: the same params, choice i seeded with seed + i when a seed is given, wrapped modulo 2**64
    (seed 2**64 - 1 with n = 2 seeds choice 1 with 0), so every choice's seed stays in the range."""
    if params.seed is None:
        return [params] * n
    return [params.seed_offset(i) for i in range(n)]


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
        # Bounded: a consumer that stops taking (a client that stops reading) stops the pumps, and the
        # streams' own bound (gateway/admission.py idle_bounded) then decides when it is gone.
        queue: asyncio.Queue[tuple[int, StepOutput | BaseException | None]] = asyncio.Queue(self.n)

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
                        params: Sequence[SamplingParams], metrics: GatewayMetrics, caller: Caller,
                        grammar: Grammar | None = None, prompt_cache_key: str = "", trace_context: str = "") -> Choices:
    """Start every choice (each constrained by `grammar`, when given) and wait for each one's first output; on
    any failure close them all and raise. `prompt_cache_key`: the client's session key, for routing to a head
    (EngineRequest.prompt_cache_key)."""
    tenant = caller.tenant
    try:
        if caller.quota is not None:
            caller.quota.acquire()
    except EngineError:
        metrics.tenant_refusals.labels(tenant=tenant.name).inc()
        raise
    metrics.tenant_requests.labels(tenant=tenant.name).inc()
    log.info("request %s runs as engine request %s (%d choices)", current_request_id(), request_id, len(params))
    streams = [engine.generate(EngineRequest(f"{request_id}-{i}" if len(params) > 1 else request_id,
                                             tuple(prompt_ids), p, tenant=tenant.name, tenant_weight=tenant.weight,
                                             cache_salt=caller.cache_salt, grammar=grammar,
                                             prompt_cache_key=prompt_cache_key, trace_context=trace_context))
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


class Generation:
    """One API request running: its choices' engine outputs as the one event stream (events.py)."""

    def __init__(self, prompt: ChatPrompt, choices: Choices, span: RequestSpan | None = None) -> None:
        self.prompt, self.choices, self.span = prompt, choices, span
        self.states = [ChoiceEvents(i, prompt) for i in range(choices.n)]

    async def events(self) -> AsyncIterator[Event]:
        """Started, every choice's updates in arrival order, Completed; closing it early aborts the rest."""
        error: BaseException | None = None
        try:
            yield Started(self.choices.prompt_tokens, self.choices.cached_tokens, self.choices.n)
            async with aclosing(aiter(self.choices)) as outputs:
                async for i, out in outputs:
                    yield self.states[i].on_output(out)
            usage = TokenUsage(self.choices.prompt_tokens, sum(s.completion_tokens for s in self.states),
                               self.choices.cached_tokens)
            completed = Completed(tuple(s.result() for s in self.states), usage)
            if self.span is not None:
                self.span.completed(usage.completion_tokens, [c.finish.reason.value for c in completed.choices])
            yield completed
        except BaseException as exc:
            error = exc
            raise
        finally:
            await self.choices.aclose()  # closed before the outputs were read (after Started): abort them too
            if self.span is not None:
                self.span.end(error if isinstance(error, Exception) else None)


async def start_generation(engine: EngineClient, request_id: str, spec: GenerationSpec,
                           metrics: GatewayMetrics, caller: Caller, *, endpoint: str = "",
                           model: str = "") -> Generation:
    """Render the prompt and start every choice; raises ChatTemplateError (a chat the template refuses) or
    the engine's EngineError (a refusal, unavailability), before any response starts. `endpoint` (the
    path) and `model` name the request's span when the server traces (cluster/tracing.py)."""
    span = start_request_span(endpoint, request_id, model, current_request_id())
    try:
        prompt = prompt_of(spec.prompt, engine.tokenizer)
        choices = await start_choices(engine, request_id, prompt.prompt_ids, choice_params(spec.params, spec.n),
                                      metrics, dataclasses.replace(caller, cache_salt=spec.cache_salt),
                                      output_grammar(spec.response_format, prompt), spec.prompt_cache_key,
                                      "" if span is None else span.traceparent)
    except BaseException as exc:
        if span is not None:
            span.end(exc)
        raise
    if span is not None:
        span.started(choices.prompt_tokens, choices.cached_tokens)
    return Generation(prompt, choices, span)


async def reply(events: AsyncIterator[Event], is_disconnected: Callable[[], Awaitable[bool]]) -> Completed | None:
    """The whole reply (a non-streaming response); None when the client left before it was done (checked
    after every unfinished update), which closes the stream and so aborts the engine requests."""
    async with aclosing(events) as stream:  # type: ignore[type-var]  # an async generator
        async for event in stream:
            if isinstance(event, Completed):
                return event
            if isinstance(event, ChoiceUpdate) and event.finish is None and await is_disconnected():
                return None
    raise RuntimeError("the event stream ended without Completed")
