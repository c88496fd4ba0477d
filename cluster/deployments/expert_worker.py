"""The expert-worker Ray actor: serves its experts over gRPC, registers itself, and heartbeats.

Life: __init__ loads the (layer, expert) pairs assigned to it in Redis (else those it was given) onto
its GPU when Ray gave it one (and torch sees CUDA), else the CPU, and starts the experts gRPC server on
one address only (`host`: 127.0.0.1 for a local `nextserve up`; else Ray's node IP, the pod IP on
Kubernetes; port picked by the OS; messages bounded by the heads' step, `max_dispatch_tokens`),
registers {address, pid, node} in Redis, and starts a heartbeat thread. Ray restarts a dead actor (max_restarts=-1) by running __init__ again: the worker
comes back on a new port and re-registers; the controller then publishes a new placement epoch with
the new address. Every call to it (Dispatch from heads, the controller's Info and admin calls) needs
the cluster's admin token, which the controller passes it. Only cluster/ knows Ray: the server itself
is experts/server.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

import ray

from nextserve.cluster.deployments.actor_threads import use_assigned_cpus
from nextserve.cluster.control.registry import HEARTBEAT_S, Registry
from nextserve.experts.server import BackgroundWorkers, start_worker

log = logging.getLogger(__name__)

EXPERT_RESOURCE = "nextserve_expert"
"""Custom Ray resource every expert worker asks for (1 unit): KubeRay's expert group advertises it,
so workers land on expert nodes; a local `nextserve up` declares plenty of it."""
HEAD_RESOURCE = "nextserve_head"
"""Same for head replicas (the head node group)."""


class ExpertWorkerActor:
    def __init__(self, index: int, model_dir: str, pairs: list[tuple[int, int]], dtype: str,
                 registry_url: str, cluster: str, epoch: int, admin_token: str, max_dispatch_tokens: int,
                 host: str | None) -> None:
        self.index = index
        self.registry = Registry(registry_url, cluster)
        # After a restart (or a re-shard), what the controller last assigned wins over the creation args.
        pairs = self.registry.assignment(index) or pairs
        use_assigned_cpus()
        self.background = BackgroundWorkers(admin_token)
        device = "auto" if ray.get_gpu_ids() else "cpu"  # auto: cuda when torch sees the GPU Ray gave us
        host = host or ray.util.get_node_ip_address()  # the address heads reach, and the only one listened on
        coro = start_worker(model_dir, pairs, dtype, host=host, port=0, epoch=epoch, device=device,
                            admin_token=admin_token,  # every call only with the cluster's token
                            max_dispatch_tokens=max_dispatch_tokens)
        self.worker = asyncio.run_coroutine_threadsafe(coro, self.background.loop).result()
        self.address = f"{host}:{self.worker.port}"
        self.fields = {"address": self.address, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                       "num_experts": len(pairs), "actor": ray.get_runtime_context().get_actor_name() or ""}
        self.registry.register_worker(index, self.fields)
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        log.info("expert worker %d serving %d experts at %s on %s", index, len(pairs), self.address,
                 self.worker.store.device)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                # The whole record, not only the beat: after a Redis restart the worker re-appears.
                self.fields["num_experts"] = len(self.worker.store.pairs())
                self.fields["peak_experts"] = self.worker.store.peak_pairs
                self.registry.register_worker(self.index, self.fields)
            except Exception as exc:  # Redis down or restarting: keep serving, try again next beat
                log.warning("worker %d heartbeat failed: %s", self.index, exc)

    def describe(self) -> dict[str, object]:
        return {"index": self.index, **self.fields}

    def stop(self) -> None:
        self._stop.set()
        self.background.close()


def experts_use_gpus() -> bool:
    """Whether expert workers are given a GPU each: whenever the Ray cluster has GPUs."""
    return ray.cluster_resources().get("GPU", 0) > 0


def actor_options(index: int, cluster: str, use_gpu: bool) -> dict[str, object]:
    """Ray options of worker `index`: a named detached actor that Ray restarts when it dies."""
    options: dict[str, object] = {
        "name": worker_actor_name(cluster, index), "namespace": "nextserve", "lifetime": "detached",
        "max_restarts": -1, "max_concurrency": 4, "resources": {EXPERT_RESOURCE: 1},
    }
    # A GPU per worker when the cluster has them; on CPU a small share, so a laptop fits several.
    options.update({"num_gpus": 1} if use_gpu else {"num_cpus": 0.1})
    return options


def worker_actor_name(cluster: str, index: int) -> str:
    return f"nextserve-{cluster}-expert-{index}"


ExpertWorker = ray.remote(ExpertWorkerActor)
