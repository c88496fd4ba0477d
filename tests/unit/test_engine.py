"""The head engine end to end on CPU: continuous batching against transformers' generate, chunked
prefill under decodes, streaming and coalescing, stops, seeds, cancellation, validation, metrics.

The "small" reference checkpoint has no tokenizer; the tiny one's (vocab 2048 >= 320) decodes its ids.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from engine_run import random_prompt
from hf_reference import hf_greedy
from nextserve.cluster.engine.detokenizer import IncrementalDetokenizer
from nextserve.cluster.engine.contract import EngineError, EngineRequest, ErrorCode, EngineRequestError, FinishReason, StepOutput
from nextserve.cluster.engine.engine import Engine
from nextserve.cluster.engine.model_runner import split_micro_batches
from nextserve.cluster.engine.scheduler import StepPlan
from nextserve.model.loader import load_head
from nextserve.router.local_backend import load_local_backend
from nextserve.model.sampling import SamplingParams

Model = tuple[Any, Any]


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> Model:
    return load_head(tiny_dir), load_local_backend(tiny_dir)


@pytest.fixture(scope="module")
def ref_models(reference: dict) -> dict[str, Model]:
    return {name: (load_head(path), load_local_backend(path)) for name, (_, path) in reference.items()}


async def _collect(engine: Engine, request_id: str, prompt: list[int], params: SamplingParams,
                   stop: tuple[str, ...] = ()) -> list[StepOutput]:
    request = EngineRequest(request_id, tuple(prompt), dataclasses.replace(params, stop=stop))
    return [out async for out in engine.generate(request)]


def _spy_plans(engine: Engine) -> list[dict[str, int]]:
    """Record every step's {request_id: new tokens}; set before the engine gets work."""
    plans: list[dict[str, int]] = []
    schedule = engine.scheduler.schedule

    def spy() -> StepPlan:
        plan = schedule()
        plans.append({item.seq.request_id: item.num_scheduled_tokens for item in plan.scheduled})
        return plan

    engine.scheduler.schedule = spy  # type: ignore[method-assign]
    return plans


@pytest.mark.parametrize("name", ["small", "awkward"])
def test_concurrent_greedy_equals_transformers(name: str, reference: dict, ref_models: dict[str, Model],
                                               make_engine: Callable) -> None:
    hf_model = reference[name][0]
    engine = make_engine(ref_models[name], max_num_seqs=4, max_tokens_per_step=48, prefill_chunk=16)
    lengths, max_tokens = (1, 5, 17, 33, 2, 60, 9, 100), (12, 3, 20, 8, 16, 5, 10, 6)
    prompts = [random_prompt(n, hf_model.config.vocab_size, seed=i) for i, n in enumerate(lengths)]
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens]
    plans = _spy_plans(engine)
    outs = engine.generate_sync(prompts, params)
    assert max(len(p) for p in plans) >= 4 and any(len(p) == 1 for p in plans)  # the batch changed shape
    for prompt, m, out in zip(prompts, max_tokens, outs):
        assert out.token_ids == hf_greedy(hf_model, prompt, m)
        assert out.finish_reason is FinishReason.LENGTH
        assert (out.prompt_tokens, out.completion_tokens) == (len(prompt), m)
    assert engine.stats().num_running == engine.stats().num_waiting == 0


def test_micro_batches_ping_pong_equal_transformers(reference: dict, ref_models: dict[str, Model],
                                                   make_engine: Callable) -> None:
    """Steps split into 2 micro-batches (ping-pong over the layers) give transformers' greedy tokens."""
    hf_model = reference["awkward"][0]
    engine = make_engine(ref_models["awkward"], max_num_seqs=8, max_tokens_per_step=64, prefill_chunk=16,
                         micro_batches=2, min_micro_batch_seqs=2)
    calls: list[int] = []
    forward = engine.head.forward_micro_batches

    def spy(parts: Any, experts: Any, all_logits: bool = False) -> torch.Tensor:
        calls.append(len(parts))
        return forward(parts, experts, all_logits)

    engine.head.forward_micro_batches = spy  # type: ignore[method-assign]
    lengths, max_tokens = (3, 21, 8, 40, 1, 13), (9, 14, 5, 11, 16, 7)
    prompts = [random_prompt(n, hf_model.config.vocab_size, seed=20 + i) for i, n in enumerate(lengths)]
    outs = engine.generate_sync(prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens])
    assert 2 in calls and 1 in calls  # split while >= 4 sequences ran, whole below that
    for prompt, m, out in zip(prompts, max_tokens, outs):
        assert out.token_ids == hf_greedy(hf_model, prompt, m)


def test_split_micro_batches_balances_tokens_and_keeps_order() -> None:
    assert split_micro_batches([1] * 32, 2, 4) == [(0, 16), (16, 32)]
    assert split_micro_batches([1] * 7, 2, 4) == [(0, 7)]  # too few sequences for two of >= 4
    assert split_micro_batches([100] + [1] * 8, 2, 4) == [(0, 4), (4, 9)]  # each part keeps >= 4 sequences
    assert split_micro_batches([1] * 12, 3, 4) == [(0, 4), (4, 8), (8, 12)]
    assert split_micro_batches([5, 5], 1, 1) == [(0, 2)]


def test_long_prompt_prefills_in_chunks_while_others_decode(reference: dict, small: Model,
                                                           make_engine: Callable) -> None:
    engine = make_engine(small, max_num_seqs=8, max_tokens_per_step=64, prefill_chunk=32)
    plans = _spy_plans(engine)
    long_prompt = random_prompt(100, 320, seed=9)

    async def main() -> list[StepOutput]:
        shorts = [engine.generate(EngineRequest(f"short{i}", tuple(random_prompt(4, 320, seed=i)), SamplingParams(max_tokens=40,
                                                                                         ignore_eos=True)))
                  for i in range(2)]
        for gen in shorts:
            await anext(gen)  # both are decoding now
        drains = [asyncio.create_task(_drain(gen)) for gen in shorts]
        long_outs = await _collect(engine, "long", long_prompt, SamplingParams(max_tokens=5, ignore_eos=True))
        await asyncio.gather(*drains)
        return long_outs

    long_outs = asyncio.run(main())
    long_steps = [p for p in plans if "long" in p]
    assert [p["long"] for p in long_steps[:4]] == [32, 32, 32, 4]
    assert all(p.get("short0") == 1 and p.get("short1") == 1 for p in long_steps[:4])  # decodes kept going
    assert all(sum(p.values()) <= 64 for p in plans)
    assert [t for out in long_outs for t in out.token_ids] == hf_greedy(reference["small"][0], long_prompt, 5)


async def _drain(gen: Any) -> None:
    async for _ in gen:
        pass


def test_streams_several_items_and_coalesces_when_behind(tiny: Model, make_engine: Callable,
                                                         tokenizer: PreTrainedTokenizerBase) -> None:
    engine = make_engine(tiny)
    prompt = tokenizer.encode("def main(argv):\n    ")
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    fast = asyncio.run(_collect(engine, "fast", prompt, params))
    ids = [t for out in fast for t in out.token_ids]
    assert len(fast) > 3 and len(ids) == 24 and fast[-1].finish_reason is FinishReason.LENGTH
    assert all(out.finish_reason is None for out in fast[:-1])
    assert "".join(out.text for out in fast) == tokenizer.decode(ids, skip_special_tokens=True)

    async def slow() -> list[StepOutput]:
        gen, items = engine.generate(EngineRequest("slow", tuple(prompt), params)), []
        items.append(await anext(gen))
        deadline = time.monotonic() + 60  # the engine keeps going; what it made meanwhile arrives as one item
        while engine.stats().num_running and time.monotonic() < deadline:  # (a fixed 0.5 s made only 1 token
            await asyncio.sleep(0.02)                                     # at load 10 on 2 cores)
        return items + [out async for out in gen]

    behind = asyncio.run(slow())
    assert max(len(out.token_ids) for out in behind) > 3 and len(behind) < 24
    assert [t for out in behind for t in out.token_ids] == ids


def test_stop_strings_end_text_before_them(tiny: Model, make_engine: Callable,
                                          tokenizer: PreTrainedTokenizerBase) -> None:
    engine = make_engine(tiny)
    prompt = tokenizer.encode("import os\nimport sys\n\n\nclass ")
    full = engine.generate_sync([prompt], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    k = next(k for k in range(8, len(full.text) - 3)
             if "\ufffd" not in full.text[k:k + 3] and full.text[k:k + 3].strip() and
             full.text.find(full.text[k:k + 3]) == k)
    stop = full.text[k:k + 3]
    outs = asyncio.run(_collect(engine, "stop", prompt, SamplingParams(max_tokens=40, ignore_eos=True),
                                stop=("never appears here", stop)))
    assert "".join(out.text for out in outs) == full.text[:k]
    assert outs[-1].finish_reason is FinishReason.STOP and outs[-1].completion_tokens < 40
    ids = [t for out in outs for t in out.token_ids]
    assert ids == full.token_ids[:len(ids)]


def test_stop_token_id_ends_without_its_text(tiny: Model, make_engine: Callable,
                                            tokenizer: PreTrainedTokenizerBase) -> None:
    engine = make_engine(tiny)
    prompt = tokenizer.encode("for i in range(10):\n")
    full = engine.generate_sync([prompt], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    j = full.token_ids.index(full.token_ids[6])
    out = engine.generate_sync([prompt], SamplingParams(max_tokens=20, stop_token_ids=(full.token_ids[6],)))[0]
    assert out.token_ids == full.token_ids[:j + 1] and out.finish_reason is FinishReason.STOP
    assert out.text == tokenizer.decode(full.token_ids[:j], skip_special_tokens=True)


def test_seeded_sampling_reproducible_in_any_batch(tiny: Model, make_engine: Callable) -> None:
    engine = make_engine(tiny)
    prompt = random_prompt(7, 2048, seed=3)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=100, seed=1234, ignore_eos=True)
    alone = engine.generate_sync([prompt], seeded)[0].token_ids
    others = [SamplingParams(max_tokens=10, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2)]
    batched = engine.generate_sync([random_prompt(30, 2048, 4), prompt, random_prompt(3, 2048, 5)],
                                   [others[0], seeded, others[1]])[1].token_ids
    other_seed = engine.generate_sync([prompt], SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95,
                                                               top_k=100, seed=99, ignore_eos=True))[0]
    assert alone == batched and other_seed.token_ids != alone


def test_cancel_and_abort_free_the_sequence(tiny: Model, make_engine: Callable) -> None:
    engine = make_engine(tiny)
    params = SamplingParams(max_tokens=2000, ignore_eos=True)

    async def main() -> list[StepOutput]:
        got: list[StepOutput] = []

        async def consume() -> None:
            async for out in engine.generate(EngineRequest("cancelled", tuple(random_prompt(5, 2048, 1)), params)):
                got.append(out)

        task = asyncio.create_task(consume())
        while len(got) < 2:
            await asyncio.sleep(0.01)
        task.cancel()  # what a client disconnect does to the request's handler
        aborted = engine.generate(EngineRequest("aborted", tuple(random_prompt(5, 2048, 2)), params))
        first = await anext(aborted)
        engine.abort("aborted")
        return [first] + [out async for out in aborted]

    outs = asyncio.run(main())
    assert outs[-1].finish_reason is FinishReason.ABORT and outs[-1].completion_tokens < 2000
    for _ in range(500):
        if engine.stats().num_running == 0:
            break
        time.sleep(0.01)
    assert engine.stats().num_running == 0


def test_request_validation_names_the_field(small: Model, make_engine: Callable) -> None:
    engine = make_engine(small)  # context 512, vocab 320
    cases = [([], 4, "prompt"), ([5] * 512, 1, "prompt"), ([5, 400], 4, "prompt")]
    for prompt, max_tokens, field_name in cases:
        with pytest.raises(EngineRequestError, match=field_name) as info:
            engine.generate_sync([prompt], SamplingParams(max_tokens=max_tokens))
        assert info.value.param == field_name
    with pytest.raises(EngineRequestError, match="stop"):
        engine.generate_sync([[5, 6]], SamplingParams(stop=("",)))
    # max_tokens past the context is clamped to the room the prompt leaves, as agents send 32000 everywhere
    (out,) = engine.generate_sync([[5] * 500], SamplingParams(max_tokens=20, ignore_eos=True))
    assert len(out.token_ids) == 12 and out.finish_reason is FinishReason.LENGTH
    (out,) = engine.generate_sync([[5] * 505], SamplingParams(max_tokens=None, ignore_eos=True))
    assert len(out.token_ids) == 7 and out.finish_reason is FinishReason.LENGTH

    async def duplicate() -> None:
        first = engine.generate(EngineRequest("same", tuple([5, 6]), SamplingParams(max_tokens=50, ignore_eos=True)))
        await anext(first)
        with pytest.raises(EngineRequestError, match="request_id"):
            await anext(engine.generate(EngineRequest("same", tuple([7]), SamplingParams())))
        await first.aclose()

    asyncio.run(duplicate())


class _FailingOnce:
    """An expert backend whose first call fails, as a lost expert worker would."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0

    def submit(self, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor) -> Future[Tensor]:
        self.calls += 1
        if self.calls == 1:
            raise ConnectionError("expert worker 3 is gone")
        return self.inner.submit(layer, hidden, ids, weights)


def test_failed_step_fails_its_requests_and_engine_goes_on(small: Model, make_engine: Callable) -> None:
    engine = make_engine((small[0], _FailingOnce(small[1])))
    with pytest.raises(EngineError, match="the server failed while generating") as info:
        engine.generate_sync([[5, 6, 7]], SamplingParams(max_tokens=4))
    assert info.value.code is ErrorCode.INTERNAL and "worker 3" not in str(info.value)  # logged, not sent
    out = engine.generate_sync([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and engine.stats().num_running == 0


def test_detokenizer_holds_split_characters_and_stop_prefixes(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "héllo → 世界 🙂 and more"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer.backend_tokenizer, [])
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    assert deltas.count("") > 0  # some tokens end inside a character and were held

    detok = IncrementalDetokenizer(tokenizer.backend_tokenizer, [], stop=("界 🙂", "xyz"))
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) == "héllo → 世" and detok.is_stopped  # "界 " was held, then cut with the stop

    detok = IncrementalDetokenizer(tokenizer.backend_tokenizer, [], stop=("界 x",))
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) == text and not detok.is_stopped
    assert "界 🙂" in deltas  # held while it could still become "界 x", released in one piece
