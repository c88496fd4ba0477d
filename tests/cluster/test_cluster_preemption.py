"""A head whose cache budget is far below the offered load (`nextserve up --cache-memory`): concurrent
streams through the openai client all finish with transformers' greedy text while the head preempts and
recomputes sequences; /metrics and `nextserve status` show the cache and the preemptions; a request
that could never fit in the cache is a 400 naming the limit."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from cluster_harness import UpProcess, wait_for
from nextserve.model.cache.budget import CacheCapacity, CacheConfig, cache_capacity, parse_memory_size
from nextserve.model.config import Qwen3NextConfig
from nextserve.model.sizes import model_sizes

pytestmark = pytest.mark.cluster

CACHE_MEMORY, MAX_NUM_SEQS, MAX_MODEL_LEN, MAX_TOKENS = "2MiB", 8, 1024, 200


@pytest.fixture(scope="module")
def capacity(tiny_dir: Path) -> CacheCapacity:
    """What the head makes of the budget: 3 state slots, 34 blocks (544 tokens) and 1 prefix-cache snapshot
    on the tiny model."""
    sizes = model_sizes(Qwen3NextConfig.from_json(tiny_dir), torch.float32)
    return cache_capacity(sizes, CacheConfig(parse_memory_size(CACHE_MEMORY)), MAX_NUM_SEQS, MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def up(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    proc = UpProcess(tiny_dir, tmp_path_factory.mktemp("nscache"), 1,
                     ["--cache-memory", CACHE_MEMORY, "--block-size", "16", "--max-num-seqs", str(MAX_NUM_SEQS),
                      "--max-model-len", str(MAX_MODEL_LEN)])
    yield proc
    proc.interrupt()


def _metrics(up: UpProcess) -> dict[str, float]:
    text = httpx.get(f"{up.base_url}/metrics", timeout=30).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_streams_beyond_the_cache_finish_exactly_with_preemptions(up: UpProcess, tiny_hf: tuple,
                                                                  capacity: CacheCapacity) -> None:
    model, tok = tiny_hf  # runs to max_new_tokens, as ignore_eos does
    prompts = ["def fibonacci(n):", "import os\nimport sys\n", "The quick brown fox", "class Tree:",
               "for i in range(10):", "Hello there", "# a comment about parsing", "return x + y"]
    max_tokens = MAX_TOKENS
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
        ids = tok(prompt)["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)[0, len(ids):]
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
