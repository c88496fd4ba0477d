"""Sizes computed from a config: parameters, bytes per process, cache per token and per sequence.

Counts come from the modules themselves (the head model built on the meta device) plus the routed
experts' shapes, so they follow the config and never a typed-in number. A fine-grained FP8 checkpoint
(config.quantization) counts its routed experts as workers hold them: 1 byte per weight plus a float32
scale per block (~0.50x bf16); its heads dequantize at load, so head bytes stay in the model dtype.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from nextserve.model.config import LayerType, Qwen3NextConfig
from nextserve.model.kernels.fp8_block import FP8_DTYPE, scale_grid
from nextserve.model.qwen3_next import HeadModel


@dataclass(frozen=True)
class ModelSizes:
    total_params: int
    """The target model's parameters (what transformers loads: the MTP layers are `mtp_params`)."""
    active_params: int
    """Parameters one token touches in the target model: everything but the routed experts, plus top-k
    routed experts per MoE layer."""
    head_params: int
    """Everything a head replica holds (all but the routed experts; the MTP layers' fc, norms, attention,
    router gate and shared expert included)."""
    mtp_params: int
    """The checkpoint's MTP layers (`mtp.*`), routed experts included; 0 without them."""
    routed_expert_params: int
    """One routed expert: gate, up and down."""
    num_routed_experts: int
    """Routed experts over all MoE layers, the MTP layers' included (what the expert workers hold)."""
    dtype_bytes: int
    routed_expert_weight_bytes: int
    """Bytes per routed-expert weight as workers hold it: the model dtype's, or 1 for an FP8 checkpoint."""
    routed_expert_scale_bytes: int
    """One routed expert's float32 block scales (FP8 checkpoints; 0 otherwise)."""
    bytes_per_routed_expert: int
    bytes_all_routed_experts: int
    bytes_per_head_replica: int
    kv_bytes_per_token: int
    """K and V of every full-attention layer and MTP layer (its rows share the sequence's blocks), in the
    model dtype."""
    deltanet_state_bytes_per_sequence: int
    """Recurrent state (fp32, as cached) plus conv state (K columns, model dtype), all DeltaNet layers."""
    dispatch_bytes_per_token: int
    """Hidden state to each of top-k experts and back, every MoE layer of the target model: the upper bound
    with no token dedup (one expert per worker). An MTP draft step adds one layer's worth."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def count_head_params(config: Qwen3NextConfig) -> tuple[int, int]:
    """(all the head's parameters, those of its MTP layers)."""
    with torch.device("meta"):
        head = HeadModel(config)
    mtp = 0 if head.mtp is None else sum(p.numel() for p in head.mtp.parameters())
    return sum(p.numel() for p in head.parameters()), mtp


def routed_expert_scale_count(config: Qwen3NextConfig) -> int:
    """Block scales of one routed expert in an FP8 checkpoint: gate and up [I, H], down [H, I]."""
    if config.quantization is None:
        return 0
    H, I, block = config.hidden_size, config.moe_intermediate_size, config.quantization.weight_block_size
    gate = scale_grid(I, H, block)
    down = scale_grid(H, I, block)
    return 2 * gate[0] * gate[1] + down[0] * down[1]


def model_sizes(config: Qwen3NextConfig, dtype: torch.dtype = torch.bfloat16) -> ModelSizes:
    nbytes = torch.empty(0, dtype=dtype).element_size()
    H, I = config.hidden_size, config.moe_intermediate_size
    per_expert = 3 * H * I
    expert_nbytes = nbytes if config.quantization is None else FP8_DTYPE.itemsize
    expert_bytes = per_expert * expert_nbytes + routed_expert_scale_count(config) * torch.float32.itemsize
    num_moe = len(config.moe_layers)
    num_routed = len(config.expert_layers) * config.num_experts
    num_mtp_routed = num_routed - num_moe * config.num_experts
    head, mtp_head = count_head_params(config)
    n_full = sum(t is LayerType.FULL_ATTENTION for t in config.layer_types)
    n_linear = config.num_hidden_layers - n_full
    kv = (n_full + len(config.mtp_layers)) * 2 * config.num_key_value_heads * config.head_dim * nbytes
    recurrent = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
    conv = config.linear_conv_dim * config.linear_conv_kernel_dim * nbytes
    return ModelSizes(
        total_params=head - mtp_head + num_moe * config.num_experts * per_expert,
        active_params=head - mtp_head + num_moe * config.num_experts_per_tok * per_expert,
        head_params=head,
        mtp_params=mtp_head + num_mtp_routed * per_expert,
        routed_expert_params=per_expert,
        num_routed_experts=num_routed,
        dtype_bytes=nbytes,
        routed_expert_weight_bytes=expert_nbytes,
        routed_expert_scale_bytes=routed_expert_scale_count(config) * torch.float32.itemsize,
        bytes_per_routed_expert=expert_bytes,
        bytes_all_routed_experts=num_routed * expert_bytes,
        bytes_per_head_replica=head * nbytes,
        kv_bytes_per_token=kv,
        deltanet_state_bytes_per_sequence=n_linear * (recurrent + conv),
        dispatch_bytes_per_token=num_moe * config.num_experts_per_tok * H * nbytes * 2,
    )
