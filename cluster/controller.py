"""The controller: one detached, named Ray actor that owns placement and membership.

Flow: `ensure(spec)` (idempotent; every head replica calls it) saves the desired state in Redis,
builds the placement for N workers with replication R, creates the named worker actors, waits until
each serves, and publishes the placement with the workers' addresses under a new epoch. A
supervision thread then, every second: recreates a worker whose actor is gone, republishes when a
worker restarted on a new address, and rewrites spec + placement if Redis lost them (a restart
without persistence). A restarted controller recovers the spec from Redis and re-attaches to the
named workers, which outlive it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import ray

from cluster.expert_actor import ExpertWorker, actor_options, worker_actor_name
from cluster.registry import Registry
from model.config import Qwen3NextConfig
from router.placement import Placement, build_placement

log = logging.getLogger(__name__)

CONTROLLER_NAME = "nextserve-controller"
SUPERVISE_EVERY_S = 1.0
WORKER_READY_TIMEOUT_S = 300.0
"""Loading a worker's share of the 80B checkpoint from a PVC takes minutes; the tiny one, seconds."""


@dataclass(frozen=True)
class ClusterSpec:
    model: str
    dtype: str
    num_workers: int
    replication: int


class ControllerActor:
    def __init__(self, registry_url: str, cluster: str) -> None:
        self.registry = Registry(registry_url, cluster)
        self.cluster = cluster
        self.lock = threading.RLock()
        self.spec: ClusterSpec | None = None
        self.placement: Placement | None = None
        self.workers: dict[int, Any] = {}
        self.epoch = 0
        saved = self.registry.spec()
        if saved:
            log.info("controller recovering %s from Redis", saved)
            self.ensure(saved)
        threading.Thread(target=self._supervise, name="supervise", daemon=True).start()

    def ensure(self, spec: dict[str, Any]) -> int:
        """Bring the cluster to `spec`; returns the placement epoch serving it."""
        wanted = ClusterSpec(**{k: spec[k] for k in ClusterSpec.__dataclass_fields__})
        with self.lock:
            if wanted == self.spec and self.epoch:
                return self.epoch
            if self.spec is not None and wanted != self.spec:
                raise ValueError(f"the cluster already serves {self.spec}; live re-sharding to {wanted} is "
                                 f"`nextserve scale` (not in this version)")
            config = Qwen3NextConfig.from_json(wanted.model)
            self.placement = build_placement(config.moe_layers, config.num_experts, wanted.num_workers,
                                             wanted.replication)
            self.registry.save_spec(asdict(wanted))
            self.spec = wanted
            for index in range(wanted.num_workers):
                self.workers[index] = self._get_or_create(index)
            self._wait_ready()
            return self._publish()

    def _get_or_create(self, index: int) -> Any:
        assert self.spec is not None and self.placement is not None
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        return ExpertWorker.options(**actor_options(index, self.cluster, use_gpu), get_if_exists=True).remote(
            index, self.spec.model, self.placement.experts_of(index), self.spec.dtype, self.registry.url,
            self.cluster, self.epoch)

    def _wait_ready(self) -> None:
        ray.get([w.describe.remote() for w in self.workers.values()], timeout=WORKER_READY_TIMEOUT_S)

    def _addresses(self) -> list[str]:
        described = ray.get([self.workers[i].describe.remote() for i in sorted(self.workers)],
                            timeout=WORKER_READY_TIMEOUT_S)
        return [str(d["address"]) for d in described]

    def _publish(self) -> int:
        assert self.placement is not None
        self.epoch = self.registry.publish_placement(self.placement, self._addresses(), min_epoch=self.epoch)
        log.info("published placement epoch %d", self.epoch)
        return self.epoch

    def _supervise(self) -> None:
        while True:
            time.sleep(SUPERVISE_EVERY_S)
            try:
                self.supervise_once()
            except Exception as exc:  # Redis or a worker in trouble: report, retry next round
                log.warning("supervision round failed: %s", exc)

    def supervise_once(self) -> None:
        with self.lock:
            if self.spec is None or self.placement is None:
                return
            if not self.registry.spec():
                self.registry.save_spec(asdict(self.spec))  # Redis came back empty
            current = self.registry.placement()
            for index, actor in list(self.workers.items()):
                try:
                    ray.get(actor.describe.remote(), timeout=30)
                except ray.exceptions.ActorUnavailableError:
                    continue  # Ray is restarting it; it re-registers on its new address
                except ray.exceptions.ActorDiedError:
                    log.warning("expert worker %d is gone; creating it again", index)
                    self.workers[index] = self._get_or_create(index)
            if current is None or list(current.addresses) != self._addresses():
                self._publish()

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {"spec": asdict(self.spec) if self.spec else None, "epoch": self.epoch,
                    "workers": [w.as_dict() for w in self.registry.workers()],
                    "heads": [h.as_dict() for h in self.registry.heads()]}

    def shutdown(self) -> None:
        """Stop and kill every worker (they are detached: they would outlive the job)."""
        with self.lock:
            for actor in self.workers.values():
                try:
                    ray.get(actor.stop.remote(), timeout=10)
                except Exception:  # already dead
                    pass
                ray.kill(actor, no_restart=True)
            self.workers.clear()
            self.spec = None


Controller = ray.remote(ControllerActor)


def get_or_create_controller(registry_url: str, cluster: str) -> Any:
    return Controller.options(name=f"{CONTROLLER_NAME}-{cluster}", namespace="nextserve", lifetime="detached",
                              get_if_exists=True, max_restarts=-1, max_concurrency=8,
                              num_cpus=0).remote(registry_url, cluster)
