"""The engine's exact prefix cache against transformers' generate: a request that shares a prefix with an
earlier one restores it (cached_tokens > 0) and still produces transformers' greedy tokens, wherever the
two diverge (inside a block, on a block boundary, on a snapshot boundary, in the generated part); under
a budget that forces eviction and preemption of shared blocks; switched off; 200 random requests keep
the books; and an 8-turn conversation prefills about its new tokens per turn, not its history."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import pytest

from engine_run import EngineFactory, Model, random_prompt
from hf_reference import hf_greedy
from nextserve.cluster.engine.contract import StepOutput
from nextserve.cluster.engine.engine import Engine
from nextserve.cluster.engine.scheduler import StepPlan
from nextserve.model.cache.budget import CacheConfig
from nextserve.model.sampling import SamplingParams

BS = 16


def _one(engine: Engine, prompt: list[int], n: int) -> StepOutput:
    return engine.generate_sync([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0]


def _check_books(engine: Engine) -> None:
    """Nothing running: no block or slot held, every block free or cached, snapshots within the pool."""
    blocks, stats = engine.scheduler.blocks, engine.stats()
    assert stats.blocks_used == stats.slots_used == 0
    assert blocks.num_free_blocks + stats.blocks_cached == stats.blocks_total
    assert stats.snapshots_used <= stats.snapshots_total and blocks.cache.num_held_snapshots == 0


@pytest.mark.parametrize("every,shared,hit", [
    (16, 40, 32),  # diverging inside block 2: blocks 0-1 and the snapshot after them
    (16, 48, 48),  # exactly on a block boundary that has a snapshot
    (32, 48, 32),  # on a block boundary between snapshots: back to the snapshot at 32
    (32, 64, 64),  # exactly on a snapshot boundary
    (32, 20, 0),   # inside the first snapshot interval: nothing to restore
])
def test_shared_prefix_then_different_suffixes(every: int, shared: int, hit: int, reference: dict, small: Model,
                                               make_engine: EngineFactory) -> None:
    hf_model = reference["small"][0]
    engine = make_engine.cached(small, 2, 40, BS, 8, snapshot_every=every)
    prefix = random_prompt(shared, 320, seed=1)
    first, second = prefix + random_prompt(30, 320, seed=2), prefix + random_prompt(30, 320, seed=3)
    out1 = _one(engine, first, 6)
    out2 = _one(engine, second, 6)
    assert out1.cached_tokens == 0 and out2.cached_tokens == hit and out2.prompt_tokens == shared + 30
    assert out1.token_ids == hf_greedy(hf_model, first, 6)
    assert out2.token_ids == hf_greedy(hf_model, second, 6)
    assert engine.stats().prefix_cache_hit_tokens == hit
    _check_books(engine)


def test_the_next_turn_hits_past_the_previous_prompt(reference: dict, small: Model, make_engine: EngineFactory) -> None:
    """Turn 2 = turn-1 prompt + turn-1 output + new text: the hit reaches the last block boundary turn 1
    computed (its tail snapshot, published at finish), inside turn 1's output."""
    hf_model = reference["small"][0]
    engine = make_engine.cached(small, 2, 40, BS, 8, snapshot_every=64)
    prompt = random_prompt(30, 320, seed=4)
    out1 = _one(engine, prompt, 30)
    turn2 = prompt + out1.token_ids + random_prompt(10, 320, seed=5)
    out2 = _one(engine, turn2, 8)
    computed = 30 + 30 - 1  # the last sampled token of turn 1 never ran through the model
    assert out2.cached_tokens == computed // BS * BS == 48 > len(prompt)
    assert out1.token_ids == hf_greedy(hf_model, prompt, 30)
    assert out2.token_ids == hf_greedy(hf_model, turn2, 8)
    _check_books(engine)


def test_switched_off_nothing_is_cached(reference: dict, small: Model, make_engine: EngineFactory) -> None:
    engine = make_engine.cached(small, 2, 40, BS, 8, enable_prefix_cache=False)
    prompt = random_prompt(50, 320, seed=6)
    outs = [_one(engine, prompt, 4) for _ in range(2)]
    assert [o.cached_tokens for o in outs] == [0, 0] and outs[0].token_ids == outs[1].token_ids
    assert engine.stats().blocks_cached == 0 and engine.stats().prefix_cache_hit_tokens == 0
    assert outs[1].token_ids == hf_greedy(reference["small"][0], prompt, 4)


def _spy(engine: Engine) -> tuple[list[str], dict[str, int]]:
    """Request ids preempted, and prompt (prefill) tokens run per request, as the scheduler plans them."""
    preempted: list[str] = []
    prefilled: dict[str, int] = defaultdict(int)
    schedule = engine.scheduler.schedule

    def spy() -> StepPlan:
        plan = schedule()
        preempted.extend(seq.request_id for seq in plan.preempted)
        for item in plan.scheduled:
            if item.seq.is_prefilling:
                prefilled[item.seq.request_id] += item.num_scheduled_tokens
        return plan

    engine.scheduler.schedule = spy  # type: ignore[method-assign]
    return preempted, prefilled


def test_eviction_and_preemption_of_shared_blocks(reference: dict, small: Model, make_engine: EngineFactory) -> None:
    """Eight requests over three 32-token prefixes in 14 blocks (224 tokens) and 4 snapshots, 4 at once:
    cached blocks are evicted before anyone is preempted, sequences holding shared blocks are preempted
    and recompute (from the cache where it survived); every stream is transformers' greedy one."""
    hf_model = reference["small"][0]
    engine = make_engine.cached(small, 4, 14, BS, 4, max_tokens_per_step=48, prefill_chunk=16)
    preempted, _ = _spy(engine)
    shared_when_preempted: list[bool] = []
    preempt, cache = engine.scheduler._preempt, engine.scheduler.blocks.cache

    def spy_preempt(seq: Any) -> None:  # does another sequence reference one of its blocks?
        shared_when_preempted.append(any(cache._ref[b] > 1 for b in seq.block_ids))
        preempt(seq)

    engine.scheduler._preempt = spy_preempt  # type: ignore[method-assign]
    prefixes = [random_prompt(32, 320, seed=10 + i) for i in range(3)]
    prompts = [prefixes[i % 3] + random_prompt(5 + 3 * i, 320, seed=20 + i) for i in range(8)]
    _one(engine, prefixes[0] + [5], 2)  # a cached prefix before the crowd arrives
    outs = engine.generate_sync(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf_model, prompt, 24)
    assert any(shared_when_preempted) and len(preempted) == len(shared_when_preempted)
    assert any(o.cached_tokens > 0 for o in outs)
    _check_books(engine)


def test_random_requests_keep_the_books(small: Model, make_engine: EngineFactory) -> None:
    """200 requests drawn from 6 shared prefixes plus random suffixes, 5 at a time through 30 blocks and
    4 snapshots: all finish, the tokens equal an engine without the prefix cache (itself equal to
    transformers above and in test_cache_budget), the pools never grow, and nothing leaks."""
    rng = random.Random(7)
    prefixes = [random_prompt(rng.randint(8, 70), 320, seed=100 + i) for i in range(6)]
    prompts = [rng.choice(prefixes)[:rng.randint(5, 70)] + random_prompt(rng.randint(1, 20), 320, seed=200 + i)
               for i in range(200)]
    params = [SamplingParams(max_tokens=rng.randint(1, 10), ignore_eos=True) for _ in prompts]
    cached = make_engine.cached(small, 5, 30, BS, 4, snapshot_every=32, max_tokens_per_step=64, prefill_chunk=32)
    plain = make_engine.cached(small, 5, 30, BS, 4, enable_prefix_cache=False, max_tokens_per_step=64, prefill_chunk=32)
    outs = cached.generate_sync(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain.generate_sync(prompts, params)]
    assert all(len(o.token_ids) == p.max_tokens for o, p in zip(outs, params))
    stats = cached.stats()
    assert stats.prefix_cache_hit_tokens > 0 and sum(o.cached_tokens for o in outs) > 0
    assert (stats.blocks_total, stats.slots_total, stats.snapshots_total) == (30, 5, 4)
    _check_books(cached)


def test_prefill_work_stays_flat_over_a_conversation(reference: dict, small: Model, make_engine: EngineFactory) -> None:
    """8 turns, each the whole conversation so far plus ~20 new tokens: from turn 2 on, the tokens
    actually prefilled stay within the new ones plus one block, while the history grows to ~250."""
    hf_model = reference["small"][0]
    engine = make_engine.cached(small, 2, 40, BS, 8, snapshot_every=64)
    _, prefilled = _spy(engine)
    history: list[int] = []
    for turn in range(8):
        new = random_prompt(18 + turn % 5, 320, seed=300 + turn)
        prompt = history + new
        out = engine.generate_sync([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
        (work,) = prefilled.values()  # this turn's request alone
        prefilled.clear()
        assert work == len(prompt) - out.cached_tokens  # no preemption: what was not cached was run
        if turn:
            assert work <= len(new) + BS, (turn, work, len(prompt))
        history = prompt + out.token_ids
    assert len(history) > 200
    assert out.token_ids == hf_greedy(hf_model, prompt, 8)
    _check_books(engine)
