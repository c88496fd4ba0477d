"""Run prompts through the serving engine in this process (the one decode loop; the CLI's `generate`
uses it too) and return each prompt's output token ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
