"""The drafter seam of speculative decoding: what proposes draft tokens for the engine to verify.

    step s: forward (verify) -> accept / sample -> DraftInput per sequence of the step
                                                      |
                                   Drafter.propose(inputs) -> draft token ids per sequence
                                                      |
    step s+1: each drafted sequence runs [its last token, d1..dk] as one k+1 token chunk (verify)

The engine calls `propose` once after every step with one `DraftInput` per sequence that ran in it and
is still running, in the step's order, whether or not it is to be drafted now (`num_draft_tokens` 0:
still prefilling, drafting switched off for the batch size, the request opted out): a drafter with state
of its own (the MTP layer's KV cache) keeps it in step with the head's cache from these calls. An n-gram
drafter reads only the tokens; an MTP drafter also reads `hidden`, the head's final-norm hidden states
of the positions this step added to the cache (accepted ones only: a rejected draft's row is not there).

Letters: n = positions the step kept in the cache for the sequence, H = hidden size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass(frozen=True, slots=True)
class DraftInput:
    """One sequence after a step, as a drafter sees it."""
    request_id: str
    slot: int
    """The sequence's state slot in the head's cache (model/cache/pools.py), its block-table row: an index
    for a drafter's own per-sequence cache. A slot is reused by a later sequence after `release`."""
    token_ids: Sequence[int]
    """Prompt + output so far; the last one is the token just sampled (not yet run through the model)."""
    position: int
    """Position of the first token this step ran for the sequence (0 for a first prefill chunk): the step
    kept positions [position, position + n) in the cache, n = hidden.shape[0]."""
    hidden: Tensor | None
    """[n, H] the head's hidden states (after the final norm, what lm_head reads) at those positions; the
    last row's logits gave token_ids[-1] when `num_draft_tokens` > 0. None unless the drafter asks for them
    (`needs_hidden_states`)."""
    num_draft_tokens: int
    """Propose at most this many tokens for this sequence now; 0: propose none (but keep any state)."""


class Drafter(Protocol):
    """Proposes draft tokens; the engine verifies them, so a bad draft costs speed, never correctness."""

    needs_hidden_states: bool
    """The engine passes `DraftInput.hidden` (computing the final norm at every position of the step)."""

    def propose(self, inputs: Sequence[DraftInput]) -> list[list[int]]:
        """Draft token ids per input, in order: at most `num_draft_tokens` each (fewer or none when the
        drafter has no good guess). Called on the engine thread after every step."""
        ...

    def release(self, request_id: str) -> None:
        """The sequence left its slot (finished, aborted or preempted): drop what the drafter keeps for it.
        A preempted sequence comes back later as a new prefill, in some slot, from the position its
        prefix-cache hit leaves (DraftInput.position)."""
        ...
