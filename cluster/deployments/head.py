"""The head deployment: the head model + the router's remote expert backend + the batching engine.

Init: ask the controller for the expert workers (idempotent) -> follow the placement epoch from Redis
-> load the head's tensors only (onto its GPU when Ray gave the replica one and torch sees CUDA; the
experts' wire stays CPU bytes, see model/device.py) -> start the engine -> register in Redis and
heartbeat (with the running / waiting counts and the epoch in use). `generate` streams plain dicts
(they cross Ray).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncGenerator
from dataclasses import asdict
from typing import Any

import ray
from ray import serve
from transformers import AutoTokenizer

from nextserve.cluster.actor_threads import use_assigned_cpus
from nextserve.cluster.app_args import AppArgs
from nextserve.cluster.controller import get_or_create_controller
from nextserve.cluster.dispatch_metrics import RecordingBackend
from nextserve.cluster.engine import Engine, EngineRequestError, EngineUnavailableError
from nextserve.cluster.epoch_follower import EpochFollowingBackend
from nextserve.cluster.expert_actor import HEAD_RESOURCE
from nextserve.cluster.registry import HEARTBEAT_S, Registry
from nextserve.model.checkpoint import parse_dtype
from nextserve.model.device import DeviceExpertBackend, resolve_device
from nextserve.model.expert_backend import ExpertBackend
from nextserve.model.loader import load_head
from nextserve.model.sampling import SamplingParams

log = logging.getLogger(__name__)


@serve.deployment(
    # One head replica per head-group node share; the custom resource keeps heads off expert nodes.
    ray_actor_options={"num_cpus": 0, "resources": {HEAD_RESOURCE: 1}},
    # Streams are long-lived and the engine batches them all: admission is the engine's job.
    max_ongoing_requests=1024,
    health_check_period_s=5,
)
class HeadDeployment:
    def __init__(self, args: AppArgs) -> None:
        self.args = args
        use_assigned_cpus()
        controller = get_or_create_controller(args.redis_url, args.cluster)
        ray.get(controller.ensure.remote(args.cluster_spec()))
        self.registry = Registry(args.redis_url, args.cluster)
        dtype = parse_dtype(args.dtype)
        self.backend = EpochFollowingBackend(self.registry, dtype, args.dispatch_deadline_s, args.unavailable_wait_s)
        device = resolve_device("auto" if ray.get_gpu_ids() else "cpu")
        head = load_head(args.model, dtype, device)
        self.recording = RecordingBackend(self.backend, head.config.num_experts)
        experts: ExpertBackend = self.recording
        if device.type != "cpu":
            experts = DeviceExpertBackend(self.recording, device)
        self.engine = Engine(head, experts, AutoTokenizer.from_pretrained(args.model), args.scheduler_config())
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
                    "num_running": stats.num_running, "num_waiting": stats.num_waiting})
            except Exception as exc:  # Redis restarting: keep serving
                log.warning("head heartbeat failed: %s", exc)

    async def generate(self, request_id: str, prompt_ids: list[int], params: dict[str, Any],
                       stop: list[str]) -> AsyncGenerator[dict[str, Any], None]:
        """Yields {token_ids, text, finish_reason, prompt_tokens, completion_tokens}, or one
        {error: {status, param, message}}: 400 when the engine refuses the request, 503 when experts it
        needs have no live worker (after waiting `unavailable_wait_s` for one)."""
        try:
            async for out in self.engine.generate(request_id, prompt_ids, SamplingParams(**params), stop):
                yield {"token_ids": out.token_ids, "text": out.text, "prompt_tokens": out.prompt_tokens,
                       "completion_tokens": out.completion_tokens,
                       "finish_reason": out.finish_reason.value if out.finish_reason else None}
        except EngineRequestError as exc:
            yield {"error": {"status": 400, "param": exc.param, "message": str(exc)}}
        except EngineUnavailableError as exc:
            yield {"error": {"status": 503, "param": None, "message": str(exc)}}

    async def stats(self) -> dict[str, Any]:
        latency, tokens = self.recording.recorder.drain()
        return {**asdict(self.engine.stats()), "dispatch_latency_s": latency, "expert_tokens": tokens,
                "epoch": self.backend.epoch}

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
