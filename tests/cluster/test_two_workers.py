"""One `nextserve up` on the tiny default with 2 workers (R = 1), as `make serve` runs it, with a head cache
far below the offered load (`--cache-memory 2MiB`), shared by every test here (one bring-up instead of
four); the tests run in file order, each leaving a serving cluster:
- status lists the workers, the tiny default is made on first use, a chat completion answers;
- concurrent streams through the openai client all finish with transformers' greedy text while the head
  preempts and recomputes sequences; /metrics and `nextserve status` show the cache and the preemptions;
  a request that could never fit in the cache is a 400 naming the limit;
- the perimeter, from outside holding no token: the workers (on loopback) answer Dispatch,
  DispatchStream, Info and a 200 MiB Echo with UNAUTHENTICATED and a 64 MiB body with UNAUTHENTICATED
  or RESOURCE_EXHAUSTED; Redis answers NOAUTH; neither `up`'s output nor `status` shows the Redis
  password or the token, the state file is its owner's only; the heads (with the token) still serve
  greedy completions equal to transformers';
- readiness through the real gateway: a hung worker without a replica makes it 503, then 200 again;
- a SIGKILLed worker with R = 1: requests get a quick 503 naming the experts, then it serves again;
- recovery after Redis loses its data (real Ray, real redis-server, real gRPC, real HTTP): Redis is
  flushed, then a worker is SIGKILLed. The controller rewrites the spec, every `assign:{i}` and the
  placement (a new epoch); the worker Ray restarts holds its current assignment (not the experts it was
  created with before a scale), and the cluster serves the same greedy tokens as before;
- last, SIGINT leaves no Ray or redis process behind."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import httpx
import openai
import psutil
import pytest
import redis
import torch
from prometheus_client.parser import text_string_to_metric_families

from cluster_harness import UpProcess, hf_greedy_tokens, pids_alive, prefetch_greedy, wait_for
from nextserve.cluster.control import worker_admin
from nextserve.cluster.control.registry import Registry
from nextserve.model.cache.budget import CacheCapacity, CacheConfig, cache_capacity, parse_memory_size
from nextserve.model.config import Qwen3NextConfig
from nextserve.model.sizes import model_sizes
from nextserve.model.tiny import TINY_VERSION
from nextserve.proto import expert_pb2, expert_pb2_grpc
from nextserve.proto.admin_auth import admin_metadata
from nextserve.proto.codec import MESSAGE_SIZE_OPTIONS

pytestmark = pytest.mark.cluster
RECOVER_WITHIN_S = 120.0
"""Ray restarts the worker, it loads its experts, the controller re-syncs and republishes it (2 CPUs)."""
RESTORE_WITHIN_S = 30.0
"""Stated bound: a SIGKILLed worker is restarted by Ray, reloads its experts and is republished."""
MiB = 1024 * 1024
PROMPTS = [[5] * 12, list(range(40, 70)), [1000, 3, 77, 512, 9]]
CACHE_MEMORY, MAX_NUM_SEQS, MAX_MODEL_LEN, MAX_TOKENS = "2MiB", 8, 1024, 200
PREEMPTION_PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "The quick brown fox", "class Tree:"]
"""The head's cache budget and limits; MAX_TOKENS: each preemption-test stream's length."""


@pytest.fixture(scope="module")
def up(tiny_hf: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    """`--model tiny` (made in the empty cache on first use); a request with no live replica for an
    expert waits 0.5 s for one before its 503; the cache holds 3 sequences, 544 tokens (`capacity`).
    transformers' references of the preemption streams (and of the outsider test's two prompts, their
    prefixes) are computed while it comes up."""
    prefetch_greedy(tiny_hf, [tiny_hf[1](prompt)["input_ids"] for prompt in PREEMPTION_PROMPTS], MAX_TOKENS)
    proc = UpProcess(Path("tiny"), tmp_path_factory.mktemp("two-workers"), 2,
                     ["--unavailable-wait-s", "0.5", "--cache-memory", CACHE_MEMORY, "--block-size", "16",
                      "--max-num-seqs", str(MAX_NUM_SEQS), "--max-model-len", str(MAX_MODEL_LEN)])
    yield proc
    if proc.proc.poll() is None:  # test_sigint_leaves_nothing interrupts it itself
        proc.interrupt()


@pytest.fixture(scope="module")
def capacity(tiny_dir: Path) -> CacheCapacity:
    """What the head makes of the budget: 3 state slots, 34 blocks (544 tokens) and 1 prefix-cache snapshot
    on the tiny model, whose MTP layer a head without MTP drafts neither loads nor budgets a K/V pool for."""
    config = dataclasses.replace(Qwen3NextConfig.from_json(tiny_dir), num_nextn_predict_layers=0)
    sizes = model_sizes(config, torch.float32)
    return cache_capacity(sizes, CacheConfig(parse_memory_size(CACHE_MEMORY)), MAX_NUM_SEQS, MAX_MODEL_LEN)


def _greedy(up: UpProcess) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        r = httpx.post(f"{up.base_url}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    return texts


def test_up_tiny_default_serves_and_status_lists_the_workers(up: UpProcess) -> None:
    status = up.status_cli()  # the command itself
    assert len(status["workers"]) == 2 and all(w["pid"] > 0 and w["alive"] for w in status["workers"])
    assert (up.cache / f"tiny-{TINY_VERSION}" / "config.json").exists()  # the tiny default was made on first use
    r = httpx.post(f"{up.base_url}/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def _metrics(up: UpProcess) -> dict[str, float]:
    text = httpx.get(f"{up.base_url}/metrics", timeout=30).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_streams_beyond_the_cache_finish_exactly_with_preemptions(up: UpProcess, tiny_hf: tuple,
                                                                  capacity: CacheCapacity) -> None:
    tok = tiny_hf[1]
    # One more stream than the cache has slots (one waits), half of them streamed: the running ones
    # outgrow the blocks, so the head preempts (asserted below on its counter).
    prompts = PREEMPTION_PROMPTS
    max_tokens = MAX_TOKENS
    assert len(prompts) > capacity.num_slots
    assert capacity.num_slots * max_tokens > capacity.max_tokens  # the running sequences outgrow the blocks
    client = openai.AsyncOpenAI(base_url=f"{up.base_url}/v1", api_key="unused", max_retries=0)

    async def one(i: int, prompt: str) -> str:
        kwargs = dict(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                      extra_body={"ignore_eos": True})
        if i % 2:
            r = await client.completions.create(**kwargs)
            assert r.usage.completion_tokens == max_tokens
            return r.choices[0].text
        return "".join([c.choices[0].text async for c in await client.completions.create(**kwargs, stream=True)])

    async def all_of() -> list[str]:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    before = _metrics(up).get("nextserve_num_preemptions_total", 0.0)
    texts = asyncio.run(all_of())
    for prompt, text in zip(prompts, texts):
        out = hf_greedy_tokens(tiny_hf, tok(prompt)["input_ids"], max_tokens)
        assert text == tok.decode(out, skip_special_tokens=True), prompt
    # The load reaches /metrics and status with the head's heartbeat (every second): wait for one after the end.
    wait_for(lambda: up.status()["heads"][0]["num_running"] == 0, 30, "a heartbeat after the streams")
    metrics = _metrics(up)
    assert metrics["nextserve_num_preemptions_total"] - before > 0
    assert metrics["nextserve_cache_blocks_total"] == capacity.num_blocks
    assert metrics["nextserve_cache_slots_total"] == capacity.num_slots
    assert metrics["nextserve_cache_blocks_used"] == 0  # every sequence gave its blocks back
    (head,) = up.status()["heads"]
    assert head["num_preemptions"] >= 1 and head["blocks_total"] == capacity.num_blocks and head["slots_used"] == 0
    line = f"blocks 0/{capacity.num_blocks}  slots 0/{capacity.num_slots}  preemptions {head['num_preemptions']}"
    assert line in up.cli("status").stdout


def test_a_request_the_whole_cache_cannot_hold_is_a_400_naming_the_limit(up: UpProcess,
                                                                        capacity: CacheCapacity) -> None:
    assert capacity.max_tokens < MAX_MODEL_LEN - 10
    r = httpx.post(f"{up.base_url}/v1/completions", timeout=30,
                   json={"model": "tiny", "prompt": "def f():", "max_tokens": capacity.max_tokens})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "max_tokens" and "--cache-memory" in error["message"], error
    ok = httpx.post(f"{up.base_url}/v1/completions", timeout=30, json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200 and json.loads(ok.text)["usage"]["completion_tokens"] <= 2


def _outsider_calls() -> dict[str, object]:
    dispatch = expert_pb2.DispatchRequest(layer=0, epoch=10**6, dtype=expert_pb2.DTYPE_FLOAT32, num_tokens=1,
                                          hidden_size=64, hidden=bytes(256))
    echo = expert_pb2.EchoRequest(reply_bytes=200 * MiB)
    body = expert_pb2.DispatchRequest(layer=0, num_tokens=1, hidden_size=64, hidden=bytes(64 * MiB))
    return {"Dispatch": dispatch, "DispatchStream": [dispatch], "Info": expert_pb2.InfoRequest(), "Echo": echo,
            "EchoStream": [echo], "Dispatch 64 MiB": body}


def _call(stub: expert_pb2_grpc.ExpertServiceStub, name: str, request: object, metadata: tuple = ()) -> object:
    method = getattr(stub, name.split()[0])
    if isinstance(request, list):
        return list(method(iter(request), timeout=60, metadata=metadata))
    return method(request, timeout=60, metadata=metadata)


def test_an_outsider_is_refused_everywhere_and_the_cluster_serves_as_transformers(up: UpProcess,
                                                                                   tiny_hf: Any) -> None:
    """The perimeter of a local `up`, from outside without the token (see the module doc)."""
    state_file = up.cache / "cluster-default.json"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    state = up.state()
    redis_url = urlsplit(state["redis_url"])
    assert redis_url.password and len(redis_url.password) >= 32
    status_text = up.cli("status")
    assert status_text.returncode == 0, status_text.stderr
    for shown in (status_text.stdout, status_text.stderr, up.cli("status", "--json").stdout, "".join(up.lines)):
        assert redis_url.password not in shown and state["admin_token"] not in shown

    with socket.create_connection((redis_url.hostname, redis_url.port), timeout=10) as raw:
        raw.sendall(b"PING\r\n")
        assert raw.recv(256).startswith(b"-NOAUTH")

    workers = up.status()["workers"]
    assert len(workers) == 2
    for worker in workers:
        host, _, port = worker["address"].rpartition(":")
        assert host == "127.0.0.1", worker["address"]  # a local cluster's workers listen on loopback only
        with grpc.insecure_channel(worker["address"], options=MESSAGE_SIZE_OPTIONS) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            before = _call(stub, "Info", expert_pb2.InfoRequest(), admin_metadata(state["admin_token"]))
            for name, request in _outsider_calls().items():
                with pytest.raises(grpc.RpcError) as err:
                    _call(stub, name, request)
                allowed = {grpc.StatusCode.UNAUTHENTICATED} | (
                    {grpc.StatusCode.RESOURCE_EXHAUSTED} if "MiB" in name else set())
                assert err.value.code() in allowed, (worker["address"], name, err.value.code())
            after = _call(stub, "Info", expert_pb2.InfoRequest(), admin_metadata(state["admin_token"]))
            assert 10**6 not in after.inflight_by_epoch and after.epoch == before.epoch  # nothing counted
        with socket.socket() as s:  # not on the host's other addresses (0.0.0.0 would take this)
            s.settimeout(5)
            other = socket.gethostbyname(socket.gethostname())
            if not other.startswith("127."):
                assert s.connect_ex((other, int(port))) != 0

    tok = tiny_hf[1]
    for prompt in ("def fibonacci(n):", "The quick brown fox"):
        r = httpx.post(f"{up.base_url}/v1/completions", timeout=120,
                       json={"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        want = hf_greedy_tokens(tiny_hf, tok(prompt)["input_ids"], 12)
        assert r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)


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
    """Last: Ctrl-C stops every process `up` started (its redis-server, Ray's GCS, raylet and worker processes:
    the heads and the expert workers among them) and removes its state. Its own processes, not every Ray on
    the host: another test worker may run a cluster beside this one."""
    status = up.status()
    pids = [w["pid"] for w in status["workers"]] + [h["pid"] for h in status["heads"]]
    tree = psutil.Process(up.proc.pid).children(recursive=True)
    names = {process.name() for process in tree}
    assert {"redis-server", "raylet", "gcs_server"} <= names and set(pids) <= {p.pid for p in tree}, names
    code = up.interrupt()
    assert code == 0, "".join(up.lines[-30:])
    assert pids_alive(pids) == []
    leftovers = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert leftovers == [], leftovers
    assert not (up.cache / "cluster-default.json").exists()
