"""The MTP drafter (cluster/engine/mtp_drafter.py) on the tiny checkpoint's MTP layer: its paged, batched
drafts equal the plain dense reference (tests/mtp_reference.py) after a ragged prefill and after a decode
step; greedy decoding with MTP drafts is the greedy decoding without them (and transformers'); an MTP layer
trained on the tiny's own outputs has its drafts accepted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from transformers import Qwen3NextForCausalLM

from agent_checkpoint import cache_root
from engine_run import random_prompt
from hf_reference import hf_greedy
from mtp_checkpoint import SEED, ensure_mtp_checkpoint, training_prompts
from mtp_reference import reference_drafts
from nextserve.cluster.engine.drafter import DraftInput
from nextserve.cluster.engine.engine import Engine
from nextserve.cluster.engine.mtp_drafter import MtpDrafter
from nextserve.cluster.engine.scheduler import SchedulerConfig
from nextserve.cluster.engine.speculative_config import SpeculativeConfig
from nextserve.model.cache.pools import HybridCache
from nextserve.model.forward_batch import ForwardBatch
from nextserve.model.loader import load_head
from nextserve.model.qwen3_next import HeadModel
from nextserve.model.sampling import SamplingParams
from nextserve.router.local_backend import LocalExpertBackend, load_local_backend

LENGTHS = [1, 11, 37, 16]  # one token, ragged, a block boundary (16)
K = 3


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> tuple[HeadModel, LocalExpertBackend]:
    return load_head(tiny_dir), load_local_backend(tiny_dir)


@torch.inference_mode()
def test_drafts_equal_the_dense_reference_after_prefill_and_decode(tiny: tuple[HeadModel, LocalExpertBackend]) -> None:
    head, experts = tiny
    mtp_layer = head.config.mtp_layers[0]
    gate_up, down = experts.gate_up[mtp_layer], experts.down[mtp_layer]
    prompts = [random_prompt(n, 2048, seed=n) for n in LENGTHS]
    cache = HybridCache.contiguous(head.config, len(prompts), max(LENGTHS) + 8, 16, torch.float32, torch.device("cpu"))
    drafter = MtpDrafter(head, experts, cache)
    slots, seqs, hiddens = list(range(len(prompts))), [list(p) for p in prompts], [torch.empty(0, 256)] * len(prompts)
    num_cached, step = [0] * len(prompts), [list(p) for p in prompts]  # tokens each sequence runs this step
    for _ in range(2):  # the prefill, then one decode step
        batch = ForwardBatch.build([len(s) for s in step], num_cached, slots, cache)
        logits, hidden = head.forward_micro_batches([(torch.tensor([t for s in step for t in s]), batch)], experts,
                                                    with_hidden=True)
        inputs = []
        for i, s in enumerate(step):
            seqs[i].append(int(logits[i].argmax()))
            rows = hidden[batch.starts[i]:batch.starts[i] + len(s)]
            hiddens[i] = torch.cat((hiddens[i], rows))
            inputs.append(DraftInput(f"r{i}", slots[i], list(seqs[i]), num_cached[i], rows, K))
        drafts = drafter.propose(inputs)
        for i in range(len(prompts)):
            assert drafts[i] == reference_drafts(head, gate_up, down, seqs[i], hiddens[i], K), f"sequence {i}"
        num_cached = [c + len(s) for c, s in zip(num_cached, step)]
        step = [[s[-1]] for s in seqs]


def test_a_sequence_not_drafted_now_still_fills_its_mtp_rows(tiny: tuple[HeadModel, LocalExpertBackend]) -> None:
    """num_draft_tokens 0 (prefilling, drafting off): no proposal, but the catch-up writes its rows, so a
    later draft reads the same K/V as if it had drafted all along."""
    head, experts = tiny
    prompt = random_prompt(20, 2048, seed=5)
    results = []
    for first_k in (0, K):
        cache = HybridCache.contiguous(head.config, 1, 32, 16, torch.float32, torch.device("cpu"))
        drafter = MtpDrafter(head, experts, cache)
        with torch.inference_mode():
            batch = ForwardBatch.build([20], [0], [0], cache)
            logits, hidden = head.forward_micro_batches([(torch.tensor(prompt), batch)], experts, with_hidden=True)
            tokens = prompt + [int(logits[0].argmax())]
            first = drafter.propose([DraftInput("r", 0, tokens, 0, hidden, first_k)])
            batch = ForwardBatch.build([1], [20], [0], cache)
            logits, hidden = head.forward_micro_batches([(torch.tensor(tokens[-1:]), batch)], experts, with_hidden=True)
            second = drafter.propose([DraftInput("r", 0, tokens + [int(logits[0].argmax())], 20, hidden, K)])
        assert (first == [[]]) == (first_k == 0)
        results.append(second)
    assert results[0] == results[1] and len(results[0][0]) == K


def test_greedy_with_mtp_drafts_equals_greedy_without(tiny: tuple[HeadModel, LocalExpertBackend]) -> None:
    head, experts = tiny
    prompts = [random_prompt(n, 2048, seed=100 + n) for n in (5, 23, 40)]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    outputs = []
    for spec in (None, SpeculativeConfig.from_dict({"method": "mtp", "num_speculative_tokens": K})):
        engine = Engine(head, experts, None, SchedulerConfig(), speculative=spec)
        try:
            outputs.append([list(o.token_ids) for o in engine.generate_sync(prompts, params)])
            stats = engine.stats()
        finally:
            engine.shutdown()
    assert outputs[0] == outputs[1]
    assert stats.spec_decode_num_draft_tokens > 0  # the drafts were verified (a random MTP: few accepted)


@pytest.fixture(scope="module")
def trained_mtp_dir(tiny_dir: Path) -> Path:
    """The tiny with its MTP layer trained on its own greedy outputs (tests/mtp_checkpoint.py's default
    recipe; built once per cache from the session's tiny: ~7 s of one core)."""
    return ensure_mtp_checkpoint(cache_root(), tiny=tiny_dir)


def test_trained_mtp_drafts_are_accepted_and_greedy_stays_transformers(trained_mtp_dir: Path) -> None:
    """transformers has no MTP: its greedy `generate` on the same checkpoint (mtp.* ignored) is the output
    with MTP drafts too. On the prompts it was trained on, the trained layer's drafts are mostly accepted
    (the random one's almost never): the dense forward it was trained with and the drafter's paged one are
    the same function. (The tiny's random-weight continuations of unseen random prompts are not learnable
    from a few sequences: measured ~0.5% there, docs/BENCHMARKS.md.)"""
    head, experts = load_head(trained_mtp_dir), load_local_backend(trained_mtp_dir)
    prompts = training_prompts(SEED, 3)
    spec = SpeculativeConfig.from_dict({"method": "mtp", "num_speculative_tokens": 2})
    engine = Engine(head, experts, None, SchedulerConfig(), speculative=spec)
    try:
        got = [list(o.token_ids) for o in engine.generate_sync(prompts, SamplingParams(max_tokens=24, ignore_eos=True))]
        stats = engine.stats()
    finally:
        engine.shutdown()
    ref = Qwen3NextForCausalLM.from_pretrained(trained_mtp_dir, dtype=torch.float32).eval()
    for p, tokens in zip(prompts, got):
        want = hf_greedy(ref, p, 24)  # stops after an eos (2), where the engine ignores it
        assert tokens[:len(want)] == want and (len(want) == 24 or want[-1] == 2)
    acceptance = stats.spec_decode_num_accepted_tokens / stats.spec_decode_num_draft_tokens
    print(f"trained MTP, K=2: {stats.spec_decode_num_accepted_tokens} of {stats.spec_decode_num_draft_tokens} "
          f"draft tokens accepted ({acceptance:.2f}), per position {stats.spec_decode_num_accepted_tokens_per_pos}")
    assert acceptance > 0.5
