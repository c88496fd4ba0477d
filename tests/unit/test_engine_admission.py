"""Admission control in the head engine: at most (what runs at once) + max_queued_requests requests in
flight; past that a request is refused at once with ErrorCode.OVERLOADED, and every admitted one still
completes exactly (greedy, against transformers)."""

from __future__ import annotations

import asyncio
import functools

import pytest

from engine_run import random_prompt
from hf_reference import hf_greedy
from nextserve.cluster.engine.contract import (EngineError, EngineOverloadedError, EngineRequest, ErrorCode,
                                               FinishReason, StepOutput)
from nextserve.cluster.engine.engine import Engine
from nextserve.cluster.engine.scheduler import SchedulerConfig
from nextserve.model.loader import load_head
from nextserve.model.sampling import SamplingParams
from nextserve.router.local_backend import load_local_backend

MAX_NUM_SEQS, MAX_QUEUED = 2, 3


async def _run(engine: Engine, request: EngineRequest) -> StepOutput | EngineError:
    try:
        return functools.reduce(StepOutput.merge, [out async for out in engine.generate(request)])
    except EngineError as e:
        return e


def test_past_the_queue_requests_are_refused_and_admitted_ones_complete_exactly(reference: dict) -> None:
    hf_model, path = reference["small"]
    engine = Engine(load_head(path), load_local_backend(path), None,
                    SchedulerConfig(max_num_seqs=MAX_NUM_SEQS, max_tokens_per_step=32, prefill_chunk=16,
                                    max_queued_requests=MAX_QUEUED))
    try:
        assert engine.max_in_flight == MAX_NUM_SEQS + MAX_QUEUED
        prompts = [random_prompt(5 + i, hf_model.config.vocab_size, seed=i) for i in range(12)]
        params = SamplingParams(max_tokens=8, ignore_eos=True)

        async def burst() -> list[StepOutput | EngineError]:  # all submitted before the engine finishes one
            return await asyncio.gather(*(_run(engine, EngineRequest(f"r{i}", tuple(p), params))
                                          for i, p in enumerate(prompts)))

        results = asyncio.run(burst())
        admitted = [(i, r) for i, r in enumerate(results) if isinstance(r, StepOutput)]
        refused = [r for r in results if isinstance(r, EngineError)]
        assert [i for i, _ in admitted] == list(range(MAX_NUM_SEQS + MAX_QUEUED))  # FCFS: the first ones
        assert len(refused) == len(prompts) - MAX_NUM_SEQS - MAX_QUEUED
        assert all(isinstance(e, EngineOverloadedError) and e.code is ErrorCode.OVERLOADED for e in refused)
        assert ErrorCode.OVERLOADED.http_status == 429 and "--max-queued-requests" in refused[0].message
        for i, out in admitted:
            assert out.finish_reason is FinishReason.LENGTH
            assert out.token_ids == hf_greedy(hf_model, prompts[i], 8)
        stats = engine.stats()
        assert stats.num_running == stats.num_waiting == stats.slots_used == stats.blocks_used == 0
        # The queue drained: a request is admitted again, and runs exactly.
        (again,) = engine.generate_sync([prompts[-1]], params)
        assert again.token_ids == hf_greedy(hf_model, prompts[-1], 8)
    finally:
        engine.shutdown()


def test_zero_queue_admits_only_what_runs_at_once(reference: dict) -> None:
    _, path = reference["small"]
    engine = Engine(load_head(path), load_local_backend(path), None,
                    SchedulerConfig(max_num_seqs=MAX_NUM_SEQS, max_tokens_per_step=32, max_queued_requests=0))
    try:
        params = SamplingParams(max_tokens=4, ignore_eos=True)

        async def burst() -> list[StepOutput | EngineError]:
            return await asyncio.gather(*(_run(engine, EngineRequest(f"z{i}", (1, 2, 3), params)) for i in range(4)))

        results = asyncio.run(burst())
        assert [isinstance(r, StepOutput) for r in results] == [True, True, False, False]
    finally:
        engine.shutdown()


def test_max_queued_requests_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="max_queued_requests"):
        SchedulerConfig(max_queued_requests=-1)
