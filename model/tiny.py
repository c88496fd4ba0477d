"""The tiny default checkpoint: a deterministic, small Qwen3-Next in the exact Hugging Face layout.

8 layers in the 3:1 DeltaNet:attention pattern, 64 experts top-4 plus a shared expert, the real
model's proportions at 1/8 width (experts' intermediate = hidden / 4, GQA 2:1 ... ), random weights
from a fixed seed, saved by transformers' own `save_pretrained` (per-expert tensors, sharded with an
index) next to a byte-level BPE tokenizer trained on the standard library, whose chat template renders
tools, tool calls and tool results as Qwen3-Coder's does. A 64K context (`max_position_embeddings`; the rope
is computed, no weight depends on it) holds an agent's prompt. `make_tiny(DIR)` twice gives the same bytes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen3NextConfig as HFConfig
from transformers import Qwen3NextForCausalLM

from nextserve.model.tiny_tokenizer import train_tiny_tokenizer

log = logging.getLogger(__name__)

TINY_VERSION = "v2"
"""Bump when the tiny model changes, so cached copies are rebuilt (v2: 64K context, tool-call tokens and a
chat template that renders tools the Qwen3-Coder way)."""
TINY_SEED = 20261129
TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=2048, hidden_size=256, intermediate_size=640, num_hidden_layers=8,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32,
    linear_conv_kernel_dim=4, num_experts=64, num_experts_per_tok=4, moe_intermediate_size=64,
    shared_expert_intermediate_size=64, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.25},
    max_position_embeddings=65536, rms_norm_eps=1e-6, tie_word_embeddings=False,
    pad_token_id=0, bos_token_id=None, eos_token_id=2,
)
TINY_SHARD_SIZE = "8MB"
"""Small shards so the tiny checkpoint exercises the sharded index like the real one (~40 shards)."""


def _perturb(model: Qwen3NextForCausalLM, gen: torch.Generator) -> None:
    """Norm weights, A_log and dt_bias initialise to constants; give them spread like trained ones."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            elif name.endswith("A_log"):
                p.copy_(torch.log(torch.empty(p.shape).uniform_(0.5, 8.0, generator=gen)))
            elif name.endswith("dt_bias"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def make_tiny(out_dir: str | Path, pad_vocab: int = 0) -> Path:
    """Write the tiny checkpoint (config, sharded safetensors + index, tokenizer, chat template).
    `pad_vocab` > 0: the embedding and lm_head get that many rows past the tokenizer's 2048, as
    Qwen3-Coder-Next's do (151,936 rows for 151,669 tokens); the tokenizer is the same."""
    if pad_vocab < 0:
        raise ValueError(f"pad_vocab must be >= 0, got {pad_vocab}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(TINY_SEED)
    config = HFConfig(**{**TINY_CONFIG, "vocab_size": TINY_CONFIG["vocab_size"] + pad_vocab})
    model = Qwen3NextForCausalLM(config).to(torch.bfloat16).eval()
    _perturb(model, torch.Generator().manual_seed(TINY_SEED + 1))
    model.save_pretrained(out, max_shard_size=TINY_SHARD_SIZE)
    train_tiny_tokenizer(out, vocab_size=TINY_CONFIG["vocab_size"])
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": TINY_CONFIG["eos_token_id"], "pad_token_id": 0, "do_sample": False}, indent=2) + "\n")
    (out / "NEXTSERVE_TINY").write_text(TINY_VERSION + "\n")
    log.info("wrote the tiny checkpoint to %s", out)
    return out


def ensure_tiny(cache_dir: str | Path) -> Path:
    """The tiny checkpoint under `cache_dir`, made on first use (or when its version changed)."""
    path = Path(cache_dir) / f"tiny-{TINY_VERSION}"
    marker = path / "NEXTSERVE_TINY"
    if not (marker.exists() and marker.read_text().strip() == TINY_VERSION):
        make_tiny(path)
    return path
