"""The gateway deployment: the OpenAI-compatible FastAPI app in front of the head replicas.

The app itself is `cluster.gateway.app.build_app`; this file adapts a Serve handle to the head
deployment into the `EngineClient` it needs. Requests stream from one head replica (Serve routes each
by its prompt's prefix, deployments/prefix_router.py); after a request's first output, its outputs come
on the output channel of that head replica (one message per step for all of this replica's streams
there, deployments/output_channel.py) once one is open; the running/waiting counts and the
cluster-wide health come from the Redis registry, which sees every head and worker. Readiness (this
replica can serve now) asks a head replica itself and checks in the registry that every expert of the
placement has a heartbeating replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from nextserve.cluster.app_args import AppArgs
from nextserve.cluster.engine.contract import (EngineError, EngineOverloadedError, EngineRequest, EngineStats,
                                               EngineUnavailableError, StepOutput, summed_load)
from nextserve.cluster.deployments.output_channel import HEAD_LOST, ChannelOpen, GatewayOutputChannels
from nextserve.cluster.gateway.app import build_app
from nextserve.cluster.tracing import TracingRole, configure_tracing
from nextserve.cluster.gateway.generation import Readiness
from nextserve.cluster.control.registry import MemberRecord, Registry
from nextserve.cluster.control.scaling_status import ScalingStatus
from nextserve.cluster.engine.contract import SamplingDefaults
from nextserve.router.placement import PlacementRecord

log = logging.getLogger(__name__)


HEAD_PROBE_TIMEOUT_S = 2.0
"""A head answers `is_serving` in milliseconds; Serve queues a call while no head replica runs, so the
readiness check stops waiting here (Kubernetes' probe timeout, 5 s in k8s/, leaves room for it)."""


class HeadHandleClient:
    """`cluster.gateway.app.EngineClient` over a DeploymentHandle to the head replicas."""

    def __init__(self, heads: DeploymentHandle, args: AppArgs) -> None:
        self.heads = heads
        self.args = args
        self._streaming = heads.options(stream=True)
        self.channels = GatewayOutputChannels(self._open_channel, args.output_channels)
        """This replica's output channels from the head replicas (cluster/deployments/output_channel.py)."""
        self.registry = Registry(args.redis_url, args.cluster)
        self._tokenizer = AutoTokenizer.from_pretrained(args.model)
        self._max_model_len = args.context_length()

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    async def generate(self, request: EngineRequest) -> AsyncGenerator[StepOutput, None]:
        """The head's StepOutputs (on the request's call, or on the output channel of the head replica that
        took it); its EngineError (a refusal, unavailability, a failed step) is raised here as the engine
        raised it there. Closing this before the last output cancels the call: the head aborts the request."""
        request_id = request.request_id
        try:
            async with aclosing(self.channels.generate(request, self._start_call)) as outputs:
                async for out in outputs:  # closed early (the client left): cancels the call, the head aborts
                    yield out
        except BackPressureError:  # every head replica busy and Serve's queue for them full
            raise EngineOverloadedError("every head replica is busy and the gateway's queue for them is full; "
                                        "retry after the Retry-After delay") from None
        except RayActorError as exc:  # the head replica (or its node) died: its sequences are gone
            log.warning("request %s: its head replica was lost: %s", request_id, exc)
            raise EngineUnavailableError(HEAD_LOST) from None
        except EngineError:
            raise
        except Exception:  # whatever else Ray raises: logged here, never its text (pids, addresses) to a client
            log.exception("request %s failed between the gateway and its head", request_id)
            raise EngineError("the server failed while generating this request; it was logged, retry it") from None

    def _start_call(self, request: EngineRequest, gateway_id: str | None) -> DeploymentResponseGenerator:
        return self._streaming.generate.remote(request, gateway_id)

    def _open_channel(self, request: ChannelOpen) -> DeploymentResponseGenerator:
        return self._streaming.channel.remote(request)

    async def stats(self) -> EngineStats:
        """One head's drained dispatch deltas; the load fields (queue, cache, preemptions) summed over every
        live head (from their Redis heartbeats)."""
        one: EngineStats = await self.heads.stats.remote()
        # The sync Redis client off the loop: a slow Redis must not stall the streams this loop serves.
        heads = [h for h in await asyncio.to_thread(self.registry.heads) if h.alive]
        return dataclasses.replace(one, **summed_load(h.fields for h in heads))

    async def scaling(self) -> ScalingStatus | None:
        """The autoscaling loop's status as the controller last published it (None before its first round)."""
        return await asyncio.to_thread(self.registry.scaling_status)  # sync Redis, off the streams' loop

    async def is_ready(self) -> bool:
        """Every head replica and every expert worker heartbeating, and a placement published."""
        return await asyncio.to_thread(self._is_ready)  # sync Redis calls, off the streams' loop

    def _is_ready(self) -> bool:
        placement = self.registry.placement()
        workers = [w for w in self.registry.workers() if w.alive]
        heads = [h for h in self.registry.heads() if h.alive]
        return (placement is not None and len(heads) >= self.args.min_head_replicas()
                and len(workers) >= placement.placement.num_workers)

    async def readiness(self) -> Readiness:
        """A head replica answers that it serves (within HEAD_PROBE_TIMEOUT_S), and every expert of the
        placement has a live replica; workers down whose experts have other replicas only degrade."""
        response = self.heads.is_serving.remote()
        try:
            head_serves = await asyncio.wait_for(response, HEAD_PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:
            response.cancel()
            return Readiness(False, f"no head replica answered within {HEAD_PROBE_TIMEOUT_S} s")
        if not head_serves:
            return Readiness(False, "the head replica has no running engine or no placement to dispatch with")
        try:
            record, workers = await asyncio.to_thread(lambda: (self.registry.placement(), self.registry.workers()))
        except Exception as exc:  # Redis restarting: the heads keep serving on the placement they hold
            return Readiness(True, f"registry unreachable ({type(exc).__name__}); heads serve their last placement")
        return expert_readiness(record, workers)


def expert_readiness(record: PlacementRecord | None, workers: list[MemberRecord]) -> Readiness:
    """Ready when every (layer, expert) of the placement has a heartbeating worker; the workers down."""
    if record is None:  # Redis lost it; the controller rewrites it within a second
        return Readiness(True, "no placement in the registry; heads serve their last one")
    placement = record.placement
    alive = {int(w.fields["index"]) for w in workers if w.alive}
    down = tuple(i for i in range(placement.num_workers) if i not in alive)
    if not down:
        return Readiness(True)
    for layer in placement.layers:
        for expert, replicas in enumerate(placement.layer_to_expert_workers[layer]):
            if not any(w in alive for w in replicas):
                return Readiness(False, f"layer {layer} expert {expert} has no live replica (workers "
                                        f"{list(replicas)} are down)", down)
    return Readiness(True, f"{len(down)} of {placement.num_workers} expert workers down; "
                           f"their experts are served by other replicas", down)


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    # The gateway only parses and relays; many concurrent streams per replica are cheap.
    max_ongoing_requests=1024,
)
@serve.ingress()
class GatewayDeployment:
    def __init__(self, heads: DeploymentHandle, args: AppArgs) -> None:
        configure_tracing(args.otlp_traces_endpoint, TracingRole.GATEWAY)  # "" (default): nothing
        self.client = HeadHandleClient(heads, args)
        self.args = args

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_app(self.client, self.args.served_model_name(), None,
                         SamplingDefaults.from_checkpoint(self.args.model), self.args.gateway_limits(),
                         self.args.tenant_directory(), scaling=self.client.scaling)

    async def __del__(self) -> None:
        """Serve stops this replica (its requests drained; Serve awaits this on the replica's loop): its output
        channels end now. A head replica counts each channel as an ongoing request, so without this a head
        stopped with the app (Ctrl-C, `serve.delete`) would wait for them to go idle (CHANNEL_IDLE_CLOSE_S)."""
        await self.client.channels.close()
