"""The head deployment: the head model + the router's remote expert backend + the batching engine.

Init: ask the controller for the expert workers (idempotent) -> load the head's tensors only (onto its
GPU when Ray gave the replica one and torch sees CUDA; the experts' wire stays CPU bytes, see
model/device.py) -> its one expert backend, following the placement epoch from Redis and recording
for /metrics (router/epoch_follower.py) -> start the engine -> register in Redis and
heartbeat (with the running / waiting counts and the epoch in use). `generate` streams the engine's
typed outputs and errors, `stats` the engine's stats: Ray pickles them, nothing goes through dicts.
"""

from __future__ import annotations

import logging
import os
import threading
import dataclasses
from collections.abc import AsyncGenerator

import ray
import torch
from ray import serve
from transformers import AutoTokenizer

from nextserve.cluster.deployments.actor_threads import use_assigned_cpus
from nextserve.cluster.app_args import AppArgs
from nextserve.cluster.deployments.controller import ClusterSpec, get_or_create_controller
from nextserve.cluster.engine.contract import EngineError, EngineRequest, EngineStats, StepOutput
from nextserve.cluster.engine.engine import Engine
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


@serve.deployment(
    # One head replica per head-group node share; the custom resource keeps heads off expert nodes.
    ray_actor_options={"num_cpus": 0, "resources": {HEAD_RESOURCE: 1}},
    # Streams are long-lived and the engine batches them all: admission is the engine's job (it refuses
    # past max_num_seqs + max_queued_requests; cluster/app.py raises this when those add up to more).
    max_ongoing_requests=HEAD_MAX_ONGOING_REQUESTS,
    health_check_period_s=5,
)
class HeadDeployment:
    def __init__(self, args: AppArgs) -> None:
        self.args = args
        use_assigned_cpus()
        controller = get_or_create_controller(args.redis_url, args.cluster, args.admin_token)
        ray.get(controller.ensure.remote(ClusterSpec.from_mapping(args.model_dump(exclude={"admin_token"}))))
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
        self.registry.register_head(self.head_id, {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()})
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, name="head-heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                stats = self.engine.stats()
                self.registry.register_head(self.head_id, {
                    "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "epoch": self.backend.epoch,
                    **stats.load_fields()})
            except Exception as exc:  # Redis restarting: keep serving
                log.warning("head heartbeat failed: %s", exc)

    async def generate(self, request: EngineRequest) -> AsyncGenerator[StepOutput | EngineError, None]:
        """The engine's StepOutputs as they are (Ray pickles them), or one EngineError as the last item (its
        code says what the client is told: a refusal, experts without a live worker after waiting
        `unavailable_wait_s`, a failed step). Nothing else leaves this method as an exception: a Ray
        error would carry this process's traceback, pid and address to the client."""
        try:
            async for out in self.engine.generate(request):
                yield out
        except EngineError as exc:
            yield exc
        except Exception:
            log.exception("request %s failed in its head", request.request_id)
            yield EngineError("the server failed while generating this request; it was logged, retry it")

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
        self._stop.set()
        self.engine.shutdown()
        self.backend.close()
