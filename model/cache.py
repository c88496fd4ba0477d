"""Per-sequence hybrid cache: KV for full-attention layers, conv + fp32 recurrent state for DeltaNet.

One `SequenceCache` per sequence, so sequences at different positions share a batched step without
padding one sequence's state into another's (continuous batching). Freed by dropping the object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from nextserve.model.config import Qwen3NextConfig


@dataclass(slots=True)
class DeltaNetState:
    conv: Tensor
    """[C, K] the last K pre-conv inputs, channels in [Q | K | V] order, model dtype."""
    recurrent: Tensor
    """[nv, dk, dv] fp32 (transformers keeps it fp32 even for bf16 models)."""


@dataclass(slots=True)
class KVCache:
    """Keys and values of one sequence's full-attention layer, in a buffer that doubles when full, so a
    decode step appends in place instead of copying the whole cache (L = length <= capacity)."""
    key_buffer: Tensor
    """[nkv, capacity, hd] post-norm, post-RoPE keys; rows past `length` are unused."""
    value_buffer: Tensor
    """[nkv, capacity, hd]"""
    length: int = 0

    @classmethod
    def of(cls, key: Tensor, value: Tensor) -> "KVCache":
        """A cache holding key / value [nkv, t, hd] (copied into a buffer of their own)."""
        cache = cls(key.new_empty(key.shape), value.new_empty(value.shape))
        cache.append(key, value)
        return cache

    @property
    def key(self) -> Tensor:  # [nkv, L, hd]
        return self.key_buffer[:, :self.length]

    @property
    def value(self) -> Tensor:  # [nkv, L, hd]
        return self.value_buffer[:, :self.length]

    def append(self, key: Tensor, value: Tensor) -> None:
        """key / value [nkv, t, hd] after the cached ones."""
        end = self.length + key.shape[1]
        if end > self.key_buffer.shape[1]:
            capacity = max(end, 2 * self.key_buffer.shape[1])
            for name in ("key_buffer", "value_buffer"):
                old = getattr(self, name)
                grown = old.new_empty(old.shape[0], capacity, old.shape[2])
                grown[:, :self.length] = old[:, :self.length]
                setattr(self, name, grown)
        self.key_buffer[:, self.length:end] = key
        self.value_buffer[:, self.length:end] = value
        self.length = end


@dataclass(slots=True)
class SequenceCache:
    layers: list[DeltaNetState | KVCache | None] = field(default_factory=list)
    num_cached_tokens: int = 0
    """Tokens already processed: the position of the next token."""

    @classmethod
    def empty(cls, config: Qwen3NextConfig) -> "SequenceCache":
        return cls(layers=[None] * config.num_hidden_layers)

    def nbytes(self) -> int:
        total = 0
        for entry in self.layers:
            if isinstance(entry, DeltaNetState):
                total += entry.conv.nbytes + entry.recurrent.nbytes
            elif isinstance(entry, KVCache):
                total += entry.key_buffer.nbytes + entry.value_buffer.nbytes
        return total
