"""Write a fine-grained FP8 checkpoint from a bfloat16/float32 one, and an FP8 checkpoint's dequantized twin.

    quantize_checkpoint(SRC, DST, block)   every linear weight [R, C] not in modules_to_not_convert ->
                                           float8_e4m3fn + float32 weight_scale_inv [ceil(R/br), ceil(C/bc)];
                                           config.json gets quantization_config (model/quantization.py)
    dequantized_twin(FP8, DST, dtype)      every FP8 weight -> fp8 * scale_inv per block, in `dtype`
                                           (float32: exact); scales and quantization_config dropped

The twin is the checkpoint an FP8 one means: transformers loads the FP8 one with
`FineGrainedFP8Config(dequantize=True)` to the same weights, and nextserve serving the FP8 one gives
transformers' tokens on the twin. Shards keep their names and tensors (a scale sits in its weight's
shard); the other files (tokenizer, generation config) are copied. `nextserve quantize-fp8` runs both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nextserve.model.checkpoint import INDEX_FILE, Checkpoint, CheckpointError
from nextserve.model.kernels.fp8_block import dequantize_blocks, quantize_blocks
from nextserve.model.quantization import SCALE_SUFFIX, Fp8BlockConfig, module_of, scale_key

DEFAULT_NOT_CONVERTED = ("lm_head", "model.embed_tokens", "mlp.gate", "mlp.shared_expert_gate")
"""What Qwen's and DeepSeek's FP8 releases keep in bf16: the embedding, the output head, the routers and
the shared expert's 1-wide gate (transformers' Qwen3-Next router is not an nn.Linear, so FP8 would not
apply to it anyway)."""


def _files(src: Path) -> list[str]:
    return sorted(set(Checkpoint(src).key_to_file.values()))


def _copy_others(src: Path, dst: Path, skip: set[str]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and item.name not in skip:
            shutil.copy2(item, dst / item.name)


def _write(dst: Path, shards: dict[str, dict[str, torch.Tensor]], config: dict[str, object], was_sharded: bool) -> None:
    for name, tensors in shards.items():
        save_file(tensors, dst / name, metadata={"format": "pt"})
    if was_sharded:
        weight_map = {key: name for name, tensors in shards.items() for key in sorted(tensors)}
        total = sum(t.nbytes for tensors in shards.values() for t in tensors.values())
        (dst / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _is_quantizable(key: str, tensor: torch.Tensor, scheme: Fp8BlockConfig) -> bool:
    """A linear layer's weight (2-D, not the embedding) not in modules_to_not_convert."""
    return key.endswith(".weight") and tensor.ndim == 2 and "embed_tokens" not in key and \
        not key.startswith("mtp.") and scheme.is_converted(module_of(key))


def quantize_checkpoint(src: str | Path, dst: str | Path, block: tuple[int, int] = (128, 128),
                        modules_to_not_convert: tuple[str, ...] = DEFAULT_NOT_CONVERTED) -> Path:
    """SRC (bf16/fp32, unquantized) -> DST in fine-grained FP8 with `block` [br, bc] scales."""
    src, dst = Path(src), Path(dst)
    ckpt = Checkpoint(src)
    if ckpt.config.quantization is not None:
        raise CheckpointError(f"{src} is already quantized (quantization_config in its config.json); pass an "
                              f"unquantized bfloat16/float32 checkpoint")
    scheme = Fp8BlockConfig(weight_block_size=block, modules_to_not_convert=modules_to_not_convert)
    _copy_others(src, dst, {"config.json", INDEX_FILE, *_files(src)})
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name in _files(src):
        with safe_open(src / name, framework="pt") as f:
            out: dict[str, torch.Tensor] = {}
            for key in f.keys():
                tensor = f.get_tensor(key)
                if _is_quantizable(key, tensor, scheme):
                    out[key], out[scale_key(key)] = quantize_blocks(tensor, block)
                else:
                    out[key] = tensor
            shards[name] = out
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = scheme.to_dict()
    _write(dst, shards, config, (src / INDEX_FILE).exists())
    return dst


def dequantized_twin(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """An FP8 checkpoint SRC -> DST with every FP8 weight dequantized to `dtype` (per block), no scales."""
    src, dst = Path(src), Path(dst)
    ckpt = Checkpoint(src)
    scheme = ckpt.config.quantization
    if scheme is None:
        raise CheckpointError(f"{src} has no quantization_config in its config.json: it is not an FP8 checkpoint")
    _copy_others(src, dst, {"config.json", INDEX_FILE, *_files(src)})
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name in _files(src):
        with safe_open(src / name, framework="pt") as f:
            keys = set(f.keys())
            out: dict[str, torch.Tensor] = {}
            for key in sorted(keys):
                if key.endswith(SCALE_SUFFIX):
                    continue
                tensor = f.get_tensor(key)
                if ckpt.is_fp8(key):  # its scale may sit in another shard
                    scale = f.get_tensor(scale_key(key)) if scale_key(key) in keys else \
                        ckpt.read([scale_key(key)], None)[scale_key(key)]
                    tensor = dequantize_blocks(tensor, scale, scheme.weight_block_size, dtype)
                out[key] = tensor
            shards[name] = out
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    _write(dst, shards, config, (src / INDEX_FILE).exists())
    return dst
