"""A checkpoint's `quantization_config`: the fine-grained FP8 layout (the one nextserve serves), read and
validated once.

The layout is DeepSeek-V3's and Qwen's FP8 releases', as transformers' `FineGrainedFP8Config` reads it:

    "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head", ...]}

Every linear weight `X.weight` [R, C] not matched by `modules_to_not_convert` is stored as float8_e4m3fn
beside a float32 `X.weight_scale_inv` [ceil(R / br), ceil(C / bc)]: the value of weight[r, c] is
fp8[r, c] * scale_inv[r // br, c // bc] (the last row / column block may be ragged). Activations are
scaled per call ("dynamic"); a static per-tensor `activation_scale` is not supported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from nextserve.model.config_error import ConfigError

FP8_METHOD = "fp8"
SUPPORTED_METHODS = (FP8_METHOD,)
SCALE_SUFFIX = "weight_scale_inv"
"""The per-block inverse scale beside an FP8 `X.weight`: `X.weight_scale_inv`."""


class QuantizationError(ConfigError):
    """A quantization_config nextserve cannot serve; the message names the value and what is supported."""


@dataclass(frozen=True)
class Fp8BlockConfig:
    """Fine-grained FP8: float8_e4m3fn weights with a float32 inverse scale per [br x bc] block."""
    weight_block_size: tuple[int, int] = (128, 128)
    """(br, bc): rows x columns of one scale's block; 128 x 128 in every published release."""
    modules_to_not_convert: tuple[str, ...] = ()
    """Modules kept in the checkpoint's float dtype (lm_head, the routers, ...), matched as transformers
    does: a prefix up to a module boundary (regex allowed), or a suffix."""
    activation_scheme: str = "dynamic"
    """Activations scaled per call, per token per bc columns (the only scheme served)."""

    def __post_init__(self) -> None:
        br, bc = self.weight_block_size
        if br < 1 or bc < 1:
            raise QuantizationError(f"quantization_config.weight_block_size is {list(self.weight_block_size)}; "
                                    f"both must be >= 1 (e.g. [128, 128])")
        if self.activation_scheme != "dynamic":
            raise QuantizationError(f"quantization_config.activation_scheme is {self.activation_scheme!r}; "
                                    f"only 'dynamic' is supported")

    def is_converted(self, module: str) -> bool:
        """Whether `module` (e.g. 'model.layers.3.mlp.gate') is stored in FP8, not named by modules_to_not_convert."""
        return not any(_matches(pattern, module) for pattern in self.modules_to_not_convert)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Fp8BlockConfig":
        method = raw.get("quant_method")
        if method not in SUPPORTED_METHODS:
            raise QuantizationError(f"quantization_config.quant_method {method!r} is not supported; nextserve serves "
                                    f"{' or '.join(repr(m) for m in SUPPORTED_METHODS)} (fine-grained FP8, block "
                                    f"scales) and unquantized bfloat16/float32 checkpoints")
        block = raw.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) for b in block)):
            raise QuantizationError(f"quantization_config.weight_block_size is {block!r}; give two integers "
                                    f"[rows, columns] (per-tensor FP8 without blocks is not supported)")
        if raw.get("scale_fmt", "float") != "float":
            raise QuantizationError(f"quantization_config.scale_fmt is {raw['scale_fmt']!r}; only 'float' "
                                    f"(float32 weight_scale_inv) is supported")
        skip = raw.get("modules_to_not_convert") or raw.get("ignored_layers") or ()
        return cls(weight_block_size=(block[0], block[1]), modules_to_not_convert=tuple(skip),
                   activation_scheme=str(raw.get("activation_scheme", "dynamic")).lower())

    def to_dict(self) -> dict[str, Any]:
        """The config.json body transformers' FineGrainedFP8Config reads back."""
        return {"quant_method": FP8_METHOD, "activation_scheme": self.activation_scheme,
                "weight_block_size": list(self.weight_block_size),
                "modules_to_not_convert": list(self.modules_to_not_convert)}


def _matches(pattern: str, module: str) -> bool:
    # From the start up to a module boundary ("layers.1" is not "layers.11"), the pattern a regex; or a suffix.
    return re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", module) is not None or module.endswith(pattern)


def scale_key(weight_key: str) -> str:
    """'X.weight' -> 'X.weight_scale_inv'."""
    return weight_key.removesuffix("weight") + SCALE_SUFFIX


def module_of(weight_key: str) -> str:
    """'X.weight' or 'X.weight_scale_inv' -> 'X'."""
    return weight_key.rsplit(".", 1)[0]
