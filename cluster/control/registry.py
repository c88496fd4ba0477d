"""The cluster registry in Redis: desired state, expert workers, heads, and the placement epoch.

Keys (prefix `nextserve:{cluster}`, cluster "default" unless named):

| key | type | holds |
| --- | --- | --- |
| `{p}:spec` | hash | desired state, ClusterSpec: model, dtype, expert_workers, expert_replicas, rebalance_every_s, max_experts_per_worker (AppArgs names; the controller recovers from it) |
| `{p}:epoch` | string | the last placement epoch, an integer only ever INCRed |
| `{p}:placement` | hash | epoch, placement (router.placement JSON), addresses (JSON list by worker index) |
| `{p}:workers` | set | worker indices ever registered |
| `{p}:worker:{i}` | hash | index, address, pid, node, num_experts, peak_experts (the most held at once), actor, heartbeat (unix s) |
| `{p}:heads` | set | head replica ids |
| `{p}:head:{id}` | hash | id, pid, node, epoch (the placement it dispatches with), the load fields of EngineStats (running, waiting, cache blocks and slots used/total, preemptions), heartbeat |
| `{p}:assign:{i}` | string | JSON [[layer, expert], ...] worker i must hold (a restarted worker loads these) |
| `{p}:load` | hash | "layer:expert" -> tokens served since the last rebalance (summed over workers) |
| `{p}:worker_load` | hash | "worker:layer" -> tokens served since the last rebalance |
| `{p}:rebalance` | string | set by `nextserve rebalance`; the controller rebalances and deletes it |
| `{p}:rebalance_report` | string | JSON of the last rebalance: imbalance before/after, epoch, pairs moved |
| `{p}:scaling` | string | JSON of the autoscaling loop's status (cluster/control/scaling_status.py): current / desired heads and workers, busy fractions, the last decision and its reason |
| `{p}:epochs` | pub/sub channel | each new epoch number, published after the placement is written |
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from nextserve.cluster.control.scaling_status import ScalingStatus
from nextserve.router.placement import Placement, PlacementRecord

HEARTBEAT_S = 1.0
"""How often workers and heads refresh their heartbeat."""
STALE_AFTER_S = 5.0
"""A heartbeat older than this marks a worker or head as not alive (5 missed beats)."""


class RegistryUnreachableError(ConnectionError):
    """Redis is down, unreachable, or refuses the credentials; the message names the URL (without its
    password) and what to do."""


def redacted_url(url: str) -> str:
    """`url` with its password, if any, replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


@dataclass(frozen=True)
class MemberRecord:
    """A worker or head as registered; `alive` is derived from the heartbeat's age."""
    fields: dict[str, str]
    age_s: float

    @property
    def alive(self) -> bool:
        return self.age_s <= STALE_AFTER_S

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: _number(v) for k, v in self.fields.items()}
        out["heartbeat_age_s"] = round(self.age_s, 3)
        out["alive"] = self.alive
        return out


def _number(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


class Registry:
    def __init__(self, url: str, cluster: str = "default") -> None:
        self.url = url
        self.client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5,
                                           socket_connect_timeout=5, health_check_interval=10)
        self.prefix = f"nextserve:{cluster}"

    @property
    def public_url(self) -> str:
        """The URL with its password masked: what logs and errors may name."""
        return redacted_url(self.url)

    def key(self, *parts: object) -> str:
        return ":".join([self.prefix, *map(str, parts)])

    # ---- desired state ----------------------------------------------------------------------------

    def save_spec(self, spec: dict[str, Any]) -> None:
        self.client.hset(self.key("spec"), mapping={k: json.dumps(v) for k, v in spec.items()})

    def spec(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.client.hgetall(self.key("spec")).items()}

    # ---- placement --------------------------------------------------------------------------------

    def publish_placement(self, placement: Placement, addresses: list[str], min_epoch: int = 0) -> int:
        """Write a placement under a new epoch (> min_epoch, even if Redis lost the counter), then
        announce the epoch; returns it."""
        epoch = int(self.client.incr(self.key("epoch")))
        if epoch <= min_epoch:
            self.client.set(self.key("epoch"), min_epoch + 1)
            epoch = min_epoch + 1
        stamped = Placement(placement.num_workers, placement.replication, placement.layer_to_expert_workers, epoch)
        self.client.hset(self.key("placement"), mapping={
            "epoch": epoch, "placement": stamped.to_json(), "addresses": json.dumps(addresses)})
        self.client.publish(self.key("epochs"), epoch)
        return epoch

    def placement(self) -> PlacementRecord | None:
        raw = self.client.hgetall(self.key("placement"))
        if not raw:
            return None
        return PlacementRecord(int(raw["epoch"]), Placement.from_json(raw["placement"]),
                               tuple(json.loads(raw["addresses"])))

    def epoch(self) -> int:
        raw = self.client.hget(self.key("placement"), "epoch")
        return int(raw) if raw is not None else 0

    # ---- members ----------------------------------------------------------------------------------

    def register_worker(self, index: int, fields: dict[str, Any]) -> None:
        self.client.sadd(self.key("workers"), index)
        self.client.hset(self.key("worker", index), mapping={**fields, "index": index, "heartbeat": time.time()})

    def workers(self) -> list[MemberRecord]:
        return self._members("workers", "worker")

    def register_head(self, head_id: str, fields: dict[str, Any]) -> None:
        self.client.sadd(self.key("heads"), head_id)
        self.client.hset(self.key("head", head_id), mapping={**fields, "id": head_id, "heartbeat": time.time()})

    def heads(self) -> list[MemberRecord]:
        return self._members("heads", "head")

    def forget_head(self, head_id: str) -> None:
        """A head replica that stopped (autoscaled away) leaves the registry."""
        self.client.srem(self.key("heads"), head_id)
        self.client.delete(self.key("head", head_id))

    def _members(self, set_name: str, kind: str) -> list[MemberRecord]:
        now = time.time()
        ids = sorted(self.client.smembers(self.key(set_name)), key=lambda x: (len(x), x))
        out = []
        for member in ids:
            fields = self.client.hgetall(self.key(kind, member))
            if fields:
                out.append(MemberRecord(fields, now - float(fields.get("heartbeat", 0))))
        return out

    def forget_worker(self, index: int) -> None:
        self.client.srem(self.key("workers"), index)
        self.client.delete(self.key("worker", index), self.key("assign", index))

    # ---- assignments and load ---------------------------------------------------------------------

    def set_assignment(self, index: int, pairs: list[tuple[int, int]]) -> None:
        self.client.set(self.key("assign", index), json.dumps(sorted(pairs)))

    def assignment(self, index: int) -> list[tuple[int, int]] | None:
        raw = self.client.get(self.key("assign", index))
        return [(int(layer), int(e)) for layer, e in json.loads(raw)] if raw else None

    def add_load(self, expert_tokens: dict[tuple[int, int], int], worker_tokens: dict[tuple[int, int], int]) -> None:
        """expert_tokens: (layer, expert) -> tokens; worker_tokens: (worker, layer) -> tokens."""
        pipe = self.client.pipeline()
        for (layer, expert), n in expert_tokens.items():
            pipe.hincrby(self.key("load"), f"{layer}:{expert}", n)
        for (worker, layer), n in worker_tokens.items():
            pipe.hincrby(self.key("worker_load"), f"{worker}:{layer}", n)
        pipe.execute()

    def load(self) -> dict[tuple[int, int], int]:
        return {(int(k.split(":")[0]), int(k.split(":")[1])): int(v)
                for k, v in self.client.hgetall(self.key("load")).items()}

    def worker_load(self) -> dict[tuple[int, int], int]:
        """(worker, layer) -> tokens served since the last rebalance."""
        return {(int(k.split(":")[0]), int(k.split(":")[1])): int(v)
                for k, v in self.client.hgetall(self.key("worker_load")).items()}

    def reset_load(self) -> None:
        self.client.delete(self.key("load"), self.key("worker_load"))

    def request_rebalance(self) -> None:
        self.client.set(self.key("rebalance"), time.time())

    def take_rebalance_request(self) -> bool:
        return bool(self.client.delete(self.key("rebalance")))

    def set_rebalance_report(self, report: dict[str, Any]) -> None:
        self.client.set(self.key("rebalance_report"), json.dumps(report))

    def set_scaling_status(self, status: ScalingStatus) -> None:
        self.client.set(self.key("scaling"), status.to_json())

    def scaling_status(self) -> ScalingStatus | None:
        raw = self.client.get(self.key("scaling"))
        return ScalingStatus.from_json(raw) if raw else None

    def rebalance_report(self) -> dict[str, Any] | None:
        raw = self.client.get(self.key("rebalance_report"))
        return json.loads(raw) if raw else None
