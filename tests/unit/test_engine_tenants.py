"""Tenants in the engine (small model, CPU): the prefix cache is salted by tenant and cache_salt, and a
tenant's short request finishes while another tenant's flood is still running."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from engine_run import random_prompt
from nextserve.cluster.engine.contract import EngineRequest, StepOutput
from nextserve.cluster.engine.engine import Engine
from nextserve.cluster.engine.scheduler import SchedulerConfig
from nextserve.model.cache.budget import CacheConfig
from nextserve.model.sampling import SamplingParams
from nextserve.model.sizes import model_sizes

Model = tuple[Any, Any]
BS = 16


@pytest.fixture
def engine(small: Model) -> Iterator[Engine]:
    """4 slots, 200 blocks, 16 snapshots, one every block."""
    sizes = model_sizes(small[0].config, torch.float32)
    state = sizes.deltanet_state_bytes_per_sequence
    budget = (4 + 16) * state + 200 * BS * sizes.kv_bytes_per_token
    cache = CacheConfig(budget, BS, enable_prefix_cache=True, prefix_snapshot_every=BS,
                        prefix_snapshot_memory_fraction=(16 * state + state // 2) / budget)
    e = Engine(small[0], small[1], None, SchedulerConfig(max_num_seqs=4), cache_config=cache)
    yield e
    e.shutdown()


async def _run(engine: Engine, request: EngineRequest) -> StepOutput:
    return functools.reduce(StepOutput.merge, [out async for out in engine.generate(request)])


def _request(request_id: str, prompt: list[int], max_tokens: int, tenant: str = "", salt: str = "") -> EngineRequest:
    return EngineRequest(request_id, tuple(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                         tenant=tenant, cache_salt=salt)


def test_prefix_cache_is_salted_by_tenant_and_cache_salt(engine: Engine) -> None:
    prompt = random_prompt(70, 320, seed=11)

    async def turns() -> list[int]:
        cached = []
        for i, (tenant, salt) in enumerate([("A", ""), ("B", ""), ("A", ""), ("A", "x"), ("A", "x"), ("", "")]):
            cached.append((await _run(engine, _request(f"r{i}", prompt, 2, tenant, salt))).cached_tokens)
        return cached

    # A's first is cold; B's identical prompt misses; A's repeat hits; A with a salt misses, then hits
    # its own; no tenant at all (a server without keys) misses every tenant's blocks
    assert asyncio.run(turns()) == [0, 0, 64, 0, 64, 0]


def test_b_finishes_while_a_floods(engine: Engine) -> None:
    """A keeps 24 requests of 48 tokens in flight on 4 slots; B's 4-token request, sent after them,
    finishes while most of A's flood has not."""
    async def flood() -> tuple[int, int]:
        a = [asyncio.create_task(_run(engine, _request(f"a{i}", random_prompt(20, 320, seed=i), 48, "A")))
             for i in range(24)]
        await asyncio.sleep(0.05)
        b = await _run(engine, _request("b", random_prompt(20, 320, seed=99), 4, "B"))
        unfinished = sum(not t.done() for t in a)
        await asyncio.gather(*a)
        return b.completion_tokens, unfinished

    completion_tokens, a_unfinished = asyncio.run(flood())
    assert completion_tokens == 4
    assert a_unfinished >= 16, a_unfinished  # FCFS would have finished all 24 of A's before B
