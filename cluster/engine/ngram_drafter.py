"""N-gram drafts (prompt lookup): the sequence's last n tokens found earlier in its prompt + output
propose the tokens that followed them there.

    tokens ... a b c d [x y z w] ... a b c d      suffix "a b c d" (n = prompt_lookup_max, then shorter)
                                                  matched at its latest earlier occurrence -> draft x y z w

Code an agent rewrites (an edit, a whole file, a diff) is in its prompt, so the drafts are mostly accepted;
a sequence with no match gets no draft and decodes one token as without speculation. Stateless: only the
tokens are read (no hidden states).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nextserve.cluster.engine.drafter import DraftInput


def ngram_draft(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """At most k tokens following the latest earlier occurrence of the longest suffix of `tokens` of
    length in [min_n, max_n] that occurs earlier with at least one token after it; [] when none does."""
    if k < 1 or len(tokens) < min_n + 1:
        return []
    ids = np.asarray(tokens, dtype=np.int64)
    L = ids.shape[0]
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(ids[:L - 1], n)  # [L-n, n] starts 0 .. L-1-n
        hits = np.flatnonzero((windows == ids[L - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the latest match; its continuation has >= 1 token (start <= L - 1)
            return ids[start:start + k].tolist()
    return []


class NgramDrafter:
    """The `Drafter` of method "ngram" (cluster/engine/drafter.py)."""

    needs_hidden_states = False

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, inputs: Sequence[DraftInput]) -> list[list[int]]:
        return [ngram_draft(x.token_ids, x.num_draft_tokens, self.min_n, self.max_n) for x in inputs]

    def release(self, request_id: str) -> None:
        """Nothing is kept per sequence."""
