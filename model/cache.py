"""Per-sequence hybrid cache: KV for full-attention layers, conv + fp32 recurrent state for DeltaNet.

One `SequenceCache` per sequence, so sequences at different positions share a batched step without
padding one sequence's state into another's (continuous batching). Freed by dropping the object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from model.config import Qwen3NextConfig


@dataclass(slots=True)
class DeltaNetState:
    conv: Tensor
    """[C, K] the last K pre-conv inputs, channels in [Q | K | V] order, model dtype."""
    recurrent: Tensor
    """[nv, dk, dv] fp32 (transformers keeps it fp32 even for bf16 models)."""


@dataclass(slots=True)
class KVCache:
    key: Tensor
    """[nkv, L, hd] post-norm, post-RoPE keys."""
    value: Tensor
    """[nkv, L, hd]"""


@dataclass(slots=True)
class SequenceCache:
    layers: list[DeltaNetState | KVCache | None] = field(default_factory=list)
    num_tokens: int = 0
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
                total += entry.key.nbytes + entry.value.nbytes
        return total
