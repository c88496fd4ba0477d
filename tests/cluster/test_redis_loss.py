"""Recovery after Redis loses its data (real Ray, real redis-server, real gRPC, real HTTP): Redis is
flushed, then a worker is SIGKILLed. The controller rewrites the spec, every `assign:{i}` and the
placement (a new epoch); the worker Ray restarts holds its current assignment (not the experts it was
created with before a scale), and the cluster serves the same greedy tokens as before."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from cluster_harness import UpProcess, wait_for
from nextserve.cluster.control import worker_admin
from nextserve.cluster.control.registry import Registry

pytestmark = pytest.mark.cluster
RECOVER_WITHIN_S = 120.0
"""Ray restarts the worker, it loads its experts, the controller re-syncs and republishes it (2 CPUs)."""
PROMPTS = [[5] * 12, list(range(40, 70)), [1000, 3, 77, 512, 9]]


@pytest.fixture(scope="module")
def up(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    proc = UpProcess(tiny_dir, tmp_path_factory.mktemp("redisloss"), 2)
    yield proc
    proc.interrupt()


def _greedy(up: UpProcess) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        r = httpx.post(f"{up.base_url}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    return texts


def test_probes_and_a_hung_worker_without_replica_is_not_ready(up: UpProcess) -> None:
    """Readiness through the real gateway: a head answers and every expert has a live replica; a hung
    worker's heartbeat goes stale, and with R = 1 its experts have none: 503 naming it, then 200 again."""
    assert httpx.get(f"{up.base_url}/health/live", timeout=30).json() == {"status": "live"}
    assert httpx.get(f"{up.base_url}/health/ready", timeout=30).json() == {"status": "ok"}
    victim = next(w for w in up.status()["workers"] if w["index"] == 1)
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        wait_for(lambda: httpx.get(f"{up.base_url}/health/ready", timeout=30).status_code == 503, 30,
                 "readiness to fail while worker 1 is hung")
        body = httpx.get(f"{up.base_url}/health/ready", timeout=30).json()
        assert body["workers_down"] == [1] and "has no live replica" in body["error"]["message"]
        assert httpx.get(f"{up.base_url}/health/live", timeout=30).status_code == 200
    finally:
        os.kill(victim["pid"], signal.SIGCONT)
    wait_for(lambda: httpx.get(f"{up.base_url}/health/ready", timeout=30).status_code == 200, 30,
             "readiness to come back")


def test_flushed_redis_and_a_killed_worker_recover_the_current_assignment(up: UpProcess) -> None:
    # A scale first: the workers' creation arguments (2 workers' shares) are no longer their assignment.
    result = up.cli("scale", "--expert-workers", "3", "--wait-s", "300")
    assert result.returncode == 0, result.stderr
    before = _greedy(up)
    registry = Registry(up.state()["redis_url"])
    record = registry.placement()
    assert record is not None and record.placement.num_workers == 3
    victim = next(w for w in up.status()["workers"] if w["index"] == 0)

    redis.Redis.from_url(registry.url).flushall()
    os.kill(victim["pid"], signal.SIGKILL)

    def recovered() -> bool:
        now = registry.placement()
        workers = {int(w.fields["index"]): w for w in registry.workers()}
        return (now is not None and now.epoch > record.epoch and 0 in workers and workers[0].alive
                and int(workers[0].fields["pid"]) != victim["pid"]
                and now.addresses[0] == workers[0].fields["address"])
    wait_for(recovered, RECOVER_WITHIN_S, "the killed worker to restart and be republished")

    now = registry.placement()
    assert now is not None and now.placement.layer_to_expert_workers == record.placement.layer_to_expert_workers
    assert int(registry.spec()["num_workers"]) == 3
    for index in range(3):
        assert registry.assignment(index) == sorted(now.placement.experts_of(index)), index
    held = {(e.layer, e.expert) for e in worker_admin.info(now.addresses[0]).experts}
    assert held == set(now.placement.experts_of(0))  # its current share, not the one it was created with
    assert _greedy(up) == before
