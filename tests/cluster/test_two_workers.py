"""One `nextserve up` on the tiny default with 2 workers (R = 1), as `make serve` runs it, shared by every
test here (one bring-up instead of three); the tests run in file order, each leaving a serving cluster:
- status lists the workers, the tiny default is made on first use, a chat completion answers;
- readiness through the real gateway: a hung worker without a replica makes it 503, then 200 again;
- a SIGKILLed worker with R = 1: requests get a quick 503 naming the experts, then it serves again;
- recovery after Redis loses its data (real Ray, real redis-server, real gRPC, real HTTP): Redis is
  flushed, then a worker is SIGKILLed. The controller rewrites the spec, every `assign:{i}` and the
  placement (a new epoch); the worker Ray restarts holds its current assignment (not the experts it was
  created with before a scale), and the cluster serves the same greedy tokens as before;
- last, SIGINT leaves no Ray or redis process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from cluster_harness import UpProcess, pids_alive, wait_for
from nextserve.cluster.control import worker_admin
from nextserve.cluster.control.registry import Registry
from nextserve.model.tiny import TINY_VERSION

pytestmark = pytest.mark.cluster
RECOVER_WITHIN_S = 120.0
"""Ray restarts the worker, it loads its experts, the controller re-syncs and republishes it (2 CPUs)."""
RESTORE_WITHIN_S = 30.0
"""Stated bound: a SIGKILLed worker is restarted by Ray, reloads its experts and is republished."""
PROMPTS = [[5] * 12, list(range(40, 70)), [1000, 3, 77, 512, 9]]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    """`--model tiny` (made in the empty cache on first use); a request with no live replica for an
    expert waits 0.5 s for one before its 503."""
    proc = UpProcess(Path("tiny"), tmp_path_factory.mktemp("two-workers"), 2, ["--unavailable-wait-s", "0.5"])
    yield proc
    if proc.proc.poll() is None:  # test_sigint_leaves_nothing interrupts it itself
        proc.interrupt()


def _greedy(up: UpProcess) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        r = httpx.post(f"{up.base_url}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    return texts


def test_up_tiny_default_serves_and_status_lists_the_workers(up: UpProcess) -> None:
    status = up.status()
    assert len(status["workers"]) == 2 and all(w["pid"] > 0 and w["alive"] for w in status["workers"])
    assert (up.cache / f"tiny-{TINY_VERSION}" / "config.json").exists()  # the tiny default was made on first use
    r = httpx.post(f"{up.base_url}/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


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


def test_sigkill_with_one_replica_gives_503_then_recovers(up: UpProcess) -> None:
    pid = up.status()["workers"][1]["pid"]
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    r = httpx.post(f"{up.base_url}/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": [5] * 30, "max_tokens": 4, "temperature": 0})
    elapsed = time.monotonic() - start
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert "experts unavailable" in error["message"] and "layer" in error["message"]
    assert elapsed < 15
    wait_for(lambda: httpx.post(f"{up.base_url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": [5] * 30, "max_tokens": 4, "temperature": 0}).status_code == 200,
        RESTORE_WITHIN_S, "the cluster to serve again")


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
    assert int(registry.spec()["expert_workers"]) == 3
    for index in range(3):
        assert registry.assignment(index) == sorted(now.placement.experts_of(index)), index
    held = {(e.layer, e.expert) for e in worker_admin.info(now.addresses[0], up.state()["admin_token"]).experts}
    assert held == set(now.placement.experts_of(0))  # its current share, not the one it was created with
    assert _greedy(up) == before


def test_sigint_leaves_nothing(up: UpProcess) -> None:
    """Last: Ctrl-C stops every worker and head, Ray and the redis-server `up` started, and removes its state."""
    status = up.status()
    pids = [w["pid"] for w in status["workers"]] + [h["pid"] for h in status["heads"]]
    port = urlsplit(up.state()["redis_url"]).port  # the URL carries the password
    code = up.interrupt()
    assert code == 0, "".join(up.lines[-30:])
    assert pids_alive(pids) == []
    leftovers = subprocess.run(["pgrep", "-f", f"redis-server 127.0.0.1:{port}|raylet|gcs_server"],
                               capture_output=True, text=True).stdout.split()
    assert leftovers == [], leftovers
    assert not (up.cache / "cluster-default.json").exists()
