"""The Redis registry against a real redis-server: placement epochs, members, heartbeats, pub/sub."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import redis

from nextserve.cluster.control.autoscale_policy import Direction, ScalingDecision
from nextserve.cluster.control import redis_server as redis_server_module
from nextserve.cluster.control.redis_server import LocalRedis, PortTakenError
from nextserve.cluster.control.registry import Registry
from nextserve.cluster.control.scaling_status import ScalingStatus
from nextserve.router.placement import build_placement

MESSAGE_WAIT_S = 30.0
"""How long a pub/sub read waits for a message that must come (it returns as soon as one arrives)."""


@pytest.fixture()
def redis_server() -> Iterator[LocalRedis]:
    with LocalRedis() as r:
        yield r


def test_placement_epochs_are_monotonic_and_announced(redis_server: LocalRedis) -> None:
    reg = Registry(redis_server.url, "t")
    sub = redis.Redis.from_url(redis_server.url, decode_responses=True).pubsub()
    sub.subscribe(reg.key("epochs"))
    # the subscribe confirmation: subscribed from here on (redis-py's wait returns as soon as it arrives; a
    # loaded machine may take over a second, and a missed confirmation would be read as the first epoch)
    confirmation = sub.get_message(timeout=MESSAGE_WAIT_S)
    assert confirmation is not None and confirmation["type"] == "subscribe", confirmation
    placement = build_placement([0, 1], 8, 3, 2)
    assert reg.placement() is None and reg.epoch() == 0
    e1 = reg.publish_placement(placement, ["a:1", "b:2", "c:3"])
    e2 = reg.publish_placement(placement, ["a:1", "b:9", "c:3"])
    assert (e1, e2) == (1, 2)
    record = reg.placement()
    assert record is not None and record.epoch == 2 and record.addresses == ("a:1", "b:9", "c:3")
    assert record.placement.layer_to_expert_workers == placement.layer_to_expert_workers
    assert record.placement.epoch == 2
    announced = [sub.get_message(timeout=MESSAGE_WAIT_S) for _ in range(2)]
    assert [m and m["data"] for m in announced] == ["1", "2"], announced


def test_epoch_stays_monotonic_when_redis_loses_its_data(redis_server: LocalRedis) -> None:
    reg = Registry(redis_server.url)
    placement = build_placement([0], 4, 2)
    for _ in range(5):
        last = reg.publish_placement(placement, ["a:1", "b:2"])
    redis_server.restart()  # no persistence: every key is gone
    assert reg.placement() is None
    assert reg.publish_placement(placement, ["a:1", "b:2"], min_epoch=last) == last + 1


def test_members_heartbeat_and_staleness(redis_server: LocalRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Registry(redis_server.url, "m")
    reg.register_worker(1, {"address": "h:1", "pid": 42})
    reg.register_worker(0, {"address": "h:0", "pid": 41})
    reg.register_head("abc", {"pid": 7})
    workers = reg.workers()
    assert [w.fields["index"] for w in workers] == ["0", "1"] and all(w.alive for w in workers)
    assert workers[1].as_dict()["pid"] == 42 and reg.heads()[0].as_dict()["id"] == "abc"
    reg.client.hset(reg.key("worker", 1), "heartbeat", 0)  # a worker that stopped beating long ago
    assert [w.alive for w in reg.workers()] == [True, False]
    reg.register_worker(1, {"address": "h:1", "pid": 42})  # its next beat
    assert all(w.alive for w in reg.workers())
    reg.forget_worker(1)
    assert [w.fields["index"] for w in reg.workers()] == ["0"]


def test_spec_round_trip_and_cluster_namespaces(redis_server: LocalRedis) -> None:
    a, b = Registry(redis_server.url, "a"), Registry(redis_server.url, "b")
    a.save_spec({"model": "/m", "expert_workers": 3, "expert_replicas": 2, "dtype": "float32"})
    assert a.spec() == {"model": "/m", "expert_workers": 3, "expert_replicas": 2, "dtype": "float32"}
    assert b.spec() == {}


def test_scaling_status_round_trips_and_a_stopped_head_leaves(redis_server: LocalRedis) -> None:
    reg = Registry(redis_server.url, "t3")
    assert reg.scaling_status() is None
    decision = ScalingDecision("workers", 3, 2, Direction.DOWN, "pool busy 0.00: idle", 1.7e9)
    status = ScalingStatus(1, 1, "1:2", 3, 2, "2:3", {0: 0.0, 2: 0.1}, {0: 0.0, 2: 0.2}, decision, "idle",
                           {"workers:down": 1})
    reg.set_scaling_status(status)
    assert Registry(redis_server.url, "t3").scaling_status() == status
    reg.register_head("a", {"pid": 1})
    reg.register_head("b", {"pid": 2})
    reg.forget_head("a")
    assert [h.fields["id"] for h in reg.heads()] == ["b"]


def test_a_local_redis_whose_free_port_was_taken_meanwhile_starts_on_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """free_port's port is free only when it looked: another process that binds it first (here a socket
    that listens and never answers, which also takes the readiness ping) makes redis-server exit; a
    LocalRedis that picked its port picks another, one given a port names it."""
    with socket.socket() as taker:
        taker.bind(("127.0.0.1", 0))
        taker.listen()
        taken = taker.getsockname()[1]
        with pytest.raises(PortTakenError, match=f"127.0.0.1:{taken}: another process holds that port"):
            LocalRedis(port=taken)
        picks = iter([taken])
        found = redis_server_module.free_port
        monkeypatch.setattr(redis_server_module, "free_port", lambda host="127.0.0.1": next(picks, None) or found(host))
        with LocalRedis() as server:
            assert server.port != taken
            assert redis.Redis.from_url(server.url).ping()
