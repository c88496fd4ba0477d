"""The Qwen3-Next configuration, read from a checkpoint's config.json and validated once.

Field names and defaults follow transformers' `Qwen3NextConfig` (5.24), see shared/MODEL.md §1.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from nextserve.model.config_error import ConfigError
from nextserve.model.quantization import Fp8BlockConfig


class LayerType(str, Enum):
    LINEAR_ATTENTION = "linear_attention"
    FULL_ATTENTION = "full_attention"


@dataclass(frozen=True)
class Qwen3NextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    """H: the residual width."""
    intermediate_size: int = 5632
    """Width of the dense MLP, used only by layers that are not MoE (mlp_only_layers)."""
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    """The class default is 1e4; the published checkpoints use 1e7 (Instruct) and 5e6 (Coder-Next)."""
    partial_rotary_factor: float = 0.25
    """Fraction of head_dim that RoPE rotates (the first dims, NeoX half split)."""
    rope_type: str = "default"
    max_position_embeddings: int = 32768
    attention_bias: bool = False
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    layer_types: tuple[LayerType, ...] = field(default=())
    num_nextn_predict_layers: int = 0
    """Multi-token-prediction layers (`mtp.*` tensors): each an fc over [normed embedding | normed hidden],
    one full-attention decoder layer with a sparse MoE, a norm; sharing embed_tokens and lm_head. 0: none.
    A config.json without the field takes the count from the checkpoint's `mtp.layers.N` tensors
    (model/checkpoint.py). They run as layers num_hidden_layers + j (`mtp_layers`)."""
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    """The dtype the checkpoint was saved in (informational; the runtime dtype is chosen by the loader)."""
    quantization: Fp8BlockConfig | None = None
    """config.json's `quantization_config` (fine-grained FP8, model/quantization.py); None: unquantized."""

    def __post_init__(self) -> None:
        if not self.layer_types:
            derived = tuple(
                LayerType.FULL_ATTENTION if (i + 1) % 4 == 0 else LayerType.LINEAR_ATTENTION
                for i in range(self.num_hidden_layers)
            )
            object.__setattr__(self, "layer_types", derived)
        self._validate()

    def _validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "linear_conv_kernel_dim", "linear_key_head_dim",
            "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads",
            "decoder_sparse_step",
        ]
        if self.num_nextn_predict_layers < 0:
            raise ConfigError(f"config field 'num_nextn_predict_layers' must be >= 0, got {self.num_nextn_predict_layers}")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config field '{name}' must be >= 1, got {getattr(self, name)}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"config field 'layer_types' has {len(self.layer_types)} entries but "
                f"'num_hidden_layers' is {self.num_hidden_layers}; give one type per layer"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_attention_heads' ({self.num_attention_heads}) must be a multiple "
                f"of 'num_key_value_heads' ({self.num_key_value_heads})"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(
                f"config field 'linear_num_value_heads' ({self.linear_num_value_heads}) must be a "
                f"multiple of 'linear_num_key_heads' ({self.linear_num_key_heads})"
            )
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(
                f"config field 'partial_rotary_factor' ({self.partial_rotary_factor}) times head_dim "
                f"({self.head_dim}) must give an even rotary dim in (0, head_dim], got {self.rotary_dim}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"config field 'hidden_act' is {self.hidden_act!r}; only 'silu' is supported")
        if self.rope_type != "default":
            raise ConfigError(
                f"config field 'rope_parameters.rope_type' is {self.rope_type!r}; only 'default' is supported"
            )
        if self.num_experts < 0 or (self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts):
            raise ConfigError(
                f"config field 'num_experts_per_tok' ({self.num_experts_per_tok}) must be in "
                f"[1, num_experts={self.num_experts}]"
            )
        if self.num_experts and (self.moe_intermediate_size < 1 or self.shared_expert_intermediate_size < 0):
            raise ConfigError("config fields 'moe_intermediate_size' must be >= 1 and "
                              "'shared_expert_intermediate_size' >= 0")
        for i in self.mlp_only_layers:
            if not 0 <= i < self.num_hidden_layers:
                raise ConfigError(f"config field 'mlp_only_layers' names layer {i}, outside [0, {self.num_hidden_layers})")
        if self.tie_word_embeddings:
            raise ConfigError("config field 'tie_word_embeddings' is true; Qwen3-Next checkpoints are untied")

    # ---- derived decisions, named once ---------------------------------------------------------

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_conv_dim(self) -> int:
        """C: channels of the DeltaNet causal conv, in [Q | K | V] order."""
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + \
            self.linear_num_value_heads * self.linear_value_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        """Layer `layer` (a backbone layer, or an MTP layer past them) has routed experts."""
        if layer in self.mtp_layers:
            return self.num_experts > 0  # the MTP layer's FFN is the sparse MoE (vLLM's mtp.layers.0, local index 0)
        return (
            0 <= layer < self.num_hidden_layers
            and layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def layer_type(self, layer: int) -> LayerType:
        """The mixer of layer `layer`; the MTP layers are full attention."""
        return LayerType.FULL_ATTENTION if layer in self.mtp_layers else self.layer_types[layer]

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The backbone's MoE layers: one expert round each per forward of the target model."""
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    @property
    def mtp_layers(self) -> tuple[int, ...]:
        """Layer indices of the MTP layers: after the backbone's (vLLM's mtp_start_layer_idx), so their K/V
        pools and routed experts are indexed like every other layer's."""
        return tuple(range(self.num_hidden_layers, self.num_hidden_layers + self.num_nextn_predict_layers))

    @property
    def expert_layers(self) -> tuple[int, ...]:
        """Every layer whose routed experts the expert workers hold: the backbone's MoE layers, then the
        MTP layers'."""
        return self.moe_layers + tuple(i for i in self.mtp_layers if self.is_moe_layer(i))

    @property
    def has_mtp(self) -> bool:
        return self.num_nextn_predict_layers > 0

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    # ---- named constructors --------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Qwen3NextConfig":
        if raw.get("model_type") != "qwen3_next":
            raise ConfigError(
                f"config field 'model_type' is {raw.get('model_type')!r}; nextserve serves 'qwen3_next' checkpoints "
                f"only: pass a Qwen3-Next checkpoint (e.g. Qwen/Qwen3-Coder-Next, Qwen/Qwen3-Next-80B-A3B-Instruct)"
            )
        known = {f for f in cls.__dataclass_fields__}
        values: dict[str, Any] = {k: v for k, v in raw.items() if k in known}
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        if "rope_theta" in rope:
            values["rope_theta"] = float(rope["rope_theta"])
        if "partial_rotary_factor" in rope:
            values["partial_rotary_factor"] = float(rope["partial_rotary_factor"])
        if rope.get("rope_type", rope.get("type")) is not None:
            values["rope_type"] = rope.get("rope_type", rope.get("type"))
        if "head_dim" not in raw and "hidden_size" in raw and "num_attention_heads" in raw:
            values["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
        values["mlp_only_layers"] = tuple(raw.get("mlp_only_layers") or ())
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = tuple(values["eos_token_id"])
        if raw.get("layer_types") is not None:
            values["layer_types"] = tuple(_layer_type(t, i) for i, t in enumerate(raw["layer_types"]))
        elif "full_attention_interval" in raw:
            interval = int(raw["full_attention_interval"])
            n = int(raw.get("num_hidden_layers", cls.num_hidden_layers))
            values["layer_types"] = tuple(
                LayerType.FULL_ATTENTION if (i + 1) % interval == 0 else LayerType.LINEAR_ATTENTION
                for i in range(n)
            )
        dtype = raw.get("dtype") or raw.get("torch_dtype")
        if dtype:
            values["torch_dtype"] = str(dtype)
        for name, value in values.items():
            if name in ("quantization", "layer_types", "mlp_only_layers", "eos_token_id", "rope_type", "torch_dtype",
                        "hidden_act", "bos_token_id", "pad_token_id"):
                continue
            expected = type(getattr(cls, name)) if hasattr(cls, name) else None
            if expected in (int, float, bool) and not isinstance(value, (int, float, bool)):
                raise ConfigError(f"config field '{name}' must be a number, got {value!r}")
        if raw.get("quantization_config") is not None:
            values["quantization"] = Fp8BlockConfig.from_dict(dict(raw["quantization_config"]))
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen3NextConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}; pass a Hugging Face checkpoint directory") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json body transformers' Qwen3NextConfig reads back to the same model."""
        d = asdict(self)
        d.pop("quantization")
        if self.quantization is not None:
            d["quantization_config"] = self.quantization.to_dict()
        d["layer_types"] = [t.value for t in self.layer_types]
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        d["rope_parameters"] = {
            "rope_type": d.pop("rope_type"),
            "rope_theta": d.pop("rope_theta"),
            "partial_rotary_factor": d.pop("partial_rotary_factor"),
        }
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        d["dtype"] = d.pop("torch_dtype")
        d["model_type"] = "qwen3_next"
        d["architectures"] = ["Qwen3NextForCausalLM"]
        return d


def _layer_type(value: str, index: int) -> LayerType:
    try:
        return LayerType(value)
    except ValueError:
        raise ConfigError(
            f"config field 'layer_types[{index}]' is {value!r}; expected 'linear_attention' or 'full_attention'"
        ) from None


# The published Qwen3-Coder-Next config (shared/MODEL.md §11): every layer MoE, 3:1 DeltaNet:attention, and
# the one MTP layer the published checkpoints ship (`mtp.*`).
QWEN3_CODER_NEXT = dict(
    model_type="qwen3_next", vocab_size=151936, hidden_size=2048, intermediate_size=5120,
    num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
    hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.25},
    max_position_embeddings=262144, linear_conv_kernel_dim=4, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32, num_experts=512,
    num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], full_attention_interval=4,
    num_nextn_predict_layers=1, bos_token_id=151643, eos_token_id=151645, dtype="bfloat16",
)

FP8_RELEASE = dict(quant_method="fp8", activation_scheme="dynamic", weight_block_size=[128, 128],
                   modules_to_not_convert=["lm_head", "model.embed_tokens", "mlp.gate", "mlp.shared_expert_gate"])
"""The fine-grained FP8 releases' quantization_config (Qwen3-Coder-Next-FP8, as DeepSeek-V3's): 128 x 128
blocks; the routers, the embedding and lm_head stay bf16."""

PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3-coder-next": QWEN3_CODER_NEXT,
    "qwen3-coder-next-fp8": {**QWEN3_CODER_NEXT, "quantization_config": FP8_RELEASE},
    "qwen3-next-80b-a3b": {**QWEN3_CODER_NEXT, "rope_parameters": {
        "rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25}},
}
