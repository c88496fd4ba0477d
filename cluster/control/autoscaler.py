"""The autoscaling loop's measuring and bookkeeping in the controller (the decision is autoscale_policy.py).

Every AUTOSCALE_SAMPLE_S the controller's supervision round calls `sample`:

    workers' Info (busy_s, inflight_s)  -> WorkerLoadMeter -> loads over the window
      -> WorkerAutoscalePolicy.decide(loads, N, now) -> desired N' and why
    the controller applies N' != N with its live reshard (ControllerActor.scale: waves, drain)
    Serve's head replicas (serve.status(): running, and running + starting = its target) and their
      ongoing requests (the heads' heartbeats: running + waiting)     -> a "heads" decision when the target moves
    -> ScalingStatus in Redis `{p}:scaling`: `nextserve status`, the gateway's /metrics

Heads are scaled by Serve itself (AppArgs.head_autoscaling); this loop only observes and explains them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from ray import serve

from nextserve.cluster.control import worker_admin
from nextserve.cluster.control.autoscale_meter import BusyReading, WorkerLoadMeter
from nextserve.cluster.control.autoscale_policy import (Direction, ScalingDecision, WorkerAutoscaleConfig,
                                                        WorkerAutoscalePolicy)
from nextserve.cluster.control.registry import Registry
from nextserve.cluster.control.scaling_status import ScalingStatus

log = logging.getLogger(__name__)

AUTOSCALE_SAMPLE_S = 2.0
"""Seconds between two readings of the workers (a window); the policy's delays span several windows."""
HEAD_DEPLOYMENT = "HeadDeployment"
"""The head deployment's name in Serve (the class name: cluster/deployments/head.py)."""
ACTIVE_REPLICA_STATES = ("RUNNING", "STARTING", "UPDATING", "RECOVERING")
"""Replica states Serve counts toward its target (STOPPING ones are leaving)."""


def serve_head_replicas() -> tuple[int, int] | None:
    """(running, running + starting) head replicas from Serve's status; None when no app has the heads."""
    for app in serve.status().applications.values():
        deployment = app.deployments.get(HEAD_DEPLOYMENT)
        if deployment is not None:
            states = {str(getattr(k, "value", k)): n for k, n in deployment.replica_states.items()}
            return states.get("RUNNING", 0), sum(states.get(s, 0) for s in ACTIVE_REPLICA_STATES)
    return None


class Autoscaler:
    def __init__(self, registry: Registry, admin_token: str, workers: WorkerAutoscaleConfig | None,
                 heads_range: str | None, head_target: int,
                 head_replicas: Callable[[], tuple[int, int] | None] = serve_head_replicas,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`workers`: the pool's policy settings (None: fixed size, only observed); `heads_range`:
        autoscale_heads (None: fixed); `head_target`: Serve's target ongoing requests per head replica."""
        self.registry = registry
        self.admin_token = admin_token
        self.policy = WorkerAutoscalePolicy(workers) if workers is not None else None
        self.meter = WorkerLoadMeter()
        self.head_replicas = head_replicas
        self.head_target = head_target
        self.clock = clock
        self.status = ScalingStatus(heads_range=heads_range, workers_range=str(workers.range) if workers else None)
        self.last_sample = -float("inf")

    def is_due(self) -> bool:
        return self.clock() - self.last_sample >= AUTOSCALE_SAMPLE_S

    def sample(self, addresses: list[str], current: int) -> ScalingDecision | None:
        """Measure the workers and the heads; the policy's decision for the workers (None without one)."""
        self.last_sample = self.clock()
        loads = self.meter.measure(self._read(addresses))
        self._observe_heads()
        self.status = replace(self.status, workers_current=current,
                              workers_desired=self.status.workers_desired or current,
                              worker_busy={w.worker: round(w.busy_fraction, 4) for w in loads},
                              worker_inflight={w.worker: round(w.mean_inflight, 4) for w in loads})
        if self.policy is None:
            self.status = replace(self.status, workers_desired=current)
            return None
        decision = self.policy.decide(loads, current, time.time())
        self.status = replace(self.status, workers_desired=decision.desired, last_reason=decision.reason)
        if decision.direction is not Direction.HOLD:
            self._record(decision)
        return decision

    def applied(self, current: int) -> None:
        """The reshard finished (or failed): the pool's size as published; publish the status."""
        self.status = replace(self.status, workers_current=current, workers_desired=current)
        self.publish()

    def publish(self) -> None:
        self.registry.set_scaling_status(self.status)

    def _read(self, addresses: list[str]) -> list[BusyReading]:
        readings = []
        for index, address in enumerate(addresses):
            try:
                reply = worker_admin.info(address, self.admin_token, timeout_s=5.0)
            except Exception as exc:  # restarting or gone: no reading this window (the supervisor heals it)
                log.info("autoscaler: worker %d at %s did not answer Info: %s", index, address, exc)
                continue
            readings.append(BusyReading(index, address, self.clock(), reply.busy_s, reply.inflight_s))
        return readings

    def _observe_heads(self) -> None:
        alive = [h for h in self.registry.heads() if h.alive]
        try:
            replicas = self.head_replicas()
        except Exception as exc:  # Serve's controller restarting: the heartbeats still count the heads
            log.info("autoscaler: Serve's status unavailable: %s", exc)
            replicas = None
        current, desired = replicas if replicas is not None else (len(alive), len(alive))
        before = self.status.heads_desired
        if self.status.heads_range and before and desired != before:  # fixed heads: a restart is no decision
            ongoing = sum(int(h.fields.get("num_running", 0)) + int(h.fields.get("num_waiting", 0)) for h in alive)
            per_head = ongoing / max(1, len(alive))
            self._record(ScalingDecision(
                "heads", before, desired, Direction.UP if desired > before else Direction.DOWN,
                f"Serve's autoscaler: {per_head:.1f} requests running + waiting per head replica "
                f"({len(alive)} alive) against a target of {self.head_target} (max_num_seqs)", time.time()))
        self.status = replace(self.status, heads_current=current, heads_desired=desired)

    def _record(self, decision: ScalingDecision) -> None:
        key = f"{decision.pool}:{decision.direction.value}"
        log.info("autoscale %s %d -> %d: %s", decision.pool, decision.current, decision.desired, decision.reason)
        self.status = replace(self.status, last_decision=decision,
                              decisions={**self.status.decisions, key: self.status.decisions.get(key, 0) + 1})

