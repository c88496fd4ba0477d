"""The controller: one detached, named Ray actor that owns placement and membership.

Flow: `ensure(spec)` (idempotent; every head replica calls it with its args' ClusterSpec fields) saves
the desired state in Redis, builds the placement for N workers with replication R, starts the named worker actors and publishes
the placement with their addresses under a new epoch. `scale(n)` and `rebalance()` move to a new
placement live (cluster/control/reshard.py). A supervision thread, every second: follows a spec changed in
Redis (`nextserve scale`), runs a requested or scheduled rebalance, recreates a worker whose actor is
gone, re-syncs a worker that (re)started on a new address (it LoadExperts what its assignment has and it
lacks, DropExperts what it holds beyond it) before republishing, rewrites everything Redis lost (spec,
every `assign:{i}`, the placement with its addresses under an epoch above the last), and adds the
workers' token counters to the load statistics; every 2 s the autoscaler measures the workers' busy
time and, with --autoscale-expert-workers, resizes the pool through `scale` (cluster/control/autoscaler.py,
autoscale_policy.py). A restarted controller recovers the spec and the
placement from Redis and re-attaches to the named workers, which outlive it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, replace
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import ray

from nextserve.cluster.control import reshard, worker_admin
from nextserve.cluster.control.autoscale_policy import WorkerAutoscaleConfig
from nextserve.cluster.control.autoscaler import Autoscaler
from nextserve.cluster.deployments.expert_worker import ExpertWorker, actor_options, experts_use_gpus
from nextserve.cluster.control.rebalance import LoadCollector, measured_imbalance, plan_rebalance
from nextserve.cluster.control.registry import Registry
from nextserve.proto.codec import DEFAULT_MAX_DISPATCH_TOKENS
from nextserve.router.eplb import movement
from nextserve.router.placement import Placement

if TYPE_CHECKING:
    from nextserve.cluster.app_args import AppArgs

log = logging.getLogger(__name__)

CONTROLLER_NAME = "nextserve-controller"
SUPERVISE_EVERY_S = 1.0
COLLECT_LOAD_EVERY_S = 2.0
WORKER_READY_TIMEOUT_S = 300.0
"""Loading a worker's share of the 80B checkpoint from a PVC takes minutes; the tiny one, seconds."""


@dataclass(frozen=True)
class ClusterSpec:
    """The desired state the controller serves (and keeps in Redis, `{p}:spec`): the AppArgs fields of
    the same names, so a head passes its args as they are and `nextserve scale` writes `expert_workers`."""

    model: str
    dtype: str
    expert_workers: int
    expert_replicas: int
    rebalance_every_s: float = 0.0
    """0 disables scheduled rebalancing (`nextserve rebalance` still works)."""
    max_experts_per_worker: int | None = None
    """The most (layer, expert) pairs a worker may hold at any moment (its memory; `nextserve plan`
    computes it): scaling and rebalancing move in waves within it. None: no bound (one step)."""
    max_tokens_per_step: int = DEFAULT_MAX_DISPATCH_TOKENS
    """A head's step, so the tokens in the largest Dispatch a head sends: each worker's message limit is
    sized from it and the model (proto/codec.py:dispatch_message_limit)."""
    expert_worker_host: str | None = None
    """What workers listen on; None: their node's IP."""
    head_replicas: int = 1
    max_num_seqs: int = 1
    """Serve's target ongoing requests per head replica when autoscale_heads is set (AppArgs.head_autoscaling)."""
    autoscale_heads: str | None = None
    autoscale_expert_workers: str | None = None
    """MIN:MAX of the worker pool the controller scales on measured load; None: fixed (AppArgs docs)."""
    autoscale_busy_high: float | None = None
    autoscale_busy_low: float | None = None
    autoscale_upscale_delay_s: float | None = None
    autoscale_downscale_delay_s: float | None = None
    autoscale_cooldown_s: float | None = None
    """None: WorkerAutoscaleConfig's default."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ClusterSpec":
        """The spec's fields out of `values` (a head's AppArgs dump, the hash saved in Redis)."""
        return cls(**{k: values[k] for k in cls.__dataclass_fields__ if k in values})


class ControllerActor:
    def __init__(self, registry_url: str, cluster: str, admin_token: str) -> None:
        self.registry = Registry(registry_url, cluster)
        self.cluster = cluster
        self.admin_token = admin_token
        """The cluster's admin token: the workers it creates require it, its LoadExperts/DropExperts send it."""
        self.lock = threading.RLock()
        self.spec: ClusterSpec | None = None
        self.placement: Placement | None = None
        self.workers: dict[int, Any] = {}
        self.synced: dict[int, str] = {}
        """worker -> the address at which it was last checked to hold its assignment (`_resync`); another
        address is a worker that (re)started since: the next supervision round re-syncs it."""
        self.epoch = 0
        self.loads = LoadCollector(self.registry, admin_token)
        self.last_collect = self.last_rebalance = time.monotonic()
        self.autoscaler: Autoscaler | None = None
        """Built with the spec (`ensure`): measures the workers, decides their pool's size, observes heads."""
        saved, record = self.registry.spec(), self.registry.placement()
        if saved:
            log.info("controller recovering %s (epoch %s) from Redis", saved, record.epoch if record else None)
            self.placement = record.placement if record else None
            self.epoch = record.epoch if record else 0
            self.ensure(ClusterSpec.from_mapping(saved))
        threading.Thread(target=self._supervise, name="supervise", daemon=True).start()

    def ensure(self, wanted: ClusterSpec) -> int:
        """Bring up the cluster for `wanted` unless it runs already; returns the placement epoch serving it.

        A running cluster keeps its size: a head replica that restarts with its original arguments
        must not undo a `scale`. Only `scale` (or the spec in Redis) changes the number of workers."""
        with self.lock:
            if self.spec is not None and self.workers:
                if (wanted.model, wanted.dtype) != (self.spec.model, self.spec.dtype):
                    raise ValueError(f"the cluster serves {self.spec}; start another cluster for {wanted}")
                return self.epoch
            if self.placement is None:
                self.placement = reshard.serving_placement(wanted.model, wanted.expert_workers, wanted.expert_replicas)
            reshard.check_fits(self.placement, wanted.max_experts_per_worker)
            self.spec = replace(wanted, expert_workers=self.placement.num_workers)
            reshard.grow(self.registry, self.workers, None, self.placement, self._create, self.epoch,
                         self.admin_token)
            self._wait_ready()
            self._publish()
            self.registry.save_spec(asdict(self.spec))
            self.autoscaler = Autoscaler(self.registry, self.admin_token,
                                         WorkerAutoscaleConfig.from_fields(asdict(self.spec)),
                                         self.spec.autoscale_heads, self.spec.max_num_seqs)
            return self.scale(wanted.expert_workers)  # a no-op unless a recovered cluster was asked to resize

    def scale(self, expert_workers: int) -> int:
        with self.lock:
            assert self.spec is not None and self.placement is not None
            if expert_workers == self.placement.num_workers:
                return self.epoch
            new = reshard.serving_placement(self.spec.model, expert_workers, self.spec.expert_replicas)
            epoch = self._move(new)  # a ReshardError (does not fit) is raised before anything moves
            self.spec = replace(self.spec, expert_workers=expert_workers)
            self.registry.save_spec(asdict(self.spec))
            self.loads.reset()
            return epoch

    def rebalance(self) -> dict[str, Any]:
        """Re-place experts for the load seen since the last rebalance; returns a report."""
        with self.lock:
            assert self.placement is not None
            load = self.registry.load()
            if not load:
                report: dict[str, Any] = {"skipped": "no load recorded since the last rebalance", "at": time.time()}
                self.registry.set_rebalance_report(report)
                return report
            before = measured_imbalance(self.registry.worker_load(), self.placement.num_workers)
            new, predicted = plan_rebalance(self.placement, load, self.epoch)
            moved = movement(self.placement, new)
            try:
                epoch = self._move(new)
            except reshard.ReshardError as exc:
                report = {"skipped": f"the rebalanced placement does not fit: {exc}", "at": time.time()}
                self.registry.set_rebalance_report(report)
                return report
            self.loads.reset()
            self.last_rebalance = time.monotonic()
            report = {"epoch": epoch, "measured_before": before, "pairs_loaded": moved, "at": time.time(), **predicted}
            self.registry.set_rebalance_report(report)
            return report

    def _move(self, new: Placement) -> int:
        """Step from the current placement to `new` in waves that keep every worker within
        `max_experts_per_worker` (reshard.plan_waves); each wave: grow, publish, switch, drain, shrink."""
        assert self.spec is not None and self.placement is not None
        waves = reshard.plan_waves(self.placement, new, self.spec.max_experts_per_worker)
        if len(waves) > 1:
            log.info("moving in %d waves (max %s experts per worker)", len(waves), self.spec.max_experts_per_worker)
        for step in waves:
            old = self.placement
            reshard.grow(self.registry, self.workers, old, step, self._create, self.epoch, self.admin_token)
            self._wait_ready()
            self.placement = step
            epoch = self._publish()
            reshard.wait_for_switch(self.registry, epoch)
            reshard.drain(self._addresses_of(sorted(self.workers)), epoch, self.admin_token)
            reshard.shrink(self.registry, self.workers, old, step, epoch, self.admin_token)
        return self.epoch

    def _create(self, index: int) -> Any:
        assert self.spec is not None and self.placement is not None
        return ExpertWorker.options(**actor_options(index, self.cluster, experts_use_gpus()), get_if_exists=True).remote(
            index, self.spec.model, self.placement.experts_of(index), self.spec.dtype, self.registry.url,
            self.cluster, self.epoch, self.admin_token, self.spec.max_tokens_per_step, self.spec.expert_worker_host)

    def _wait_ready(self) -> None:
        ray.get([w.describe.remote() for w in self.workers.values()], timeout=WORKER_READY_TIMEOUT_S)

    def _addresses(self) -> list[str]:
        assert self.placement is not None
        return self._addresses_of(range(self.placement.num_workers))

    def _addresses_of(self, indices: Iterable[int]) -> list[str]:
        described = ray.get([self.workers[i].describe.remote() for i in indices], timeout=WORKER_READY_TIMEOUT_S)
        return [str(d["address"]) for d in described]

    def _publish(self) -> int:
        assert self.placement is not None
        self.epoch = self.registry.publish_placement(self.placement, self._addresses(), min_epoch=self.epoch)
        log.info("published placement epoch %d (%d workers)", self.epoch, self.placement.num_workers)
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
            wanted = self.registry.spec()
            if not wanted:
                self._restore_registry()
            elif int(wanted["expert_workers"]) != self.spec.expert_workers:
                try:
                    self.scale(int(wanted["expert_workers"]))
                except reshard.ReshardError as exc:  # `nextserve scale` checks first; someone wrote Redis directly
                    log.error("scaling to %s workers refused: %s", wanted["expert_workers"], exc)
                    self.registry.save_spec(asdict(self.spec))
            self._heal()
            self._collect_and_rebalance()
            self._autoscale()

    def _autoscale(self) -> None:
        """Measure, decide, apply: a decided size other than the current one goes through `scale` (the live
        reshard); the status is published before (the desired size shows while it runs) and after."""
        assert self.placement is not None
        if self.autoscaler is None or not self.autoscaler.is_due():
            return
        current = self.placement.num_workers
        decision = self.autoscaler.sample(self._addresses(), current)
        self.autoscaler.publish()
        if decision is None or decision.desired == current:
            return
        try:
            self.scale(decision.desired)
        except reshard.ReshardError as exc:
            log.error("autoscaling to %d workers refused: %s", decision.desired, exc)
        self.autoscaler.applied(self.placement.num_workers)

    def _restore_registry(self) -> None:
        """Redis came back empty (restarted without persistence, flushed): write the spec and every worker's
        assignment (what a worker Ray restarts loads); `_heal`, next, re-syncs any worker that restarted
        meanwhile and republishes the placement with the addresses under an epoch above the last."""
        assert self.spec is not None and self.placement is not None
        log.warning("Redis lost the cluster's state; rewriting spec, assignments and placement (epoch > %d)",
                    self.epoch)
        self.registry.save_spec(asdict(self.spec))
        for index in range(self.placement.num_workers):
            self.registry.set_assignment(index, self.placement.experts_of(index))

    def _heal(self) -> None:
        for index, actor in list(self.workers.items()):
            try:
                ray.get(actor.describe.remote(), timeout=30)
            except ray.exceptions.ActorUnavailableError:
                continue  # Ray is restarting it; it re-registers on its new address
            except ray.exceptions.ActorDiedError:
                log.warning("expert worker %d is gone; creating it again", index)
                self.workers[index] = self._create(index)
        addresses = self._addresses()
        for index, address in enumerate(addresses):
            if self.synced.get(index) != address:  # (re)started since: make it hold its assignment first
                self._resync(index, address)
        current = self.registry.placement()
        if current is None or list(current.addresses) != addresses:
            self._publish()

    def _resync(self, index: int, address: str) -> None:
        """Make worker `index` hold exactly its experts of the placement. A worker Ray restarts loads its
        `assign:{i}` from Redis, or its creation arguments when Redis had lost them: older than a scale
        or rebalance since. Until this runs, heads fail it over (it answers FAILED_PRECONDITION)."""
        assert self.placement is not None
        want = set(self.placement.experts_of(index))
        self.registry.set_assignment(index, sorted(want))
        held = {(e.layer, e.expert) for e in worker_admin.info(address, self.admin_token).experts}
        missing, extra = sorted(want - held), sorted(held - want)
        if missing:
            worker_admin.load_experts(address, missing, self.epoch, self.admin_token)
        if extra:
            worker_admin.drop_experts(address, extra, self.epoch, self.admin_token)
        if missing or extra:
            log.warning("expert worker %d at %s re-synced: loaded %d experts, dropped %d", index, address,
                        len(missing), len(extra))
        self.synced[index] = address

    def _collect_and_rebalance(self) -> None:
        assert self.spec is not None
        now = time.monotonic()
        if now - self.last_collect >= COLLECT_LOAD_EVERY_S:
            self.loads.collect(self._addresses())
            self.last_collect = now
        scheduled = self.spec.rebalance_every_s > 0 and now - self.last_rebalance >= self.spec.rebalance_every_s
        if self.registry.take_rebalance_request() or scheduled:
            self.loads.collect(self._addresses())
            log.info("rebalance: %s", self.rebalance())

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {"spec": asdict(self.spec) if self.spec else None, "epoch": self.epoch,
                    "workers": [w.as_dict() for w in self.registry.workers()],
                    "heads": [h.as_dict() for h in self.registry.heads()]}

    def shutdown(self) -> None:
        """Stop and kill every worker (they are detached: they would outlive the job)."""
        with self.lock:
            # All at once, a bounded wait: a worker whose node is gone is pending a restart that never
            # comes, and its stop would wait forever (one at a time, they outlasted `up`'s Ctrl-C).
            stops = [actor.stop.remote() for actor in self.workers.values()]
            ray.wait(stops, num_returns=len(stops), timeout=10)
            for actor in self.workers.values():
                ray.kill(actor, no_restart=True)
            self.workers.clear()
            self.spec = None


Controller = ray.remote(ControllerActor)


def start_cluster(args: AppArgs) -> ray.ObjectRef:
    """Ask the cluster's controller (created if absent) to serve `args`' ClusterSpec: the workers start,
    load their experts and are published. Every head replica waits on it in its init; `nextserve up` calls
    it before deploying the heads, so the controller and workers start while the replicas do. `args` as a
    head gets them (Redis password and admin token resolved)."""
    controller = get_or_create_controller(args.redis_url, args.cluster, args.admin_token)
    return controller.ensure.remote(ClusterSpec.from_mapping(args.model_dump(exclude={"admin_token"})))


def get_or_create_controller(registry_url: str, cluster: str, admin_token: str | None) -> Any:
    """The cluster's controller; one that exists already keeps the admin token it was created with (its
    workers hold that one). A cluster never runs without a token: its workers would take LoadExperts and
    DropExperts from anyone who reaches their port."""
    if not admin_token:
        raise ValueError("no admin token for the expert workers: set admin_token_env (Kubernetes: from the "
                         "nextserve-admin Secret) or admin_token in the Serve app's args")
    return Controller.options(name=f"{CONTROLLER_NAME}-{cluster}", namespace="nextserve", lifetime="detached",
                              get_if_exists=True, max_restarts=-1, max_concurrency=8,
                              num_cpus=0).remote(registry_url, cluster, admin_token)
