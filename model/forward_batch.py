"""What one batched step hands every layer: which tokens belong to which sequence, and their caches.

T = total new tokens of the step (flattened over sequences). A sequence may bring a prefill chunk or
one decode token; its state lives in its own `SequenceCache`, never padded into another's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nextserve.model.cache import SequenceCache


Group = tuple[tuple[int, ...], Tensor]
"""(sequence indices, their token rows [B, t]) of sequences bringing t tokens each."""


@dataclass(frozen=True)
class ForwardBatch:
    seq_lens: tuple[int, ...]
    """New tokens per sequence in this step."""
    caches: tuple[SequenceCache, ...]
    positions: Tensor
    """[T] int64 absolute position of every new token."""
    starts: tuple[int, ...]
    """Offset of each sequence's first token in the flattened T."""
    # How the mixers batch the step, worked out once here, not again in each of the layers:
    decode_seqs: tuple[int, ...]
    """Sequences decoding one token after a cached prefix (their states are batched together)."""
    decode_rows: Tensor
    """[B_dec] int64 token row of each of them."""
    chunk_groups: tuple[Group, ...]
    """The other sequences (prompt chunks), grouped by length: one batched chunk each."""
    fresh_groups: tuple[Group, ...]
    """Of those, the ones with nothing cached yet (first chunks), grouped by length."""

    @classmethod
    def build(cls, seq_lens: list[int], caches: list[SequenceCache], device: torch.device) -> "ForwardBatch":
        if len(seq_lens) != len(caches):
            raise ValueError(f"{len(seq_lens)} sequence lengths for {len(caches)} caches")
        if any(n < 1 for n in seq_lens):
            raise ValueError(f"every sequence must bring >= 1 new token, got {seq_lens}")
        starts, pos, offset = [], [], 0
        for n, cache in zip(seq_lens, caches):
            starts.append(offset)
            pos.append(torch.arange(cache.num_cached_tokens, cache.num_cached_tokens + n, dtype=torch.int64))
            offset += n
        positions = torch.cat(pos).to(device) if pos else torch.zeros(0, dtype=torch.int64, device=device)
        decode = [i for i, (n, c) in enumerate(zip(seq_lens, caches)) if n == 1 and c.num_cached_tokens > 0]
        is_decode = set(decode)
        chunks = [i for i in range(len(seq_lens)) if i not in is_decode]
        return cls(tuple(seq_lens), tuple(caches), positions, tuple(starts), tuple(decode),
                   torch.tensor([starts[i] for i in decode], dtype=torch.int64, device=device),
                   _by_length(chunks, seq_lens, starts, device),
                   _by_length([i for i in chunks if caches[i].num_cached_tokens == 0], seq_lens, starts, device))

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    def spans(self) -> list[tuple[int, int, int]]:
        """(sequence index, start, end) of each sequence's tokens in the flattened T."""
        return [(i, s, s + n) for i, (s, n) in enumerate(zip(self.starts, self.seq_lens))]

    def last_token_index(self) -> Tensor:
        """[B] index of each sequence's last new token in the flattened T."""
        return torch.tensor([s + n - 1 for s, n in zip(self.starts, self.seq_lens)], dtype=torch.int64,
                            device=self.positions.device)


def _by_length(seqs: list[int], seq_lens: list[int], starts: list[int], device: torch.device) -> tuple[Group, ...]:
    groups: dict[int, list[int]] = {}
    for i in seqs:
        groups.setdefault(seq_lens[i], []).append(i)
    return tuple((tuple(g), torch.stack([torch.arange(starts[i], starts[i] + n) for i in g]).to(device))
                 for n, g in groups.items())
