"""Sizes computed from a config: parameters, bytes per process, cache per token and per sequence.

Counts come from the modules themselves (the head model built on the meta device) plus the routed
experts' shapes, so they follow the config and never a typed-in number.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from nextserve.model.config import LayerType, Qwen3NextConfig
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


def model_sizes(config: Qwen3NextConfig, dtype: torch.dtype = torch.bfloat16) -> ModelSizes:
    nbytes = torch.empty(0, dtype=dtype).element_size()
    H, I = config.hidden_size, config.moe_intermediate_size
    per_expert = 3 * H * I
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
        bytes_per_routed_expert=per_expert * nbytes,
        bytes_all_routed_experts=num_routed * per_expert * nbytes,
        bytes_per_head_replica=head * nbytes,
        kv_bytes_per_token=kv,
        deltanet_state_bytes_per_sequence=n_linear * (recurrent + conv),
        dispatch_bytes_per_token=num_moe * config.num_experts_per_tok * H * nbytes * 2,
    )
