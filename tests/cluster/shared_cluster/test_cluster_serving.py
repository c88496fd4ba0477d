"""The product as a user meets it: `nextserve up` (real Ray, real redis-server, real gRPC expert
workers) answering the official `openai` client, checked against transformers' own `generate`. On the
shared cluster (3 workers, at most 176 experts each: shared_cluster/conftest.py); the tests that kill its
controller, restart its Redis and, last, scale it to 4 workers in waves run after the folder's others."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cluster_harness import UpProcess, hf_greedy_text, run_streams, seeded_prompts, stream_completion, wait_for
from nextserve.cluster.control.redis_server import LocalRedis
from shared_cluster.conftest import MAX_EXPERTS_PER_WORKER, SHARED_WORKERS

pytestmark = pytest.mark.cluster


@pytest.fixture
def up(shared_cluster: UpProcess) -> UpProcess:
    """The shared cluster (shared_cluster/conftest.py), by the name these tests had for their own."""
    return shared_cluster


def _hf_text(served_hf: tuple, prompt_ids: list[int], max_tokens: int, ignore_eos: bool = False) -> str:
    """transformers' greedy text; without ignore_eos it ends at the first EOS, as the server's does."""
    model, tok = served_hf
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False)[0, len(prompt_ids):]
    ids = out.tolist()
    if not ignore_eos and model.config.eos_token_id in ids:
        ids = ids[:ids.index(model.config.eos_token_id) + 1]
    return tok.decode(ids, skip_special_tokens=True)


def _metrics(up: UpProcess) -> dict[str, float]:
    text = httpx.get(f"{up.base_url}/metrics", timeout=30).text
    return {f"{s.name}{json.dumps(s.labels, sort_keys=True) if s.labels else ''}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_status_lists_workers_with_pids(up: UpProcess) -> None:
    status = up.status_cli()  # the command itself
    assert status["epoch"] >= 1 and len(status["workers"]) == SHARED_WORKERS
    assert all(w["alive"] and w["pid"] > 0 and ":" in w["address"] for w in status["workers"])
    assert sum(w["num_experts"] for w in status["workers"]) == 8 * 64  # every (layer, expert) once (R = 1)
    assert len(status["heads"]) == 1 and status["heads"][0]["alive"]


def test_eight_concurrent_greedy_requests_equal_transformers(up: UpProcess, served_hf: tuple) -> None:
    _, tok = served_hf
    client = openai.AsyncOpenAI(base_url=f"{up.base_url}/v1", api_key="unused", max_retries=0)
    prompts = ["def fibonacci(n):", "import os\nimport sys\n", "The quick brown fox", "class Tree:",
               "for i in range(10):", "Hello", "# a comment about parsing", "return x + y"]

    async def one(i: int, prompt: str) -> tuple[str, list[int], int]:
        n, chat, stream = 10 + 2 * i, i % 2 == 1, i % 4 >= 2
        if chat:
            messages = [{"role": "user", "content": prompt}]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            if stream:
                parts = [c.choices[0].delta.content or "" async for c in await client.chat.completions.create(
                    model="tiny", messages=messages, max_tokens=n, temperature=0, stream=True)]
                return "".join(parts), ids, n
            r = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=n, temperature=0)
            return r.choices[0].message.content, ids, n
        ids = tok(prompt)["input_ids"]
        if stream:
            parts = [c.choices[0].text async for c in await client.completions.create(
                model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True)]
            return "".join(parts), ids, n
        r = await client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0)
        return r.choices[0].text, ids, n

    async def all_of() -> list[tuple[str, list[int], int]]:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    for got, ids, n in asyncio.run(all_of()):
        assert got == _hf_text(served_hf, ids, n)


def test_streaming_is_incremental(up: UpProcess) -> None:
    body = {"model": "tiny", "prompt": "def f():", "max_tokens": 48, "stream": True, "ignore_eos": True}
    arrivals = []
    with httpx.stream("POST", f"{up.base_url}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) >= 8  # tokens come in several events, not one
    assert arrivals[-1] - arrivals[0] > 0.1  # the first event came well before the last


def test_concurrent_streams_share_the_heads_output_channel(up: UpProcess, served_hf: tuple) -> None:
    """Once the gateway holds an output channel to the head (a request there opens it; Serve routes the
    channel to the replica it names), concurrent streams get their outputs on it, several in one message,
    each stream exactly transformers' greedy text. (The cancellation test below then runs on it.)"""
    prompts = seeded_prompts(8)

    def head() -> dict:
        return up.status()["heads"][0]

    stream_completion(up.base_url, prompts[0], 2)
    wait_for(lambda: head().get("output_channels", 0) == 1, 60, "the gateway's output channel to the head")
    before = head()
    stream_completion(up.base_url, prompts[1], 2)  # on the channel: it stays open (idle for 10 s, it ends)
    got = run_streams(up, prompts, 24, lambda: None)
    done_at = time.time()
    wait_for(lambda: head()["heartbeat"] > done_at, 30, "a heartbeat after the streams")
    after = head()
    assert got == [hf_greedy_text(served_hf, p, 24) for p in prompts]
    outputs = after["channel_outputs"] - before["channel_outputs"]
    messages = after["channel_messages"] - before["channel_messages"]
    assert outputs >= 8 + 1 and messages < outputs, (outputs, messages)


def test_cancelled_stream_frees_its_sequence(up: UpProcess) -> None:
    body = {"model": "tiny", "prompt": "def f():", "max_tokens": 3000, "stream": True, "ignore_eos": True}
    events: list[str] = []
    stop = threading.Event()

    def read() -> None:
        with httpx.stream("POST", f"{up.base_url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                events.append(line)
                if stop.is_set():
                    break  # leaving the block closes the connection: the client cancels

    reader = threading.Thread(target=read)
    reader.start()
    wait_for(lambda: _metrics(up).get("nextserve_num_requests_running", 0) >= 1, 20, "the stream to be running")
    stop.set()
    reader.join(30)
    assert not any('"finish_reason": "length"' in e for e in events)  # it was cut short, not finished
    wait_for(lambda: _metrics(up).get("nextserve_num_requests_running", 1) == 0, 15, "the sequence to be freed")


def test_seeded_sampling_is_reproducible(up: UpProcess) -> None:
    client = openai.OpenAI(base_url=f"{up.base_url}/v1", api_key="unused", max_retries=0)
    kwargs = dict(model="tiny", prompt="import", max_tokens=16, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=11, **kwargs).choices[0].text
    b = client.completions.create(seed=11, **kwargs).choices[0].text
    c = client.completions.create(seed=12, **kwargs).choices[0].text
    assert a == b and a != c


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tiny", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny", "prompt": [5] * 70_000, "max_tokens": 4}, 400, "prompt"),  # past the 64K context
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(up: UpProcess, body: dict, status: int, param: str) -> None:
    r = httpx.post(f"{up.base_url}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    good = httpx.post(f"{up.base_url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=30)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 2


def test_malformed_json_is_400(up: UpProcess) -> None:
    r = httpx.post(f"{up.base_url}/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_metrics_count_the_requests(up: UpProcess) -> None:
    before = _metrics(up)
    key = 'nextserve_requests_total{"endpoint": "/v1/completions", "status": "200"}'
    for _ in range(3):
        httpx.post(f"{up.base_url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=30)
    after = _metrics(up)
    assert after[key] - before.get(key, 0) == 3
    assert after["nextserve_generation_tokens_total"] - before.get("nextserve_generation_tokens_total", 0) >= 6
    assert any(k.startswith("nextserve_dispatch_latency_seconds_count") for k in after)


DASHBOARD = Path(__file__).resolve().parents[3] / "k8s" / "base" / "grafana-dashboard.yaml"
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def dashboard_metric_names() -> set[str]:
    """Every metric name the shipped dashboard's panel queries name (the ConfigMap's JSON)."""
    config_map = yaml.safe_load(DASHBOARD.read_text())
    dashboard = json.loads(config_map["data"]["nextserve.json"])
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return {m for expr in exprs for m in re.findall(r"\bnextserve_[a-z0-9_]+", expr)}


def test_every_metric_the_dashboard_names_is_served(up: UpProcess) -> None:
    """The running cluster's /metrics has a sample of each name a panel queries (a counter's `_total`, a
    histogram's `_bucket`), or, for a labelled series that has no sample before its first event (the last
    scaling decision: this cluster does not autoscale), its family declared with # TYPE."""
    httpx.post(f"{up.base_url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=30)
    names = dashboard_metric_names()
    assert len(names) >= 20 and "nextserve_expert_worker_busy_fraction" in names

    def missing() -> set[str]:
        text = httpx.get(f"{up.base_url}/metrics", timeout=30).text
        samples = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
        declared = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
        declared |= {d + suffix for d in declared for suffix in HISTOGRAM_SUFFIXES}
        return {n for n in names if n not in samples and not (n.endswith("_timestamp_seconds") and n in declared)}
    wait_for(lambda: not missing(), 30, "the workers' busy fractions to be published")  # the controller's 2 s window
    assert not missing()


def _complete(up: UpProcess) -> str:
    r = httpx.post(f"{up.base_url}/v1/completions", json={"model": "tiny", "prompt": "def", "max_tokens": 4, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.changes_shared_cluster
def test_killing_the_controller_does_not_stop_serving(up: UpProcess) -> None:
    want = _complete(up)
    killed = up.python_in_cluster("ray.kill(ray.get_actor('nextserve-controller-default'), no_restart=False)")
    assert killed.returncode == 0, killed.stderr
    assert _complete(up) == want
    probe = "import json\nprint(json.dumps(ray.get(ray.get_actor('nextserve-controller-default').status.remote())))"
    result = up.python_in_cluster(probe)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout.strip().splitlines()[-1])
    assert status["spec"]["expert_workers"] == SHARED_WORKERS  # the restarted controller recovered it from Redis


@pytest.mark.changes_shared_cluster
def test_restarting_redis_does_not_stop_serving(up: UpProcess) -> None:
    want = _complete(up)
    url = urlsplit(up.state()["redis_url"])  # with the password `up` generated
    subprocess.run(["pkill", "-9", "-f", f"redis-server 127.0.0.1:{url.port}"], check=True)
    with ThreadPoolExecutor(1) as pool:  # a new one on the same port and password, while a request is served
        restarted = pool.submit(LocalRedis, url.port, "127.0.0.1", url.password)
        try:
            assert _complete(up) == want
        finally:
            up.owned.append(restarted.result())  # answering PING: stopped with the cluster
    wait_for(lambda: len(up.status()["workers"]) == SHARED_WORKERS and up.status()["epoch"] >= 1, 30,
             "workers and placement to be written back to the new Redis")
    assert up.status()["spec"]["expert_workers"] == SHARED_WORKERS
    assert _complete(up) == want


def _first_token_s(client: openai.OpenAI, prompt: list[int], max_tokens: int) -> tuple[float, str, int]:
    """A streamed greedy completion: (seconds to its first token, its text, usage's cached_tokens)."""
    start, first, text, cached = time.monotonic(), None, [], -1
    for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.monotonic() - start
        text += [c.text for c in chunk.choices]
        if chunk.usage is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    assert first is not None
    return first, "".join(text), cached


def test_a_shared_prefix_is_served_from_the_cache(up: UpProcess, served_hf: tuple) -> None:
    """Requests sharing a 2,600-token prefix with different suffixes: the later ones report the prefix as
    cached_tokens (OpenAI and Anthropic), stream their first token sooner than a cold request of the same
    length, and produce transformers' greedy tokens all the same."""
    model, tok = served_hf
    g = torch.Generator().manual_seed(21)
    prefix = torch.randint(3, len(tok) - 64, (2600,), generator=g).tolist()  # ids below the tokenizer's
    client = openai.OpenAI(base_url=f"{up.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    first = prefix + [100, 101, 102]
    cold_s, _, cold_cached = _first_token_s(client, first, 4)
    assert cold_cached == 0
    hits, colds = [], []
    for i in range(3):
        suffix = [200 + i, 300 + i, 400 + i, 500 + i]
        hit_s, text, cached = _first_token_s(client, prefix + suffix, 8)
        assert cached >= 0.9 * len(prefix), cached  # to its last snapshot: every 256 tokens (2,560)
        assert text == _hf_text(served_hf, prefix + suffix, 8, ignore_eos=True).rstrip("\ufffd")  # a cut UTF-8 tail is held back
        other = torch.randint(3, len(tok) - 64, (2604,), generator=g).tolist()  # same length, nothing shared
        miss_s, _, miss_cached = _first_token_s(client, other, 1)
        assert miss_cached == 0
        hits.append(hit_s)
        colds.append(miss_s)
    print(f"TTFT, 2,604-token prompts: cold {sorted(colds)} s, sharing 2,600 tokens {sorted(hits)} s")
    assert sorted(hits)[1] < sorted(colds)[1]  # medians of three: the hit skips the prefix's prefill
    reply = httpx.post(f"{up.base_url}/v1/messages", timeout=300, json={
        "model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": tok.decode(prefix[:600])}]})
    again = httpx.post(f"{up.base_url}/v1/messages", timeout=300, json={
        "model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": tok.decode(prefix[:600]) + " x"}]})
    usage, before = again.json()["usage"], reply.json()["usage"]
    assert before["cache_read_input_tokens"] == 0 and usage["cache_read_input_tokens"] > 0
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] > before["input_tokens"]


@pytest.mark.changes_shared_cluster
def test_scaling_moves_in_waves_within_max_experts_per_worker(up: UpProcess, served_hf: tuple) -> None:
    """Last (the folder's conftest orders it so): it leaves 4 workers. 3 -> 4 workers (R = 1): 171 pairs
    each today, 128 after, up to 256 on a worker in one step; with at most 176 allowed it goes in waves,
    under streams that stay exact, and no worker ever held more (each reports the most it held at once). A scale to 2 workers (256 each) cannot
    fit: one line, exit 2."""
    bound = MAX_EXPERTS_PER_WORKER
    prompts = seeded_prompts(4)
    epoch_before = up.status()["epoch"]

    def scale() -> None:
        result = up.cli("scale", "--expert-workers", "4", "--wait-s", "300")
        assert result.returncode == 0, result.stderr

    got = run_streams(up, prompts, 120, scale)
    assert got == [hf_greedy_text(served_hf, p, 120) for p in prompts]
    status = up.status()
    assert status["epoch"] >= epoch_before + 2  # more than one step
    wait_for(lambda: all("peak_experts" in w for w in up.status()["workers"]), 10, "a heartbeat")
    peaks = [w["peak_experts"] for w in up.status()["workers"]]
    assert len(peaks) == 4 and max(peaks) <= bound, peaks
    refused = up.cli("scale", "--expert-workers", "2")
    assert refused.returncode == 2 and "max_experts_per_worker=176" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert len(up.status()["workers"]) == 4
