"""A sequence's greedy tokens do not depend on who else is in the batch, or when they join and leave."""

from __future__ import annotations

import torch

from nextserve.model.cache import SequenceCache
from nextserve.model.generate import Sequence, generate, step
from nextserve.model.loader import load_head, load_local_backend
from nextserve.model.sampling import SamplingParams


def _seq(head: object, prompt: list[int], n: int) -> Sequence:
    return Sequence(prompt, SamplingParams(max_tokens=n, ignore_eos=True), SequenceCache.empty(head.config))


def test_tokens_same_alone_and_in_a_changing_batch(reference: dict) -> None:
    _, path = reference["awkward"]
    head, experts = load_head(path), load_local_backend(path)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, head.config.vocab_size, (n,), generator=g).tolist() for n in (12, 90, 3, 30)]
    alone = [generate(head, experts, [p], SamplingParams(max_tokens=24, ignore_eos=True))[0] for p in prompts]

    # A starts alone; B (a 90-token prompt, prefilled in chunks of 32) joins at step 3 while A decodes;
    # C joins at step 5 and leaves early (max 6 tokens); D joins at step 12.
    joins = {0: [0], 3: [1], 5: [2], 12: [3]}
    seqs = [_seq(head, p, 6 if i == 2 else 24) for i, p in enumerate(prompts)]
    live: list[Sequence] = []
    sizes = []
    for t in range(200):
        live += [seqs[i] for i in joins.get(t, [])]
        if not live and t > max(joins):
            break
        if live:
            step(head, experts, live, prefill_chunk=32)
            sizes.append(len(live))
            live = [s for s in live if not s.finished]
    assert max(sizes) >= 3 and min(sizes) == 1, sizes  # the batch really changed shape
    assert seqs[2].output == alone[2][:6]
    for i in (0, 1, 3):
        assert seqs[i].output == alone[i], f"sequence {i} changed in a batch"
