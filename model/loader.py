"""Build the processes' pieces from a checkpoint: the head model, or a set of routed experts.

A fine-grained FP8 checkpoint: the head dequantizes its FP8 weights at load (they are small: ~3 GiB
in bf16 for Qwen3-Coder-Next); routed experts stay FP8 with their block scales (`Fp8Experts`, half
the bytes of bf16), dequantized per call or run on FP8 GEMMs (model/layers/experts.py).
Letters: n = experts loaded for a layer, I = moe intermediate, H = hidden.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from nextserve.model.checkpoint import (EXPERT_KEY, FUSED_EXPERT_KEY, MTP_KEY, Checkpoint, CheckpointError,
                                        check_shapes, layer_prefix, parse_dtype)
from nextserve.model.config import Qwen3NextConfig
from nextserve.model.kernels.fp8_block import dequantize_blocks
from nextserve.model.layers.experts import ExpertWeights, Fp8Experts
from nextserve.model.layers.rope import PartialRotaryEmbedding
from nextserve.model.quantization import SCALE_SUFFIX
from nextserve.model.qwen3_next import HeadModel


@dataclass(frozen=True)
class LayerExperts:
    """One layer's loaded experts, stacked for batched compute."""
    expert_ids: tuple[int, ...]  # global expert id of each stacked row
    gate_up: ExpertWeights  # [n, 2I, H], gate rows first (FP8: [n, 2, I, H] + scales)
    down: ExpertWeights     # [n, H, I] (FP8: [n, 1, H, I] + scales)


def load_head(path: str | Path, dtype: str | torch.dtype = "float32",
              device: str | torch.device = "cpu", mtp: bool = True) -> HeadModel:
    """The head model's tensors only (routed experts are never read), with the checkpoint's MTP layer
    (`head.mtp`: its fc, norms, attention, router gate and shared expert) when it has one and `mtp`;
    `mtp` False leaves it out (config.num_nextn_predict_layers 0: no MTP K/V pool either)."""
    return _build_head(Checkpoint(path), parse_dtype(dtype), device, mtp)


def validate_checkpoint(path: str | Path, dtype: str | torch.dtype = "float32") -> None:
    """What loading the head and every routed expert would check (names, shapes, dtypes, FP8 scales),
    from the shards' headers only: a checkpoint the heads or workers cannot load fails here with the
    same CheckpointError, before anything is deployed (`nextserve up`)."""
    ckpt = Checkpoint(path, is_meta=True)
    torch_dtype = parse_dtype(dtype)
    _build_head(ckpt, torch_dtype, "meta", mtp=True)
    for layer in ckpt.config.expert_layers:
        _load_layer(ckpt, ckpt.config, layer, list(range(ckpt.config.num_experts)), torch_dtype)


def _build_head(ckpt: Checkpoint, torch_dtype: torch.dtype, device: str | torch.device, mtp: bool) -> HeadModel:
    config = ckpt.config if mtp else dataclasses.replace(ckpt.config, num_nextn_predict_layers=0)
    with torch.device("meta"):
        head = HeadModel(config)
    expected = {k: v.shape for k, v in head.state_dict().items()}
    for key in ckpt.key_to_file:
        weight = key.removesuffix(SCALE_SUFFIX) + "weight" if key.endswith(SCALE_SUFFIX) else key
        if weight not in expected and not EXPERT_KEY.match(weight) and not FUSED_EXPERT_KEY.match(key) \
                and not (MTP_KEY.match(key) and not config.has_mtp):
            raise CheckpointError(f"unexpected tensor {key!r} in {ckpt.file_of(key)}: not part of a "
                                  f"Qwen3-Next model with this config.json")
    fp8 = [k for k in expected if ckpt.is_fp8(k)]
    tensors = ckpt.read([k for k in expected if k not in fp8], torch_dtype)
    check_shapes(ckpt, tensors, {k: v for k, v in expected.items() if k not in fp8})
    for key, (weight, scale) in ckpt.read_fp8(fp8, expected).items():
        tensors[key] = dequantize_blocks(weight, scale, ckpt.fp8_scheme(key).weight_block_size, torch_dtype)
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
    if fused in ckpt.key_to_file and ckpt.config.quantization is not None:
        raise CheckpointError(f"tensor {fused!r} in {ckpt.file_of(fused)}: fused expert tensors in an FP8 checkpoint "
                              f"are not supported; save the experts per expert (mlp.experts.E.gate_proj.weight + "
                              f"weight_scale_inv), the layout of the published FP8 releases")
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
    if any(ckpt.is_fp8(k) for k in expected):
        return _load_fp8_layer(ckpt, prefix, experts, expected, dtype)
    t = ckpt.read(expected, dtype)
    check_shapes(ckpt, t, expected)
    gate_up = torch.stack([torch.cat((t[f"{prefix}.{e}.gate_proj.weight"], t[f"{prefix}.{e}.up_proj.weight"]))
                           for e in experts])
    down = torch.stack([t[f"{prefix}.{e}.down_proj.weight"] for e in experts])
    return LayerExperts(tuple(experts), gate_up, down)



def _load_fp8_layer(ckpt: Checkpoint, prefix: str, experts: list[int], expected: dict[str, torch.Size],
                    dtype: torch.dtype) -> LayerExperts:
    """One layer's experts kept in FP8 with their scales: gate_up [n, 2, I, H], down [n, 1, H, I]."""
    pairs = ckpt.read_fp8(expected, expected)
    block = ckpt.fp8_scheme(next(iter(expected))).weight_block_size

    def stack(names: tuple[str, ...]) -> Fp8Experts:
        weight = torch.stack([torch.stack([pairs[f"{prefix}.{e}.{n}.weight"][0] for n in names]) for e in experts])
        scale = torch.stack([torch.stack([pairs[f"{prefix}.{e}.{n}.weight"][1] for n in names]) for e in experts])
        return Fp8Experts(weight, scale, block, dtype)

    return LayerExperts(tuple(experts), stack(("gate_proj", "up_proj")), stack(("down_proj",)))
