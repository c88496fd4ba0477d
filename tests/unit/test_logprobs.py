"""The engine's logprobs are transformers' log-softmax on the same checkpoint, and a constrained start
(how tool_choice "required" forces a tool name) keeps the output on one of the allowed sequences."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nextserve.cluster.engine.engine import Engine
from nextserve.model.loader import load_head
from nextserve.router.local_backend import load_local_backend
from nextserve.model.sampling import SamplingParams, allowed_next_tokens


@pytest.fixture(scope="module")
def small_engine(reference: dict) -> Any:
    model, path = reference["small"]
    engine = Engine(load_head(path), load_local_backend(path), None)
    yield model, engine
    engine.shutdown()


def _hf_logprobs(model: Any, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log-softmax of transformers' logits at every output position: [len(output), V]."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_equal_transformers_log_softmax(small_engine: Any, temperature: float) -> None:
    model, engine = small_engine
    prompts = [[5, 6, 7, 8, 9], [11] * 13, [3, 250, 17]]
    params = SamplingParams(max_tokens=8, ignore_eos=True, temperature=temperature, seed=4, logprobs=5)
    for prompt, out in zip(prompts, engine.generate_sync(prompts, params)):
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 8
        ref = _hf_logprobs(model, prompt, list(out.token_ids))
        for t, entry in enumerate(out.logprobs):
            assert entry.token_id == out.token_ids[t]
            assert abs(entry.logprob - ref[t, entry.token_id].item()) <= 1e-4
            top = torch.topk(ref[t], 5)
            assert [i for i, _ in entry.top] == top.indices.tolist()
            assert max(abs(lp - v) for (_, lp), v in zip(entry.top, top.values.tolist())) <= 1e-4


def test_no_logprobs_unless_asked(small_engine: Any) -> None:
    _, engine = small_engine
    (out,) = engine.generate_sync([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert out.logprobs is None
    (out,) = engine.generate_sync([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True, logprobs=0))
    assert out.logprobs is not None and all(e.top == () for e in out.logprobs)


def test_constrained_start_follows_an_allowed_sequence_then_runs_free(small_engine: Any) -> None:
    model, engine = small_engine
    prompt = [5, 6, 7, 8]
    (free,) = engine.generate_sync([prompt], SamplingParams(max_tokens=6, ignore_eos=True))
    starts = ((free.token_ids[0] + 1, 40, 41), (free.token_ids[0] + 1, 42), (77,))  # none is the free choice
    (out,) = engine.generate_sync([prompt], SamplingParams(max_tokens=6, ignore_eos=True, allowed_starts=starts))
    ids = list(out.token_ids)
    chosen = next(s for s in starts if tuple(ids[:len(s)]) == s)
    # The choice at each constrained position is transformers' argmax among the allowed tokens; after it, free.
    for n in range(len(chosen)):
        allowed = allowed_next_tokens(ids[:n], starts)
        assert allowed is not None
        ref = _hf_logprobs(model, prompt, ids[:n + 1])[n]
        assert ids[n] == max(allowed, key=lambda t: ref[t].item())
    rest = _hf_logprobs(model, prompt, ids)[len(chosen):]
    assert ids[len(chosen):] == rest.argmax(-1).tolist()
