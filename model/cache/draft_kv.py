"""The keys and values one round of speculative draft steps attends to (the MTP drafter's).

A draft row is a guess until the target model verifies it, so it never enters the paged pools
(model/cache/pools.py), which hold only rows of accepted positions: the round gathers each sequence's rows
of the MTP layer's pool once into a dense buffer, masked past the sequence's length, and appends each
draft step's own K/V to it. The buffer is dropped at the end of the round.

Letters: B = drafting sequences, L = longest cached length (whole blocks) + draft rows so far,
nh / nkv = query / kv heads, hd = head dim, bs = block size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nextserve.model.cache.pools import HybridCache


class DraftKV:
    def __init__(self, cache: HybridCache, layer: int, blocks: Tensor, lengths: Tensor) -> None:
        """blocks [B, nb] each sequence's blocks (its block-table row, cut to the longest), lengths [B] int64
        the rows each has in the pool (positions 0 .. length - 1)."""
        B, nb = blocks.shape
        key, value = cache.gather_kv(layer, blocks.flatten())  # [B·nb, bs, nkv, hd], a shared workspace
        L = nb * cache.block_size
        self.key = key.reshape(B, L, *key.shape[2:]).transpose(1, 2).clone()  # [B, nkv, L, hd]
        self.value = value.reshape(B, L, *value.shape[2:]).transpose(1, 2).clone()
        self.mask = torch.arange(L, device=blocks.device) < lengths[:, None]  # [B, L]

    def append_and_attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [B, nh, hd]; this step's k, v [B, nkv, hd] are appended, then each query attends to its
        sequence's rows and the round's rows so far -> [B, nh·hd]."""
        B, nh, hd = q.shape
        self.key = torch.cat((self.key, k[:, :, None]), dim=2)
        self.value = torch.cat((self.value, v[:, :, None]), dim=2)
        self.mask = torch.cat((self.mask, self.mask.new_ones(B, 1)), dim=1)
        o = F.scaled_dot_product_attention(q[:, :, None], self.key, self.value, attn_mask=self.mask[:, None, None],
                                           scale=hd ** -0.5, enable_gqa=True)  # [B, nh, 1, hd]
        return o.reshape(B, nh * hd)
