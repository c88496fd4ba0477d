"""Config reading and validation, and sizes computed from the published config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import Qwen3NextConfig as HFConfig

from hf_reference import AWKWARD
from nextserve.model.config import PUBLISHED_CONFIGS, ConfigError, LayerType, Qwen3NextConfig
from nextserve.model.sizes import model_sizes


def _write(tmp_path: Path, body: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(body))
    return tmp_path


def test_reads_what_transformers_saves(tmp_path: Path) -> None:
    HFConfig(**AWKWARD).save_pretrained(tmp_path)
    cfg = Qwen3NextConfig.from_json(tmp_path)
    assert cfg.layer_types[2] is LayerType.FULL_ATTENTION and cfg.layer_types[3] is LayerType.LINEAR_ATTENTION
    assert cfg.rope_theta == 500000.0 and cfg.partial_rotary_factor == 0.4 and cfg.rotary_dim == 8
    assert cfg.mlp_only_layers == (4,) and not cfg.is_moe_layer(4) and cfg.is_moe_layer(5)
    assert cfg.num_experts == 13 and cfg.head_dim == 20


def test_default_layer_types_and_sparse_step() -> None:
    cfg = Qwen3NextConfig.from_dict({"model_type": "qwen3_next", "num_hidden_layers": 8, "decoder_sparse_step": 2})
    assert [t is LayerType.FULL_ATTENTION for t in cfg.layer_types] == [False, False, False, True] * 2
    assert cfg.moe_layers == (1, 3, 5, 7)


@pytest.mark.parametrize("body, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"model_type": "qwen3_next", "num_hidden_layers": 4, "layer_types": ["full_attention"]}, "layer_types"),
    ({"model_type": "qwen3_next", "layer_types": ["linear_attention", "mamba"], "num_hidden_layers": 2},
     r"layer_types\[1\]"),
    ({"model_type": "qwen3_next", "linear_num_key_heads": 3, "linear_num_value_heads": 4}, "linear_num_value_heads"),
    ({"model_type": "qwen3_next", "num_attention_heads": 6, "num_key_value_heads": 4}, "num_attention_heads"),
    ({"model_type": "qwen3_next", "num_experts": 8, "num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"model_type": "qwen3_next", "hidden_size": "big"}, "hidden_size"),
    ({"model_type": "qwen3_next", "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "rope_type"),
    ({"model_type": "qwen3_next", "mlp_only_layers": [99]}, "mlp_only_layers"),
])
def test_invalid_config_names_the_field(tmp_path: Path, body: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        Qwen3NextConfig.from_json(_write(tmp_path, body))


def test_missing_or_broken_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        Qwen3NextConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen3NextConfig.from_json(tmp_path)


def test_published_config_sizes_match_hand_arithmetic() -> None:
    s = model_sizes(Qwen3NextConfig.from_dict(PUBLISHED_CONFIGS["qwen3-coder-next"]))
    H, I, E, k, L, V = 2048, 512, 512, 10, 48, 151936
    expert = 3 * H * I
    gdn = H * 12288 + H * 64 + 8192 * 4 + 4096 * H + 32 + 32 + 128
    attn = H * 8192 + 2 * H * 512 + 4096 * H + 2 * 256
    moe_head = 3 * H * 512 + E * H + H  # shared expert + router + shared-expert gate
    per_layer_head = moe_head + 2 * H
    head = 36 * gdn + 12 * attn + L * per_layer_head + 2 * V * H + H
    mtp_head = 2 * H * H + 2 * H + attn + per_layer_head + H  # fc [H, 2H], its two pre-fc norms, one layer, norm
    assert s.head_params == head + mtp_head == 2_364_979_968 + 39_858_688
    assert s.total_params == head + L * E * expert == 79_674_391_296  # the target model, as published
    assert s.active_params == head + L * k * expert == 3_874_929_408
    assert round(s.total_params / 1e9, 2) == 79.67 and round(s.active_params / 1e9, 2) == 3.87
    assert s.mtp_params == mtp_head + E * expert == 1_650_471_424
    assert s.num_routed_experts == (L + 1) * E  # the workers hold the MTP layer's experts too
    assert s.bytes_per_routed_expert == 6 * 2**20
    assert s.kv_bytes_per_token == (12 + 1) * 2 * 2 * 256 * 2 == 26_624  # 12 attention layers + the MTP layer
    assert s.deltanet_state_bytes_per_sequence == 36 * (32 * 128 * 128 * 4 + 8192 * 4 * 2) == 77_856_768
    assert s.dispatch_bytes_per_token == L * k * H * 2 * 2 == 3_932_160
