"""Speculative decoding in the in-process engine: n-gram drafts, the verify step and its rollback, output
unchanged.

Greedy output with drafts is compared token for token with the engine without drafts and with
transformers. A random-weight model rarely continues what n-gram lookup proposes, so the verify path is
also driven by `OracleDrafter`: drafts taken from the known greedy continuation with every few a wrong
token, so steps accept all, some and none of their drafts (a wrong rollback of the KV or the DeltaNet
states would change every later token).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from agent_checkpoint import AGENT_TURNS, agent_checkpoint_dir, prompt_text  # noqa: F401 (the session fixture)
from engine_run import EngineFactory, random_prompt
from hf_reference import hf_greedy
from nextserve.cluster.engine.contract import EngineRequest, EngineStats, FinishReason
from nextserve.cluster.engine.drafter import DraftInput
from nextserve.cluster.engine.engine import Engine
from nextserve.cluster.engine.ngram_drafter import NgramDrafter, ngram_draft
from nextserve.cluster.engine.speculative_config import (SpeculativeConfig, SpeculativeConfigError,
                                                         SpeculativeMethod)
from nextserve.cluster.engine.scheduler import SchedulerConfig
from nextserve.router.local_backend import load_local_backend
from nextserve.cluster.gateway.metrics import GatewayMetrics
from nextserve.model.loader import load_head
from nextserve.model.sampling import SamplingParams, sampling_distribution, verify_draft

Model = tuple[Any, Any]
NGRAM4 = SpeculativeConfig(SpeculativeMethod.NGRAM, 4)
VOCAB = 320  # the "small" reference model's


def _reference_ngram(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The obvious loops: longest suffix first, its latest earlier occurrence with a token after it."""
    for n in range(max_n, min_n - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for j in range(len(tokens) - n - 1, -1, -1):
            if tokens[j:j + n] == suffix:
                return tokens[j + n:j + n + k]
    return []


@pytest.mark.parametrize("length", [1, 2, 11, 127, 333])
@pytest.mark.parametrize("min_n,max_n,k", [(1, 1, 1), (1, 4, 4), (2, 5, 3), (3, 3, 7)])
def test_ngram_draft_equals_the_reference_loops(length: int, min_n: int, max_n: int, k: int) -> None:
    for seed in range(20):
        tokens = torch.randint(0, 6, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
        assert ngram_draft(tokens, k, min_n, max_n) == _reference_ngram(tokens, k, min_n, max_n)


def test_ngram_drafter_proposes_what_followed_the_match() -> None:
    drafter = NgramDrafter(1, 3)
    x = DraftInput("r", 0, [7, 1, 2, 3, 9, 8, 5, 1, 2, 3], 0, None, 4)
    assert drafter.propose([x, dataclasses.replace(x, num_draft_tokens=0),
                            dataclasses.replace(x, token_ids=[4, 5, 6])]) == [[9, 8, 5, 1], [], []]


def test_speculative_config_parses_vllm_spelling() -> None:
    config = SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 4, '
                                         '"prompt_lookup_min": 2, "prompt_lookup_max": 5}')
    assert (config.method, config.num_speculative_tokens, config.prompt_lookup_min,
            config.prompt_lookup_max) == (SpeculativeMethod.NGRAM, 4, 2, 5)
    assert SpeculativeConfig.from_json(config.to_json()) == config
    assert SpeculativeConfig.from_json('{"method": "mtp", "num_speculative_tokens": 1}').method is SpeculativeMethod.MTP


@pytest.mark.parametrize("doc,names", [
    ("{", "not JSON"), ("[1]", "JSON object"), ('{"method": "eagle", "num_speculative_tokens": 2}', "method"),
    ('{"method": "ngram"}', "num_speculative_tokens"), ('{"method": "ngram", "num_speculative_tokens": 0}',
                                                        "num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": "4"}', "num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 5, "prompt_lookup_max": 3}',
     "prompt_lookup_min"),
    ('{"method": "mtp", "num_speculative_tokens": 2, "prompt_lookup_max": 3}', "prompt_lookup_max"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}', "lookahead"),
])
def test_speculative_config_errors_name_the_field(doc: str, names: str) -> None:
    with pytest.raises(SpeculativeConfigError, match=names):
        SpeculativeConfig.from_json(doc)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5),
                                    SamplingParams(temperature=1.3, top_p=0.8)])
@pytest.mark.parametrize("draft", [0, 7])  # the likeliest token, a rare one
def test_verify_draft_keeps_the_target_distribution(params: SamplingParams, draft: int) -> None:
    """Accept-with-p(draft), else the residual: the token is distributed as sampling it would be."""
    logits = torch.tensor([2.0, 0.5, -1.0, 1.5, 0.0, 1.0, -0.5, 0.2])
    weights = sampling_distribution(logits, params)
    assert weights is not None
    target = weights / weights.sum()
    gen, n = torch.Generator().manual_seed(1), 6000
    counts = torch.bincount(torch.tensor([verify_draft(logits, draft, params, gen) for _ in range(n)]),
                            minlength=8).float()
    assert torch.allclose(counts / n, target, atol=0.025), (counts / n, target)  # ~4 sigma at p = 0.3


def test_verify_draft_greedy_is_the_argmax() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0])
    assert verify_draft(logits, 1, SamplingParams(), None) == 1
    assert verify_draft(logits, 2, SamplingParams(), None) == 1


class OracleDrafter:
    """Drafts from known continuations (prompt -> its greedy output), every `wrong_every`-th drafted
    position replaced by a wrong token: verify steps then accept all, some or none of their drafts."""

    needs_hidden_states = False

    def __init__(self, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], wrong_every: int) -> None:
        self.full = [list(p) + list(o) for p, o in zip(prompts, outputs)]
        self.wrong_every = wrong_every
        self.released: list[str] = []

    def propose(self, inputs: Sequence[DraftInput]) -> list[list[int]]:
        out = []
        for x in inputs:
            tokens = list(x.token_ids)
            full = next((f for f in self.full if f[:len(tokens)] == tokens), None)
            drafts = [] if full is None else full[len(tokens):len(tokens) + x.num_draft_tokens]
            out.append([(t + 1) % VOCAB if (len(tokens) + j) % self.wrong_every == 0 else t
                        for j, t in enumerate(drafts)])
        return out

    def release(self, request_id: str) -> None:
        self.released.append(request_id)


class RepeatDrafter:
    """Always drafts: the last token, repeated (mostly rejected by a random model, sometimes accepted)."""

    needs_hidden_states = False

    def propose(self, inputs: Sequence[DraftInput]) -> list[list[int]]:
        return [[x.token_ids[-1]] * x.num_draft_tokens for x in inputs]

    def release(self, request_id: str) -> None:
        pass


def _spec_engine(model: Model, drafter: Any, **config: int) -> Engine:
    return Engine(model[0], model[1], None, SchedulerConfig(**config), speculative=NGRAM4, drafter=drafter)


def _prompts(lengths: Sequence[int]) -> list[list[int]]:
    return [random_prompt(n, VOCAB, seed=40 + i) for i, n in enumerate(lengths)]


def test_greedy_with_drafts_equals_without_and_transformers(reference: dict, small: Model,
                                                            make_engine: EngineFactory) -> None:
    """Verify chunks (all, some, none accepted) batched with prefill chunks, plain decodes and an opted-out
    request: every token as decoding without drafts, and as transformers' generate."""
    lengths, max_tokens = (5, 23, 9, 40, 2), (30, 17, 26, 9, 21)
    prompts = _prompts(lengths)
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens]
    plain = [o.token_ids for o in make_engine(small, max_num_seqs=5, max_tokens_per_step=48,
                                              prefill_chunk=16).generate_sync(prompts, params)]
    assert plain[:2] == [hf_greedy(reference["small"][0], p, m) for p, m in zip(prompts[:2], max_tokens[:2])]
    drafter = OracleDrafter(prompts, plain, wrong_every=5)
    engine = _spec_engine(small, drafter, max_num_seqs=5, max_tokens_per_step=48, prefill_chunk=16)
    try:
        async def run() -> list[list[int]]:
            async def one(i: int) -> list[int]:
                request = EngineRequest(f"s{i}", tuple(prompts[i]), params[i], allow_speculation=i != 2)
                return [t async for out in engine.generate(request) for t in out.token_ids]
            return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))
        got = asyncio.run(run())
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert got == plain
    per_pos = stats.spec_decode_num_accepted_tokens_per_pos
    assert stats.spec_decode_num_drafts > 10 and 0 < stats.spec_decode_num_accepted_tokens < \
        stats.spec_decode_num_draft_tokens
    assert per_pos[0] > per_pos[3] > 0  # some chunks accepted everything, others stopped early
    assert sorted(drafter.released) == [f"s{i}" for i in range(5)]


def test_drafts_with_the_prefix_cache_and_preemption(small: Model, make_engine: EngineFactory) -> None:
    """Verify chunks under a cache small enough to preempt, with a prefix cache: the same tokens as
    without drafts, and the next turn (prompt + output) hits the snapshots the drafting turn published
    (which must be exact, or its tokens would differ); every block comes back."""
    prompts = _prompts([36, 56, 24])
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    args = dict(max_tokens_per_step=48, prefill_chunk=16)
    plain = make_engine.cached(small, 3, 12, 16, 4, **args)
    first = [o.token_ids for o in plain.generate_sync(prompts, params)]
    turn2 = [p + o + p[:5] for p, o in zip(prompts, first)]
    expect = [o.token_ids for o in plain.generate_sync(turn2, params)]
    drafter = OracleDrafter(prompts + turn2, first + expect, wrong_every=4)
    spec = make_engine.cached(small, 3, 12, 16, 4, speculative=NGRAM4, drafter=drafter, **args)
    assert [o.token_ids for o in spec.generate_sync(prompts, params)] == first
    outs = spec.generate_sync(turn2, params)
    assert [o.token_ids for o in outs] == expect
    assert any(o.cached_tokens > 0 for o in outs)
    stats = spec.stats()
    assert stats.num_preemptions > 0 and stats.spec_decode_num_accepted_tokens > 0
    assert (stats.blocks_used, stats.slots_used) == (0, 0)  # rejected drafts' blocks all came back


def test_stops_max_tokens_and_logprobs_with_drafts(small: Model, make_engine: EngineFactory) -> None:
    """A stop token inside an accepted run of drafts ends the output there; max_tokens is never
    overshot; logprobs come from the verify pass and equal those of decoding without drafts."""
    prompts = _prompts([7, 13])
    base = SamplingParams(max_tokens=25, ignore_eos=True, logprobs=2)
    plain = make_engine(small)
    full = plain.generate_sync(prompts, base)
    stop = full[0].token_ids[11]
    cut = full[0].token_ids.index(stop) + 1
    drafter = OracleDrafter(prompts, [o.token_ids for o in full], wrong_every=97)
    engine = _spec_engine(small, drafter)
    try:
        outs = engine.generate_sync(prompts, [dataclasses.replace(base, stop_token_ids=(stop,)),
                                              dataclasses.replace(base, max_tokens=22)])
    finally:
        engine.shutdown()
    assert outs[0].token_ids == full[0].token_ids[:cut] and outs[0].finish_reason is FinishReason.STOP
    assert outs[0].completion_tokens == cut
    assert outs[1].token_ids == full[1].token_ids[:22] and outs[1].completion_tokens == 22
    assert outs[1].finish_reason is FinishReason.LENGTH
    for out, ref in zip(outs, full):
        assert out.logprobs is not None and ref.logprobs is not None
        for got, want in zip(out.logprobs, ref.logprobs):
            assert got.token_id == want.token_id and abs(got.logprob - want.logprob) < 1e-4
            assert [t for t, _ in got.top] == [t for t, _ in want.top]


def test_seeded_sampling_with_drafts_is_reproducible(small: Model) -> None:
    prompts = [_prompts([6])[0] * 5]
    params = SamplingParams(max_tokens=30, temperature=0.8, seed=1234, ignore_eos=True)
    runs = []
    for _ in range(2):
        engine = _spec_engine(small, RepeatDrafter())
        try:
            runs.append(engine.generate_sync(prompts, params)[0].token_ids)
            assert engine.stats().spec_decode_num_drafts > 0
        finally:
            engine.shutdown()
    assert runs[0] == runs[1] and len(runs[0]) == 30


def test_mtp_without_mtp_weights_is_a_clear_startup_error(small: Model) -> None:
    with pytest.raises(SpeculativeConfigError, match="MTP"):
        Engine(small[0], small[1], None, speculative=SpeculativeConfig(SpeculativeMethod.MTP, 1))


def test_drafting_switches_off_above_the_batch_size(small: Model) -> None:
    config = dataclasses.replace(NGRAM4, disable_by_batch_size=1)
    prompts = [_prompts([6])[0] * 4, _prompts([5])[0] * 4]
    engine = Engine(small[0], small[1], None, SchedulerConfig(max_num_seqs=2), speculative=config,
                    drafter=RepeatDrafter())
    try:
        engine.generate_sync(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
        both = engine.stats().spec_decode_num_drafts
        engine.generate_sync(prompts[:1], SamplingParams(max_tokens=8, ignore_eos=True))
        alone = engine.stats().spec_decode_num_drafts - both
    finally:
        engine.shutdown()
    assert both == 0 and alone > 0


def test_spec_decode_counters_reach_prometheus() -> None:
    metrics = GatewayMetrics()
    for drafts, accepted, per_pos in ((3, 2, (2, 0)), (10, 7, (4, 3))):  # two scrapes of cumulative stats
        metrics.observe_engine_stats(EngineStats(spec_decode_num_drafts=drafts, spec_decode_num_draft_tokens=2 * drafts,
                                                 spec_decode_num_accepted_tokens=accepted,
                                                 spec_decode_num_accepted_tokens_per_pos=per_pos))
    text = metrics.render()[0].decode()
    for line in ("nextserve_spec_decode_num_drafts_total 10.0", "nextserve_spec_decode_num_draft_tokens_total 20.0",
                 "nextserve_spec_decode_num_accepted_tokens_total 7.0",
                 'nextserve_spec_decode_num_accepted_tokens_per_pos_total{position="1"} 3.0'):
        assert line in text


def test_agent_turns_with_ngram_drafts_are_the_memorised_ones(agent_checkpoint_dir: Path) -> None:
    """The agent checkpoint's memorised turns (tool calls whose arguments repeat the prompt, forced
    prefixes) decode to the same tokens with n-gram drafts, which are accepted there: the tool-call
    text the gateway parses is unchanged."""
    tokenizer = AutoTokenizer.from_pretrained(agent_checkpoint_dir)
    engine = Engine(load_head(agent_checkpoint_dir), load_local_backend(agent_checkpoint_dir), tokenizer,
                    speculative=NGRAM4)
    prompts = [tokenizer.encode(prompt_text(tokenizer, t), add_special_tokens=False) for t in AGENT_TURNS]
    try:
        outs = engine.generate_sync(prompts, SamplingParams(max_tokens=256))
        stats = engine.stats()
    finally:
        engine.shutdown()
    for turn, out in zip(AGENT_TURNS, outs):
        assert out.token_ids == tokenizer.encode(turn.completion, add_special_tokens=False), turn.name
        assert out.text == turn.content and out.finish_reason is FinishReason.STOP
    assert stats.spec_decode_num_accepted_tokens > 0


class HiddenRecorder(OracleDrafter):
    """The oracle's drafts, asking for hidden states and recording what each sequence's inputs held."""

    needs_hidden_states = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[DraftInput] = []

    def propose(self, inputs: Sequence[DraftInput]) -> list[list[int]]:
        self.seen.extend(inputs)
        return super().propose(inputs)


def test_hidden_states_for_a_drafter_are_the_kept_positions(small: Model, make_engine: EngineFactory) -> None:
    """What an MTP drafter reads: per step, the final-norm hidden states of exactly the positions the step
    kept (contiguous across steps, rejected drafts' rows left out); the last row's logits give the token
    just sampled (greedy)."""
    prompts = _prompts([21, 6])
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    plain = [o.token_ids for o in make_engine(small, prefill_chunk=8).generate_sync(prompts, params)]
    drafter = HiddenRecorder(prompts, plain, wrong_every=3)
    engine = _spec_engine(small, drafter, prefill_chunk=8)
    try:
        assert [o.token_ids for o in engine.generate_sync(prompts, params)] == plain
    finally:
        engine.shutdown()
    head = small[0]
    next_position: dict[str, int] = {}
    for x in drafter.seen:
        assert x.hidden is not None and x.hidden.shape == (x.hidden.shape[0], head.config.hidden_size)
        assert x.position == next_position.get(x.request_id, 0)
        next_position[x.request_id] = x.position + x.hidden.shape[0]
        if x.num_draft_tokens:  # decoding: all but the token just sampled are cached; the last row predicted it
            assert next_position[x.request_id] == len(x.token_ids) - 1
            with torch.inference_mode():
                assert int(head.lm_head(x.hidden[-1]).argmax()) == x.token_ids[-1]
    assert any(x.hidden.shape[0] > 1 and x.position > 0 for x in drafter.seen if x.hidden is not None)
