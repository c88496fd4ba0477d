"""nextserve on a Ray cluster of separate nodes (ray.cluster_utils.Cluster: one raylet per node, as a
multi-node KubeRay cluster has): a Ray head with no CPUs, two heads nodes and two expert nodes, each with
the custom resource its k8s worker group advertises; `nextserve up` joins it through RAY_ADDRESS with an
external redis-server, R = 2 and 2 head replicas. Heads and workers land on their own nodes; an expert
node removed mid-stream loses no request and changes no token; a heads node removed mid-stream ends the
streams it held with an error event (nothing hangs) while the other head serves every new request; Ctrl-C
removes only its own Serve application."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from cluster_harness import UpProcess, hf_greedy_text, prefetch_greedy, wait_for
from nextserve.cluster.control.redis_server import LocalRedis
from nextserve.cluster.control.registry import Registry
from nextserve.cluster.deployments.expert_worker import EXPERT_RESOURCE, HEAD_RESOURCE

pytestmark = pytest.mark.cluster

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "The quick brown fox", "class Tree:",
           "for i in range(10):", "# a comment about parsing", "return x + y", "Hello there",
           "while True:", "print('done')"]
"""Ten prompts: the heads' router spreads them by prefix over the two head replicas (each gets none with
probability 2 / 2**10), so the head whose node is removed holds some of them."""
MAX_TOKENS = 40
LONG_MAX_TOKENS = 200
"""The streams a heads node is removed under: long enough to be running when it goes."""
STREAM_TIMEOUT_S = 120.0


@dataclass
class Nodes:
    cluster: Cluster
    heads: list = field(default_factory=list)
    experts: list = field(default_factory=list)


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    out = Nodes(cluster)
    out.heads = [cluster.add_node(num_cpus=1, resources={HEAD_RESOURCE: 1}) for _ in range(2)]
    out.experts = [cluster.add_node(num_cpus=1, resources={EXPERT_RESOURCE: 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    yield out
    cluster.shutdown()


@pytest.fixture(scope="module")
def up(nodes: Nodes, tiny_dir: Path, tiny_hf: tuple, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    _, tok = tiny_hf  # the references of every prompt's MAX_TOKENS, computed while the cluster comes up
    prefetch_greedy(tiny_hf, [tok(prompt)["input_ids"] for prompt in PROMPTS], MAX_TOKENS)
    redis = LocalRedis()  # external to `up`: it is given --redis-url and starts none
    proc = UpProcess(tiny_dir, tmp_path_factory.mktemp("nscache"), 2,
                     ["--redis-url", redis.url, "--expert-replicas", "2", "--head-replicas", "2"],
                     ray_address=nodes.cluster.address)
    ray.init(address=nodes.cluster.address, namespace="nextserve", logging_level="ERROR")  # to see placements
    yield proc
    ray.shutdown()
    if proc.proc.poll() is None:
        proc.interrupt()
    redis.stop()


def _expected(tiny_hf: tuple, prompt: str, max_tokens: int) -> str:
    """transformers' greedy text of `prompt`, max_tokens long (EOS not masked, as ignore_eos; a text cut inside
    a UTF-8 sequence ends without its U+FFFD, as the server holds it back)."""
    return hf_greedy_text(tiny_hf, tiny_hf[1](prompt)["input_ids"], max_tokens)


def _gateway_node() -> str:
    (actor,) = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "GatewayDeployment" in a.class_name]
    return actor.node_id


@dataclass
class Stream:
    text: str = ""
    errors: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    started: threading.Event = field(default_factory=threading.Event)


def _stream(base_url: str, prompt: str, max_tokens: int, into: Stream) -> Stream:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=STREAM_TIMEOUT_S) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                into.errors.append(event["error"])
                continue
            into.text += event["choices"][0]["text"]
            into.finish_reason = event["choices"][0]["finish_reason"] or into.finish_reason
            into.started.set()
    into.started.set()
    return into


def _streams_while(up: UpProcess, max_tokens: int, action: Callable[[], None]) -> list[Stream]:
    """Every prompt streamed at once; `action` runs once each stream has its first token."""
    streams = [Stream() for _ in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(_stream, up.base_url, p, max_tokens, s) for p, s in zip(PROMPTS, streams)]
        for s in streams:
            assert s.started.wait(STREAM_TIMEOUT_S)
        action()
        return [f.result(timeout=STREAM_TIMEOUT_S) for f in futures]  # nothing hangs


def test_heads_and_workers_land_on_their_own_nodes(up: UpProcess, nodes: Nodes) -> None:
    status = up.status()
    head_nodes, expert_nodes = {n.node_id for n in nodes.heads}, {n.node_id for n in nodes.experts}
    assert {h["node"] for h in status["heads"] if h["alive"]} == head_nodes  # one replica on each
    assert {w["node"] for w in status["workers"] if w["alive"]} == expert_nodes


def test_an_expert_node_lost_mid_stream_loses_no_request_and_changes_no_token(
        up: UpProcess, nodes: Nodes, tiny_hf: tuple) -> None:
    gateway = _gateway_node()
    victim = next(n for n in nodes.experts if n.node_id != gateway)
    streams = _streams_while(up, MAX_TOKENS, lambda: nodes.cluster.remove_node(victim))
    for prompt, s in zip(PROMPTS, streams):
        assert not s.errors and s.finish_reason == "length", (prompt, s)
        assert s.text.rstrip("\ufffd") == _expected(tiny_hf, prompt, MAX_TOKENS), prompt
    wait_for(lambda: sum(w["alive"] for w in up.status()["workers"]) == 1, 30, "the lost worker marked dead")
    r = httpx.get(f"{up.base_url}/health/ready", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "degraded"  # R = 2: every expert still served


def test_a_heads_node_lost_mid_stream_ends_its_streams_cleanly_and_the_other_head_serves(
        up: UpProcess, nodes: Nodes, tiny_hf: tuple) -> None:
    gateway = _gateway_node()
    victim = next(n for n in nodes.heads if n.node_id != gateway)

    registry = Registry(up.state()["redis_url"], "default")

    def remove_a_busy_heads_node() -> None:
        def victim_busy() -> bool:
            return any(h.fields["node"] == victim.node_id and int(h.fields.get("num_running", 0)) > 0
                       for h in registry.heads())
        wait_for(victim_busy, 30, "the head on the victim node running streams (its heartbeat)")
        nodes.cluster.remove_node(victim)

    streams = _streams_while(up, LONG_MAX_TOKENS, remove_a_busy_heads_node)
    for prompt, s in zip(PROMPTS, streams):
        if s.errors:  # held by the lost head: one error event saying so, then the stream ended
            assert len(s.errors) == 1 and s.finish_reason is None, (prompt, s)
            assert "head replica serving this request was lost" in s.errors[0]["message"]
        else:  # transformers' reference of only the streams that finished: the others held no full text
            assert s.finish_reason == "length", (prompt, s)
            assert s.text.rstrip("\ufffd") == _expected(tiny_hf, prompt, LONG_MAX_TOKENS), prompt
    assert any(s.errors for s in streams)  # the lost head held some of them
    for prompt in PROMPTS:  # new requests: the surviving head, at once
        r = httpx.post(f"{up.base_url}/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                             "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].rstrip("\ufffd") == _expected(tiny_hf, prompt, MAX_TOKENS)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class _OtherApp:
    def __call__(self, request: object) -> str:
        return "other"


def test_ctrl_c_removes_only_its_own_application(up: UpProcess) -> None:
    serve.run(_OtherApp.bind(), name="other", route_prefix="/other")  # someone else's app on the cluster
    assert up.interrupt() == 0, "".join(up.lines[-40:])
    apps = serve.status().applications
    assert "other" in apps and "nextserve" not in apps
    serve.delete("other")
