"""The head deployment: the head model + the router's remote expert backend + the batching engine.

Init: ask the controller for the expert workers (idempotent) -> load the head's tensors only (onto its
GPU when Ray gave the replica one and torch sees CUDA; the experts' wire stays CPU bytes, see
model/device.py) -> its one expert backend, following the placement epoch from Redis and recording
for /metrics (router/epoch_follower.py) -> start the engine -> register in Redis and
heartbeat (with the running / waiting counts and the epoch in use). `generate` streams the engine's
typed outputs and errors, on the request's own call or, after its first output, on its gateway replica's
output channel (`channel`: one message per step for all of that gateway's streams here,
output_channel.py); `stats` the engine's stats: Ray pickles them, nothing goes through dicts.
"""

from __future__ import annotations

import logging
import os
import threading
import dataclasses
from collections.abc import AsyncGenerator
from contextlib import aclosing

import ray
import torch
from ray import serve
from transformers import AutoTokenizer

from nextserve.cluster.deployments.actor_threads import use_assigned_cpus
from nextserve.cluster.app_args import AppArgs
from nextserve.cluster.deployments.controller import start_cluster
from nextserve.cluster.engine.contract import EngineError, EngineRequest, EngineStats, StepOutput
from nextserve.cluster.engine.engine import Engine
from nextserve.cluster.tracing import TracingRole, configure_tracing
from nextserve.cluster.deployments.output_channel import (ChannelItem, ChannelOpen, ChannelReady, HeadOutputChannels,
                                                          StreamStart)
from nextserve.router.epoch_follower import EpochFollowingBackend
from nextserve.cluster.deployments.expert_worker import HEAD_RESOURCE, experts_use_gpus
from nextserve.cluster.control.registry import HEARTBEAT_S, Registry
from nextserve.model.checkpoint import parse_dtype
from nextserve.model.device import resolve_device
from nextserve.model.loader import load_head

log = logging.getLogger(__name__)

HEAD_MAX_ONGOING_REQUESTS = 1024
"""Serve's bound on the requests in one head replica; the engine's own, lower by default, refuses first."""

HEAD_MAX_QUEUED_REQUESTS = 1024
"""Serve's bound on the requests a gateway replica holds before a head replica takes them (each handle's
queue; past it Serve raises BackPressureError, a 429). Not the engine's queue bound: a burst passes
through this queue on its way to the heads, and a bound as small as the engine's refused requests the
engine had room for (8 of 64 admitted against max_num_seqs 4 + max_queued_requests 8)."""

HEAD_GRACEFUL_SHUTDOWN_TIMEOUT_S = 600.0
"""How long a head replica that Serve stops (autoscaling down, a redeploy) keeps serving the requests it
holds: Serve routes it nothing new, waits for its ongoing requests (running and queued sequences, a
preempted one included: they finish here, nothing recomputes elsewhere), then stops it. Long enough for
a long generation on a loaded replica; a stream still running past it is cut (its client sees the error)."""


@serve.deployment(
    # One head replica per head-group node share; the custom resource keeps heads off expert nodes.
    ray_actor_options={"num_cpus": 0, "resources": {HEAD_RESOURCE: 1}},
    # Streams are long-lived and the engine batches them all: admission is the engine's job (it refuses
    # past max_num_seqs + max_queued_requests; cluster/app.py raises this when those add up to more).
    max_ongoing_requests=HEAD_MAX_ONGOING_REQUESTS,
    health_check_period_s=5,
    # A replica leaving drains: no new requests, its streams run to their end (see the constant).
    graceful_shutdown_wait_loop_s=1,
    graceful_shutdown_timeout_s=HEAD_GRACEFUL_SHUTDOWN_TIMEOUT_S,
)
class HeadDeployment:
    def __init__(self, args: AppArgs) -> None:
        self.args = args
        use_assigned_cpus()
        configure_tracing(args.otlp_traces_endpoint, TracingRole.HEAD)  # "" (default): nothing
        ray.get(start_cluster(args))  # `up` may have started it already: then this waits for it
        self.registry = Registry(args.redis_url, args.cluster)
        dtype = parse_dtype(args.dtype)
        device = resolve_device("auto" if ray.get_gpu_ids() else "cpu")
        head = load_head(args.model, dtype, device, mtp=args.head_loads_mtp())  # the MTP layer only to draft
        self.backend = EpochFollowingBackend(self.registry, dtype, args.dispatch_deadline_s, head.config.num_experts,
                                             args.unavailable_wait_s, device, admin_token=args.admin_token)
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None  # after the weights
        scheduler = args.scheduler_config(device.type != "cpu", experts_use_gpus())
        log.info("head on %s, %d micro-batch(es) per step (--micro-batches %s)", device, scheduler.micro_batches,
                 args.micro_batches)
        self.engine = Engine(head, self.backend, AutoTokenizer.from_pretrained(args.model), scheduler,
                             args.context_length(), args.cache_config(free), args.speculative())
        self.head_id = serve.get_replica_context().replica_id.unique_id
        self.channels = HeadOutputChannels(self.head_id)
        self.registry.register_head(self.head_id, {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()})
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, name="head-heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                stats = self.engine.stats()
                self.registry.register_head(self.head_id, {
                    "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "epoch": self.backend.epoch,
                    **stats.load_fields(), **self.channels.heartbeat_fields()})
            except Exception as exc:  # Redis restarting: keep serving
                log.warning("head heartbeat failed: %s", exc)

    async def generate(self, request: EngineRequest, gateway_id: str | None = None) -> AsyncGenerator[
            StepOutput | EngineError | StreamStart, None]:
        """The engine's StepOutputs as they are (Ray pickles them), or one EngineError as the last item (its
        code says what the client is told: a refusal, experts without a live worker after waiting
        `unavailable_wait_s`, a failed step). Nothing else leaves this method as an exception: a Ray
        error would carry this process's traceback, pid and address to the client. With the `gateway_id`
        of a gateway replica: StreamStart first, and the rest on that gateway's output channel when it
        has one here (cluster/deployments/output_channel.py)."""
        async with aclosing(self.channels.generate(request.request_id, self.engine.generate(request),
                                                   gateway_id)) as items:
            async for item in items:  # closed early (Serve cancels it): closes the engine's stream, which aborts
                yield item

    async def channel(self, request: ChannelOpen) -> AsyncGenerator[ChannelReady | list[ChannelItem], None]:
        """A gateway replica's output channel: every step's outputs of its requests here as one message."""
        async with aclosing(self.channels.channel(request)) as messages:
            async for message in messages:
                yield message

    async def stats(self) -> EngineStats:
        latency, tokens = self.backend.recorder.drain()
        return dataclasses.replace(self.engine.stats(), dispatch_latency_s=latency, expert_tokens=tokens)

    async def is_serving(self) -> bool:
        """The gateway's readiness probe: this replica could take a request now."""
        return self.engine.is_running and self.backend.current is not None

    def check_health(self) -> None:
        """Serve replaces a replica whose check fails."""
        if not self.engine.is_running:
            raise RuntimeError("the engine's step loop is not running")
        if self.backend.current is None:
            raise RuntimeError("no expert placement to dispatch with")

    def __del__(self) -> None:
        """Serve stops the replica after its requests drained: it leaves the registry (`nextserve status`,
        the head count on /metrics) before its engine stops."""
        self._stop.set()
        try:
            self.registry.forget_head(self.head_id)
        except Exception as exc:  # Redis down: the record goes stale (not alive) after STALE_AFTER_S
            log.warning("head %s could not leave the registry: %s", self.head_id, exc)
        self.engine.shutdown()
        self.backend.close()
