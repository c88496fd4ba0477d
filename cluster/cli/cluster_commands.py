"""The registry commands of the `nextserve` CLI: status, scale, rebalance (their parsers:
cluster/cli/cluster_parsers.py; this module is imported when one of them runs; `up` is cluster/cli/up.py).

They talk to the cluster's Redis registry, found through the state file `up` writes
(cluster/cli/state_file.py) or --redis-url; this module imports neither Serve nor transformers. `scale` and
`rebalance` write the desired state to Redis and wait for the controller to publish the placement that
serves it. A Redis that is down, unreachable or
refuses the password is one RegistryUnreachableError (exit 2), not a traceback.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from nextserve.cluster.cli.state_file import read_state, state_file
from nextserve.cluster.control.rebalance import measured_imbalance
from nextserve.cluster.control.registry import Registry, RegistryUnreachableError, redacted_url
from nextserve.cluster.control.reshard import ReshardError, plan_waves, serving_placement
from nextserve.model.config import ConfigError


@contextmanager
def _registry(args: argparse.Namespace) -> Iterator[Registry]:
    """The cluster's registry; Redis failing inside the block becomes a RegistryUnreachableError."""
    url = args.redis_url or read_state(state_file(args.cluster))["redis_url"]
    try:
        yield Registry(url, args.cluster)
    except redis.exceptions.AuthenticationError as exc:
        raise RegistryUnreachableError(f"Redis at {redacted_url(url)} refused the credentials ({exc}); pass "
                                       f"--redis-url with the password: redis://:PASSWORD@HOST:PORT/DB") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise RegistryUnreachableError(f"Redis at {redacted_url(url)} is unreachable ({exc}); is the cluster up "
                                       f"(`nextserve up`)? pass its registry with --redis-url") from None


def cluster_status(registry: Registry) -> dict[str, object]:
    record = registry.placement()
    num_workers = record.placement.num_workers if record else 0
    worker_load = registry.worker_load()
    per_worker: dict[int, int] = {}
    for (worker, _), n in worker_load.items():
        per_worker[worker] = per_worker.get(worker, 0) + n
    workers = [{**w.as_dict(), "load_tokens": per_worker.get(int(w.fields["index"]), 0)} for w in registry.workers()]
    return {"epoch": record.epoch if record else 0, "spec": registry.spec(), "workers": workers,
            "heads": [h.as_dict() for h in registry.heads()],
            "load_imbalance": measured_imbalance(worker_load, num_workers) if num_workers else None,
            "last_rebalance": registry.rebalance_report(), "scaling": _scaling_dict(registry)}


def _scaling_dict(registry: Registry) -> dict[str, object] | None:
    status = registry.scaling_status()
    return None if status is None else json.loads(status.to_json())


def scaling_lines(scaling: dict[str, Any]) -> list[str]:
    """`nextserve status`'s autoscaling lines: heads and workers current -> desired (range), the last
    decision with its reason, the workers' policy's latest reading."""
    def pool(name: str) -> str:
        scale_range = scaling[f"{name}_range"]
        return (f"{name} {scaling[f'{name}_current']} (desired {scaling[f'{name}_desired']}, "
                f"{'autoscaled ' + scale_range if scale_range else 'fixed'})")
    lines = [f"scaling: {pool('heads')}  {pool('workers')}"]
    last = scaling.get("last_decision")
    if last:
        at = time.strftime("%H:%M:%S", time.localtime(last["at"]))
        lines.append(f"last scaling decision {at}: {last['pool']} {last['current']} -> {last['desired']}: "
                     f"{last['reason']}")
    if scaling.get("last_reason"):
        lines.append(f"workers policy now: {scaling['last_reason']}")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    with _registry(args) as registry:
        status = cluster_status(registry)
    if args.json:
        print(json.dumps(status))
        return 0
    imbalance = status["load_imbalance"]
    print(f"placement epoch {status['epoch']}  spec {status['spec']}  load max/mean "
          f"{'-' if imbalance is None else f'{imbalance:.3f}'}")
    if status["scaling"]:
        print("\n".join(scaling_lines(status["scaling"])))  # type: ignore[arg-type]
    scaling = status["scaling"] or {}
    busy, inflight = scaling.get("worker_busy", {}), scaling.get("worker_inflight", {})  # type: ignore[union-attr]
    for w in status["workers"]:  # type: ignore[union-attr]
        index = str(w["index"])  # JSON keys
        measured = f"  busy {busy[index]:.2f}  in flight {inflight[index]:.2f}" if index in busy else ""
        print(f"worker {w['index']:>3}  pid {w['pid']:>7}  {w['address']:<22} experts {w['num_experts']:>5}  "
              f"load {w['load_tokens']:>9}{measured}  {'alive' if w['alive'] else 'DEAD'}")
    for h in status["heads"]:  # type: ignore[union-attr]
        print(f"head {h['id']}  pid {h['pid']}  epoch {h.get('epoch', '-')}  running {h.get('num_running', 0)}  "
              f"waiting {h.get('num_waiting', 0)}  blocks {h.get('blocks_used', 0)}/{h.get('blocks_total', '-')}  "
              f"slots {h.get('slots_used', 0)}/{h.get('slots_total', '-')}  "
              f"preemptions {h.get('num_preemptions', 0)}  cached blocks {h.get('blocks_cached', 0)}  "
              f"prefix hits {h.get('prefix_cache_hit_tokens', 0)}/{h.get('prefix_cache_queried_tokens', 0)} tokens  "
              f"output channels {h.get('output_channels', 0)} ({h.get('channel_outputs', 0)} outputs in "
              f"{h.get('channel_messages', 0)} messages)  {'alive' if h['alive'] else 'DEAD'}")
    return 0


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.5)


def cmd_scale(args: argparse.Namespace) -> int:
    with _registry(args) as registry:
        return _scale(registry, args)


def _scale(registry: Registry, args: argparse.Namespace) -> int:
    spec = registry.spec()
    if not spec:
        raise FileNotFoundError("no cluster spec in Redis: is a cluster running (`nextserve up`)?")
    if args.expert_workers < int(spec["expert_replicas"]):
        raise ConfigError(f"--expert-workers {args.expert_workers} is below --expert-replicas "
                          f"{spec['expert_replicas']}; every expert needs that many distinct workers")
    record = registry.placement()
    target = None  # the placement the controller reshards to; None: nothing moves (it keeps a placement of N,
    # a rebalanced one included)
    if record is not None:  # refused here, in one line, rather than by the controller in its log
        new = serving_placement(spec["model"], args.expert_workers, int(spec["expert_replicas"]))
        try:
            plan_waves(record.placement, new, spec.get("max_experts_per_worker"))
        except ReshardError as exc:
            raise ConfigError(f"--expert-workers {args.expert_workers}: {exc}") from None
        if record.placement.num_workers != args.expert_workers:
            target = new
    registry.save_spec({**spec, "expert_workers": args.expert_workers})

    def done() -> bool:
        """The last wave published (every wave already has N workers: waiting for N alone returned after
        the first, while the others still moved experts), and N workers alive."""
        record = registry.placement()
        alive = [w for w in registry.workers() if w.alive]
        if record is None or record.placement.num_workers != args.expert_workers:
            return False
        reached = target is None or record.placement.layer_to_expert_workers == target.layer_to_expert_workers
        return reached and len(alive) == args.expert_workers
    _wait(done, args.wait_s, f"scaling to {args.expert_workers} expert workers")
    print(f"serving on {args.expert_workers} expert workers, placement epoch {registry.epoch()}")
    return 0


def cmd_rebalance(args: argparse.Namespace) -> int:
    with _registry(args) as registry:
        before = registry.rebalance_report()
        registry.request_rebalance()
        _wait(lambda: registry.rebalance_report() != before, args.wait_s, "the rebalance")
        print(json.dumps(registry.rebalance_report()))
    return 0
