"""Run prompts through the serving engine in this process (the one decode loop; the CLI's `generate`
uses it too) and return each prompt's output token ids; `EngineFactory`, the one way tests make engines
(the `make_engine` fixture in tests/shared_fixtures.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from nextserve.cluster.engine.engine import Engine
from nextserve.cluster.engine.speculative_config import SpeculativeConfig
from nextserve.cluster.engine.scheduler import SchedulerConfig
from nextserve.model.cache.budget import CacheConfig
from nextserve.model.sampling import SamplingParams
from nextserve.model.sizes import model_sizes

Model = tuple[Any, Any]
"""(head, experts): what load_head and load_local_backend return."""


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


class EngineFactory:
    """Engines for one test, all shut down when it ends. `tokenizer` (the tiny checkpoint's: vocab
    2048 >= the reference models' 320) decodes the ids of engines made by calling the factory."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.engines: list[Engine] = []

    def __call__(self, model: Model, speculative: SpeculativeConfig | None = None, **config: int) -> Engine:
        """An engine with the tokenizer, the default cache and SchedulerConfig(**config) (drafting by
        `speculative`)."""
        self.engines.append(Engine(model[0], model[1], self.tokenizer, SchedulerConfig(**config),
                                   speculative=speculative))
        return self.engines[-1]

    def cached(self, model: Model, slots: int, blocks: int, block_size: int, snapshots: int = 0,
               snapshot_every: int | None = None, enable_prefix_cache: bool = True,
               speculative: SpeculativeConfig | None = None, drafter: Any = None, **config: int) -> Engine:
        """An engine (no tokenizer) whose cache holds exactly `slots` sequences, `blocks` KV blocks of
        `block_size` tokens and `snapshots` prefix-cache snapshots (none without the prefix cache), one
        every `snapshot_every` tokens (default: a block's); drafting by `speculative` (with `drafter`)."""
        sizes = model_sizes(model[0].config, torch.float32)
        state = sizes.deltanet_state_bytes_per_sequence
        snapshots = snapshots if enable_prefix_cache else 0
        budget = (slots + snapshots) * state + blocks * block_size * sizes.kv_bytes_per_token
        fraction = (snapshots * state + state // 2) / budget  # floors to exactly `snapshots` snapshots
        cache = CacheConfig(budget, block_size, enable_prefix_cache=enable_prefix_cache,
                            prefix_snapshot_every=snapshot_every or block_size,
                            prefix_snapshot_memory_fraction=fraction)
        self.engines.append(Engine(model[0], model[1], None, SchedulerConfig(max_num_seqs=slots, **config),
                                   cache_config=cache, speculative=speculative, drafter=drafter))
        capacity = self.engines[-1].capacity
        assert (capacity.num_slots, capacity.num_blocks, capacity.num_snapshots) == (slots, blocks, snapshots)
        return self.engines[-1]

    def shutdown(self) -> None:
        for engine in self.engines:
            engine.shutdown()
