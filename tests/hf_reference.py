"""Build transformers' own Qwen3NextForCausalLM at random weights and save it: the reference no one
here wrote. Norm weights, A_log and dt_bias are perturbed (they initialise to constants)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Qwen3NextConfig as HFConfig
from transformers import Qwen3NextForCausalLM

SMALL: dict[str, Any] = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4, num_experts=16,
    num_experts_per_tok=4, moe_intermediate_size=32, shared_expert_intermediate_size=48,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    max_position_embeddings=512, eos_token_id=2, pad_token_id=0, bos_token_id=1, initializer_range=0.08,
)

# Awkward sizes: full attention every 3rd layer, 13 experts (not a power of two), head dims 20/24,
# nv = 2·nk, a dense MLP layer and a non-default theta.
AWKWARD: dict[str, Any] = dict(
    vocab_size=301, hidden_size=40, intermediate_size=56, num_hidden_layers=6, num_attention_heads=6,
    num_key_value_heads=2, head_dim=20, linear_num_key_heads=3, linear_num_value_heads=6,
    linear_key_head_dim=24, linear_value_head_dim=20, linear_conv_kernel_dim=4, num_experts=13,
    num_experts_per_tok=3, moe_intermediate_size=24, shared_expert_intermediate_size=28,
    layer_types=["linear_attention", "linear_attention", "full_attention"] * 2, mlp_only_layers=[4],
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.4},
    max_position_embeddings=512, eos_token_id=2, pad_token_id=0, bos_token_id=1, norm_topk_prob=True,
    initializer_range=0.08,
)


def build_reference(overrides: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32) -> Qwen3NextForCausalLM:
    torch.manual_seed(seed)
    config = HFConfig(**overrides)
    model = Qwen3NextForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(0.5, 8.0)))
            elif name.endswith("dt_bias"):
                p.add_(torch.randn_like(p) * 0.3)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.3)  # spread the router so top-k is not a near tie
    # generate() runs to max_new_tokens (no EOS stop), like nextserve's ignore_eos; min_new_tokens
    # would instead mask EOS out of the argmax and change the tokens.
    model.generation_config.eos_token_id = None
    return model


def save_reference(model: Qwen3NextForCausalLM, path: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def hf_greedy(model: Qwen3NextForCausalLM, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `prompt`, `n` tokens (no EOS stop on a reference model)."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()
