"""Run prompts through the serving engine in this process (the one decode loop; the CLI's `generate`
uses it too) and return each prompt's output token ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from nextserve.cluster.engine.engine import Engine
from nextserve.cluster.engine.scheduler import SchedulerConfig
from nextserve.model.sampling import SamplingParams


def engine_tokens(head: Any, experts: Any, prompts: Sequence[Sequence[int]],
                  params: SamplingParams | Sequence[SamplingParams], tokenizer: Any = None,
                  **config: int) -> list[list[int]]:
    engine = Engine(head, experts, tokenizer, SchedulerConfig(**config))
    try:
        return [list(out.token_ids) for out in engine.generate_sync(prompts, params)]
    finally:
        engine.shutdown()


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    """n token ids in [3, vocab), seeded (ids 0-2 are pad, bos and eos on the reference models)."""
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
