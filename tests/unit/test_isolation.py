"""Per-sequence fault isolation: one sequence's failure (its sampling, its NaN logits) ends it alone;
sampling is total over any logits and any valid params; tiny temperatures are greedy; seeds stay in range."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import AutoTokenizer

from nextserve.cluster.engine.contract import EngineError, EngineRequest, ErrorCode, SamplingParams, StepOutput
from nextserve.cluster.engine.engine import Engine
from nextserve.cluster.engine.scheduler import SequenceState, StepPlan
from nextserve.cluster.gateway.generation import choice_params
from nextserve.model.loader import load_head
from nextserve.router.local_backend import load_local_backend
from nextserve.model.sampling import (LOGPROB_FLOOR, TEMPERATURE_FLOOR, SamplingError, make_generator, sample,
                                      token_logprobs)

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13], [14, 15, 16, 17, 18]]
POISONED = 2
MAX_TOKENS = 8


class PoisonedEngine(Engine):
    """The engine with one request poisoned: its sampling raises, or the model's logits for it are NaN."""

    def __init__(self, *args: Any, poison: str, how: str) -> None:
        super().__init__(*args)
        self.poison, self.how = poison, how
        run = self.runner.run

        def run_with_nan(plan: StepPlan) -> torch.Tensor:
            logits = run(plan)
            for i, item in enumerate(plan.scheduled):
                if item.seq.request_id == self.poison and self.how == "nan":
                    logits[i, 3] = float("nan")
            return logits
        self.runner.run = run_with_nan  # type: ignore[method-assign]

    def _sample_row(self, seq: SequenceState, row: torch.Tensor, argmax: int) -> Any:
        if seq.request_id == self.poison and self.how == "raise" and seq.output_ids:
            raise RuntimeError("injected: this row's sampling state is corrupt (/secret/path.py, pid 4242)")
        return super()._sample_row(seq, row, argmax)


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> tuple[Any, Any, Any]:
    return load_head(tiny_dir), load_local_backend(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)


def _run_all(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int] | EngineError]:
    async def one(i: int) -> list[int] | EngineError:
        outs: list[StepOutput] = []
        try:
            async for out in engine.generate(EngineRequest(f"r{i}", tuple(prompts[i]), params)):
                outs.append(out)
        except EngineError as e:
            return e
        return [t for out in outs for t in out.token_ids]

    async def main() -> list[list[int] | EngineError]:
        return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))
    return asyncio.run(main())


@pytest.mark.parametrize("how", ["raise", "nan"])
def test_one_poisoned_row_ends_alone_the_others_finish_as_alone(tiny: tuple[Any, Any, Any], how: str) -> None:
    head, experts, tokenizer = tiny
    greedy = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    alone = []
    for prompt in PROMPTS:
        engine = Engine(head, experts, tokenizer)
        try:
            alone.append(list(engine.generate_sync([prompt], greedy)[0].token_ids))
        finally:
            engine.shutdown()
    engine = PoisonedEngine(head, experts, tokenizer, poison=f"r{POISONED}", how=how)
    try:
        results = _run_all(engine, PROMPTS, greedy)
        for i, result in enumerate(results):
            if i == POISONED:
                assert isinstance(result, EngineError) and result.code is ErrorCode.INTERNAL
                assert "/secret" not in result.message and "4242" not in result.message
                assert ("NaN" in result.message) == (how == "nan")
            else:
                assert result == alone[i], f"row {i} changed because row {POISONED} failed"
        assert engine.stats().num_running == 0 and engine.is_running
        after = engine.generate_sync([PROMPTS[0]], greedy)[0]  # the engine goes on serving
        assert list(after.token_ids) == alone[0]
    finally:
        engine.shutdown()


def test_temperature_below_the_floor_is_greedy(tiny: tuple[Any, Any, Any]) -> None:
    head, experts, tokenizer = tiny
    engine = Engine(head, experts, tokenizer)
    try:
        greedy = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        tiny_t = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=1e-300, seed=3)
        a = engine.generate_sync(PROMPTS, greedy)
        b = engine.generate_sync(PROMPTS, tiny_t)
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
    finally:
        engine.shutdown()
    assert SamplingParams(temperature=TEMPERATURE_FLOOR / 2).is_greedy
    assert not SamplingParams(temperature=TEMPERATURE_FLOOR).is_greedy


V = 37
_logit = st.one_of(st.floats(-1e4, 1e4), st.sampled_from([math.inf, -math.inf, math.nan, 3e38, -3e38]))


@settings(max_examples=300, deadline=None)
@given(logits=st.lists(_logit, min_size=V, max_size=V),
       temperature=st.one_of(st.just(0.0), st.floats(1e-300, 1e300)),
       top_p=st.floats(1e-300, 1.0, exclude_min=False), top_k=st.integers(0, 10**12),
       seed=st.integers(-(2**63), 2**64 - 1), logprobs=st.integers(0, V))
def test_sample_is_total(logits: list[float], temperature: float, top_p: float, top_k: int, seed: int,
                         logprobs: int) -> None:
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    row = torch.tensor(logits)
    token = sample(row, params, make_generator(params))
    assert 0 <= token < V
    if not torch.isnan(row[token]) and bool((row == math.inf).any()):
        assert row[token] == math.inf  # overflowed logits win
    lp = token_logprobs(row, token, logprobs)
    values = [lp.logprob, *(v for _, v in lp.top)]
    assert all(math.isfinite(v) and LOGPROB_FLOOR <= v <= 0 for v in values)


def test_seeds_out_of_range_are_refused_and_choice_seeds_wrap() -> None:
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(SamplingError) as info:
            SamplingParams(seed=bad)
        assert info.value.param == "seed"
    for bad in (math.nan, math.inf):
        with pytest.raises(SamplingError) as info:
            SamplingParams(temperature=bad)
        assert info.value.param == "temperature"
    seeds = [p.seed for p in choice_params(SamplingParams(temperature=1.0, seed=2**64 - 1), 3)]
    assert seeds == [2**64 - 1, 0, 1]
    gen = make_generator(SamplingParams(temperature=1.0, seed=-1))  # torch's own reading: -1 is 2**64 - 1
    assert gen is not None and gen.initial_seed() == 2**64 - 1
