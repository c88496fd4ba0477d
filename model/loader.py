"""Build the processes' pieces from a checkpoint: the head model, or a set of routed experts.

Letters: n = experts loaded for a layer, I = moe intermediate, H = hidden.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from nextserve.model.checkpoint import (EXPERT_KEY, FUSED_EXPERT_KEY, MTP_KEY, Checkpoint, CheckpointError,
                                        check_shapes, layer_prefix, parse_dtype)
from nextserve.model.config import Qwen3NextConfig
from nextserve.model.layers.rope import PartialRotaryEmbedding
from nextserve.model.qwen3_next import HeadModel


@dataclass(frozen=True)
class LayerExperts:
    """One layer's loaded experts, stacked for batched compute."""
    expert_ids: tuple[int, ...]  # global expert id of each stacked row
    gate_up: Tensor  # [n, 2I, H], gate rows first
    down: Tensor     # [n, H, I]


def load_head(path: str | Path, dtype: str | torch.dtype = "float32",
              device: str | torch.device = "cpu", mtp: bool = True) -> HeadModel:
    """The head model's tensors only (routed experts are never read), with the checkpoint's MTP layer
    (`head.mtp`: its fc, norms, attention, router gate and shared expert) when it has one and `mtp`;
    `mtp` False leaves it out (config.num_nextn_predict_layers 0: no MTP K/V pool either)."""
    ckpt = Checkpoint(path)
    torch_dtype = parse_dtype(dtype)
    config = ckpt.config if mtp else dataclasses.replace(ckpt.config, num_nextn_predict_layers=0)
    with torch.device("meta"):
        head = HeadModel(config)
    expected = {k: v.shape for k, v in head.state_dict().items()}
    for key in ckpt.key_to_file:
        if key not in expected and not EXPERT_KEY.match(key) and not FUSED_EXPERT_KEY.match(key) \
                and not (MTP_KEY.match(key) and not config.has_mtp):
            raise CheckpointError(f"unexpected tensor {key!r} in {ckpt.file_of(key)}: not part of a "
                                  f"Qwen3-Next model with this config.json")
    tensors = ckpt.read(expected, torch_dtype)
    check_shapes(ckpt, tensors, expected)
    head.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=True, assign=True)
    head.rotary = PartialRotaryEmbedding(config.rotary_dim, config.rope_theta).to(device)
    return head.eval()


def load_experts(path: str | Path, pairs: Iterable[tuple[int, int]],
                 dtype: str | torch.dtype = "float32") -> dict[int, LayerExperts]:
    """Read only the (layer, expert) pairs asked for, opening only the shards that hold them."""
    ckpt = Checkpoint(path)
    config, torch_dtype = ckpt.config, parse_dtype(dtype)
    wanted: dict[int, list[int]] = defaultdict(list)
    for layer, expert in sorted(set(pairs)):
        if not config.is_moe_layer(layer):
            raise CheckpointError(f"layer {layer} has no routed experts (MoE layers: {list(config.expert_layers)})")
        if not 0 <= expert < config.num_experts:
            raise CheckpointError(f"expert {expert} is outside [0, {config.num_experts})")
        wanted[layer].append(expert)
    return {layer: _load_layer(ckpt, config, layer, experts, torch_dtype) for layer, experts in wanted.items()}


def _load_layer(ckpt: Checkpoint, config: Qwen3NextConfig, layer: int, experts: list[int],
                dtype: torch.dtype) -> LayerExperts:
    H, I = config.hidden_size, config.moe_intermediate_size
    prefix = f"{layer_prefix(config, layer)}.mlp.experts"
    fused = f"{prefix}.gate_up_proj"
    if fused in ckpt.key_to_file:
        gate_up = ckpt.read_slices(fused, experts, dtype)
        down = ckpt.read_slices(f"{prefix}.down_proj", experts, dtype)
        check_shapes(ckpt, {fused: gate_up[0]}, {fused: torch.Size([2 * I, H])})
        return LayerExperts(tuple(experts), gate_up, down)
    expected = {}
    for e in experts:
        expected[f"{prefix}.{e}.gate_proj.weight"] = torch.Size([I, H])
        expected[f"{prefix}.{e}.up_proj.weight"] = torch.Size([I, H])
        expected[f"{prefix}.{e}.down_proj.weight"] = torch.Size([H, I])
    t = ckpt.read(expected, dtype)
    check_shapes(ckpt, t, expected)
    gate_up = torch.stack([torch.cat((t[f"{prefix}.{e}.gate_proj.weight"], t[f"{prefix}.{e}.up_proj.weight"]))
                           for e in experts])
    down = torch.stack([t[f"{prefix}.{e}.down_proj.weight"] for e in experts])
    return LayerExperts(tuple(experts), gate_up, down)

