"""Sampling: seeded reproducibility, top-k / top-p support, parameter validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nextserve.model.loader import load_head
from nextserve.router.local_backend import load_local_backend
from nextserve.model.sampling import SamplingDefaults, SamplingError, SamplingParams, make_generator, sample
from engine_run import engine_tokens


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0])
    seen_k = {sample(logits, SamplingParams(temperature=1.0, top_k=2), g)
              for g in [make_generator(SamplingParams(temperature=1.0, seed=s)) for s in range(200)]}
    assert seen_k == {0, 1}
    # probs ~ [.66, .24, .09, ...]: top_p=0.8 keeps {0, 1}
    seen_p = {sample(logits, SamplingParams(temperature=1.0, top_p=0.8), g)
              for g in [make_generator(SamplingParams(temperature=1.0, seed=s)) for s in range(200)]}
    assert seen_p == {0, 1}
    assert sample(logits, SamplingParams(), None) == 0


@pytest.mark.parametrize("kwargs, field", [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
                                           ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k")])
def test_bad_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**kwargs)


def test_same_seed_same_tokens(reference: dict) -> None:
    _, path = reference["small"]
    head, experts = load_head(path), load_local_backend(path)
    prompts = [[5, 6, 7, 8], [9, 10]]
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=7, ignore_eos=True)
    a = engine_tokens(head, experts, prompts, params)
    b = engine_tokens(head, experts, prompts, params)
    c = engine_tokens(head, experts, prompts, dataclasses.replace(params, seed=8))
    assert a == b
    assert a != c


def test_defaults_come_from_the_checkpoints_generation_config(tmp_path) -> None:
    assert SamplingDefaults.from_checkpoint(tmp_path) == SamplingDefaults(1.0, 1.0, 0)  # none: OpenAI's
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.7, "top_p": 0.95, "top_k": 40}')
    assert SamplingDefaults.from_checkpoint(tmp_path) == SamplingDefaults(0.7, 0.95, 40)
