"""What one batched step hands every layer: which tokens belong to which sequence, and where each
sequence's cache lives in the pools (model/cache/pools.py).

T = total new tokens of the step (flattened over sequences), B = sequences, bs = block size,
L = longest cached length among the step's decodes (rounded up to whole blocks), R = logit rows. A
sequence brings a prefill chunk, one decode token, or a verify chunk (speculative decoding: its last
token and k drafts, k + 1 tokens with logits at every one); its states sit in its slot and its K/V in its
blocks, so every mixer reads and writes all sequences by index tensors worked out here once, not again
in each layer.

A verify chunk attends like a chunk continuing a cached prefix; its DeltaNet layers step it token by
token (the decode arithmetic) and keep the state after every position in `verify_states`, so the runner
can roll a sequence back to its last accepted position (cluster/engine/model_runner.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from nextserve.model.cache.pools import HybridCache


@dataclass(frozen=True, slots=True)
class ChunkGroup:
    """Sequences bringing t > 1 tokens each (or a first chunk of any length), run as one chunked batch."""
    seqs: tuple[int, ...]
    rows: Tensor
    """[B, t] token rows of each sequence."""
    slots: Tensor
    """[B] their state slots."""


@dataclass(frozen=True, slots=True)
class PrefixChunk:
    """A chunk continuing a cached prefix: its queries attend to all `length` tokens in its blocks."""
    start: int
    end: int
    blocks: Tensor
    """[ceil(length / bs)] the sequence's blocks, in order."""
    length: int


@dataclass(frozen=True)
class ForwardBatch:
    seq_lens: tuple[int, ...]
    """New tokens per sequence in this step."""
    cache: HybridCache
    positions: Tensor
    """[T] int64 absolute position of every new token."""
    kv_index: Tensor
    """[T] int64 row of every new token's K/V in a layer's pool viewed as [N·bs, nkv, hd]."""
    starts: tuple[int, ...]
    """Offset of each sequence's first token in the flattened T."""
    decode_seqs: tuple[int, ...]
    """Sequences decoding one token after a cached prefix (their states are batched together), in
    the order of their slots."""
    decode_rows: Tensor
    """[B_dec] int64 token row of each of them."""
    decode_slots: Tensor | slice
    """Their state slots: a slice when they are one run of slots (the states are then read and updated
    in place in the pools, no copy), else [B_dec] int64."""
    decode_blocks: Tensor
    """[B_dec, L / bs] int64 their block tables, cut to the longest of them."""
    decode_mask: Tensor
    """[B_dec, 1, 1, L] bool: key j is one of the sequence's tokens (j < its length after this step)."""
    chunk_groups: tuple[ChunkGroup, ...]
    """The other sequences (prompt chunks), grouped by length: one batched chunk each."""
    fresh_groups: tuple[ChunkGroup, ...]
    """Of those, the ones with nothing cached yet (first chunks), grouped by length."""
    fresh_slots: Tensor
    """[B_fresh] slots of the first chunks: their states start at zero."""
    prefix_chunks: tuple[PrefixChunk, ...]
    """The chunks (t > 1) continuing a cached prefix (verify chunks included)."""
    verify_groups: tuple[ChunkGroup, ...] = ()
    """The verify chunks, grouped by length (not in chunk_groups: DeltaNet steps them token by token)."""
    logit_rows: Tensor | None = None
    """[R] the tokens whose logits the step returns: each sequence's last, every one of a verify chunk."""
    verify_states: dict[tuple[int, int], tuple[Tensor, Tensor]] = field(default_factory=dict)
    """(DeltaNet layer, index in verify_groups) -> the group's states after each of its t positions:
    conv [B, t, C, K] and recurrent [B, t, nv, dk, dv], written by the layer during the forward."""

    @classmethod
    def build(cls, seq_lens: list[int], num_cached: list[int], slots: list[int], cache: HybridCache,
              is_verify: list[bool] | None = None) -> "ForwardBatch":
        """seq_lens: new tokens per sequence; num_cached: tokens each already holds in the cache (the
        position of its first new token); slots: each one's slot, whose block-table row covers
        num_cached + seq_len tokens; is_verify: which sequences bring a verify chunk (default none).
        The caller advances its own counts after the forward."""
        is_verify = is_verify or [False] * len(seq_lens)
        if not len(seq_lens) == len(num_cached) == len(slots) == len(is_verify):
            raise ValueError(f"{len(seq_lens)} sequence lengths, {len(num_cached)} cached counts, {len(slots)} slots, "
                             f"{len(is_verify)} verify flags")
        if any(n < 1 for n in seq_lens):
            raise ValueError(f"every sequence must bring >= 1 new token, got {seq_lens}")
        if any(v and c == 0 for v, c in zip(is_verify, num_cached)):
            raise ValueError(f"a verify chunk continues a cached sequence, got num_cached {num_cached} for "
                             f"is_verify {is_verify}")
        device, bs = cache.device, cache.block_size
        to = dict(dtype=torch.int64, device=device)
        starts = list(itertools.accumulate(seq_lens, initial=0))[:-1]
        positions = torch.tensor([p for n, c in zip(seq_lens, num_cached) for p in range(c, c + n)], **to)
        token_slots = torch.tensor([s for n, s in zip(seq_lens, slots) for _ in range(n)], **to)
        decode = sorted((i for i, (n, c) in enumerate(zip(seq_lens, num_cached)) if n == 1 and c > 0),
                        key=slots.__getitem__)
        verify = [i for i, v in enumerate(is_verify) if v and i not in decode]
        chunks = sorted(set(range(len(seq_lens))) - set(decode))
        fresh = [i for i in chunks if num_cached[i] == 0]
        logit_rows = [r for i, (s, n) in enumerate(zip(starts, seq_lens))
                      for r in (range(s, s + n) if is_verify[i] else (s + n - 1,))]
        decode_slots = _run_or_index([slots[i] for i in decode], device)
        lengths = [num_cached[i] + 1 for i in decode]
        num_blocks = -(-max(lengths, default=0) // bs)
        return cls(
            seq_lens=tuple(seq_lens), cache=cache, positions=positions,
            kv_index=cache.block_table[token_slots, positions // bs] * bs + positions % bs,
            starts=tuple(starts), decode_seqs=tuple(decode),
            decode_rows=torch.tensor([starts[i] for i in decode], **to), decode_slots=decode_slots,
            decode_blocks=cache.block_table[decode_slots, :num_blocks],
            decode_mask=(torch.arange(num_blocks * bs, device=device)
                         < torch.tensor(lengths, **to)[:, None])[:, None, None],
            chunk_groups=_by_length([i for i in chunks if i not in verify], seq_lens, starts, slots, device),
            fresh_groups=_by_length(fresh, seq_lens, starts, slots, device),
            fresh_slots=torch.tensor([slots[i] for i in fresh], **to),
            prefix_chunks=tuple(_prefix_chunk(cache, starts[i], seq_lens[i], num_cached[i], slots[i])
                                for i in chunks if num_cached[i] > 0),
            verify_groups=_by_length(verify, seq_lens, starts, slots, device),
            logit_rows=torch.tensor(logit_rows, **to))

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    def logit_index(self) -> Tensor:
        """[R] rows of the flattened T whose logits the step returns (`logit_rows`)."""
        return self.last_token_index() if self.logit_rows is None else self.logit_rows

    def last_token_index(self) -> Tensor:
        """[B] index of each sequence's last new token in the flattened T."""
        return torch.tensor([s + n - 1 for s, n in zip(self.starts, self.seq_lens)], dtype=torch.int64,
                            device=self.positions.device)


def _prefix_chunk(cache: HybridCache, start: int, n: int, cached: int, slot: int) -> PrefixChunk:
    length = cached + n
    return PrefixChunk(start, start + n, cache.block_table[slot, :-(-length // cache.block_size)], length)


def _run_or_index(slots: list[int], device: torch.device) -> Tensor | slice:
    if slots and slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return torch.tensor(slots, dtype=torch.int64, device=device)


def _by_length(seqs: list[int], seq_lens: list[int], starts: list[int], slots: list[int],
               device: torch.device) -> tuple[ChunkGroup, ...]:
    groups: dict[int, list[int]] = {}
    for i in seqs:
        groups.setdefault(seq_lens[i], []).append(i)
    return tuple(ChunkGroup(tuple(g), torch.tensor([list(range(starts[i], starts[i] + n)) for i in g],
                                                   dtype=torch.int64, device=device),
                            torch.tensor([slots[i] for i in g], dtype=torch.int64, device=device))
                 for n, g in groups.items())
