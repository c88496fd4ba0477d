"""The head model + local experts against transformers' own Qwen3NextForCausalLM, same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3NextForCausalLM

from nextserve.model.cache.pools import HybridCache
from nextserve.model.forward_batch import ForwardBatch
from nextserve.model.loader import load_head
from nextserve.router.local_backend import load_local_backend
from nextserve.model.sampling import SamplingParams
from engine_run import engine_tokens

TOL = 1e-4
CPU = torch.device("cpu")
LENGTHS = [37, 5, 70, 1]  # ragged; 70 crosses a 64-token DeltaNet chunk


def _cache(head: object, num_seqs: int, max_tokens: int, block_size: int = 16) -> HybridCache:
    return HybridCache.contiguous(head.config, num_seqs, max_tokens, block_size, torch.float32, CPU)


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.int64)
    mask = torch.zeros(len(prompts), L, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    return ids, mask


@pytest.fixture(params=["small", "awkward"])
def pair(request: pytest.FixtureRequest, reference: dict) -> tuple[Qwen3NextForCausalLM, object, object]:
    model, path = reference[request.param]
    return model, load_head(path), load_local_backend(path)


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def test_ragged_prefill_and_32_decode_steps_match_transformers(pair: tuple) -> None:
    ref, head, experts = pair
    prompts = _prompts(head.config.vocab_size, LENGTHS)
    ids, mask = _left_padded(prompts)
    out = ref(ids, attention_mask=mask, use_cache=True)
    cache, slots = _cache(head, len(prompts), max(LENGTHS) + 32), list(range(len(prompts)))
    flat = torch.tensor([t for p in prompts for t in p])
    ours = head(flat, ForwardBatch.build(LENGTHS, [0] * len(prompts), slots, cache), experts, all_logits=True)
    num_cached = list(LENGTHS)
    for i, p in enumerate(prompts):
        start = sum(LENGTHS[:i])
        diff = (ours[start:start + len(p)] - out.logits[i, -len(p):]).abs().max().item()
        assert diff <= TOL, f"prefill of sequence {i} (len {len(p)}) differs by {diff}"
    hf_cache, worst = out.past_key_values, 0.0
    next_ids = out.logits[:, -1].argmax(-1)
    for _ in range(32):
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
        out = ref(next_ids[:, None], attention_mask=mask, cache=hf_cache, use_cache=True)
        hf_cache = out.past_key_values
        logits = head(next_ids, ForwardBatch.build([1] * len(prompts), num_cached, slots, cache), experts)
        num_cached = [n + 1 for n in num_cached]
        worst = max(worst, (logits - out.logits[:, -1]).abs().max().item())
        next_ids = out.logits[:, -1].argmax(-1)
    assert worst <= TOL, f"decode logits differ by {worst}"


@torch.inference_mode()
def test_greedy_generation_equals_transformers_generate(pair: tuple) -> None:
    ref, head, experts = pair
    prompts = _prompts(head.config.vocab_size, [9, 23, 4, 16, 40], seed=1)
    ours = engine_tokens(head, experts, prompts, SamplingParams(max_tokens=32, ignore_eos=True))
    for p, got in zip(prompts, ours):
        want = ref.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, pad_token_id=0)
        assert got == want[0, len(p):].tolist()


@pytest.mark.parametrize("block_size", [16, 32])
@torch.inference_mode()
def test_chunked_prefill_continuation_matches_one_shot(pair: tuple, block_size: int) -> None:
    """A 150-token prompt prefilled in chunks of 40 (cached multi-token continuation; chunks end inside
    blocks and, with 16-token blocks, on a block boundary at 80) gives the same logits as transformers
    on the whole prompt."""
    ref, head, experts = pair
    prompt = _prompts(head.config.vocab_size, [150], seed=2)[0]
    want = ref(torch.tensor([prompt])).logits[0]
    cache = _cache(head, 1, 150, block_size)
    got = []
    for s in range(0, 150, 40):
        chunk = prompt[s:s + 40]
        got.append(head(torch.tensor(chunk), ForwardBatch.build([len(chunk)], [s], [0], cache), experts,
                        all_logits=True))
    diff = (torch.cat(got) - want).abs().max().item()
    assert diff <= TOL, f"chunked prefill differs by {diff}"


@torch.inference_mode()
def test_head_holds_no_routed_expert_weight(reference: dict) -> None:
    _, path = reference["small"]
    head = load_head(path)
    assert not [n for n, _ in head.named_parameters() if ".experts." in n]
    assert any(n.endswith("mlp.gate.weight") for n, _ in head.named_parameters())


@torch.inference_mode()
def test_reference_logits_are_not_degenerate(reference: dict) -> None:
    """The 1e-4 tolerance means something only if logits spread well beyond it."""
    ref, _ = reference["small"]
    logits = ref(torch.tensor([_prompts(ref.config.vocab_size, [20])[0]])).logits
    assert logits.std().item() > 0.3
