"""The tiny default checkpoint: a deterministic, small Qwen3-Next in the exact Hugging Face layout.

8 layers in the 3:1 DeltaNet:attention pattern, 64 experts top-4 plus a shared expert, one MTP layer
(`mtp.*`, as the published checkpoints carry: transformers ignores it), the real model's proportions at 1/8 width (experts' intermediate = hidden / 4, GQA 2:1 ... ), random weights
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
from safetensors.torch import save_file
from transformers import Qwen3NextConfig as HFConfig
from transformers import Qwen3NextForCausalLM

from nextserve.model.tiny_tokenizer import train_tiny_tokenizer

log = logging.getLogger(__name__)

TINY_VERSION = "v3"
"""Bump when the tiny model changes, so cached copies are rebuilt (v2: 64K context, tool-call tokens and a
chat template that renders tools the Qwen3-Coder way; v3: an MTP layer)."""
TINY_SEED = 20261129
TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=2048, hidden_size=256, intermediate_size=640, num_hidden_layers=8,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32,
    linear_conv_kernel_dim=4, num_experts=64, num_experts_per_tok=4, moe_intermediate_size=64,
    shared_expert_intermediate_size=64, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.25},
    max_position_embeddings=65536, rms_norm_eps=1e-6, tie_word_embeddings=False,
    pad_token_id=0, bos_token_id=None, eos_token_id=2, num_nextn_predict_layers=1,
)
MTP_FILE = "model-mtp.safetensors"
"""The shard holding the `mtp.*` tensors (transformers' save_pretrained knows nothing of them)."""
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


def mtp_tensors(config: HFConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random MTP layer(s) in the checkpoint layout (per-expert routed weights, like the saved backbone):
    each decoder layer is transformers' own full-attention layer at its initialisation (a 1-layer model
    built from `seed`), `mtp.fc` [H, 2H] normal(0, initializer_range), the norms perturbed like _perturb's."""
    H, I = config.hidden_size, config.moe_intermediate_size
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for j in range(config.num_nextn_predict_layers):
        torch.manual_seed(seed + 1 + j)
        one = Qwen3NextForCausalLM(HFConfig(**{**config.to_dict(), "num_hidden_layers": 1,
                                               "layer_types": ["full_attention"]}))
        _perturb(one, gen)
        for name, tensor in one.model.layers[0].state_dict().items():
            if name == "mlp.experts.gate_up_proj":
                for e in range(tensor.shape[0]):
                    out[f"mtp.layers.{j}.mlp.experts.{e}.gate_proj.weight"] = tensor[e, :I]
                    out[f"mtp.layers.{j}.mlp.experts.{e}.up_proj.weight"] = tensor[e, I:]
            elif name == "mlp.experts.down_proj":
                for e in range(tensor.shape[0]):
                    out[f"mtp.layers.{j}.mlp.experts.{e}.down_proj.weight"] = tensor[e]
            else:
                out[f"mtp.layers.{j}.{name}"] = tensor
    out["mtp.fc.weight"] = torch.randn(H, 2 * H, generator=gen) * config.initializer_range
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        out[f"mtp.{name}.weight"] = torch.randn(H, generator=gen) * 0.1
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in out.items()}


def write_mtp(out_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Add `tensors` (mtp.*) to the checkpoint at out_dir: their own shard, named in the index."""
    save_file(tensors, out_dir / MTP_FILE, metadata={"format": "pt"})
    index_path = out_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("mtp.")}
    index["weight_map"].update({key: MTP_FILE for key in sorted(tensors)})
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


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
    write_mtp(out, mtp_tensors(config, TINY_SEED + 2))
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
