"""Fine-grained (block-scaled) FP8: the dequantization every device runs, the quantization tests and the
converter run, and the block-scaled FP8 GEMM a Hopper GPU runs, next to its reference.

    weight[r, c] = float(fp8[r, c]) * scale_inv[r // br, c // bc]          (the format; model/quantization.py)
    x[t, k]      = float(x_fp8[t, k]) * x_scale[t, k // bc]                (dynamic activations: per token, per bc)
    y            = x @ weight.T                                            (block_fp8_linear: FP8 tensor cores,
                                                                            fp32 accumulation, both scales applied)

`dequantize_blocks` is exactly the product above in float32, then one rounding to the compute dtype:
the same numbers transformers' `FineGrainedFP8Config(dequantize=True)` loads, so the dequantized path
equals transformers on the checkpoint's dequantized twin. `block_fp8_linear_reference` is the slow
emulation of `block_fp8_linear` (activations quantized the same way, math in float32) that any device runs.

Letters: R, C = rows, columns of a weight; br, bc = its block; T = tokens; K = input features, N = output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
GEMM_BLOCK = (128, 128)
"""The one block torch's block-scaled FP8 GEMM takes (cuBLAS: 1x128 activations, 128x128 weights)."""
MIN_CUDA_FOR_BLOCK_GEMM = (12, 9)
"""cuBLASLt's block-scaled FP8 GEMM arrived in CUDA 12.9 (torch's own tests gate on it)."""


def scale_grid(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """The scale_inv shape of a [rows, cols] weight: one scale per block, the last ones ragged."""
    return -(-rows // block[0]), -(-cols // block[1])


def expand_scales(scale_inv: Tensor, rows: int, cols: int, block: tuple[int, int]) -> Tensor:
    """scale_inv [..., gR, gC] -> [..., rows, cols] float32: each block's scale over its elements."""
    full = scale_inv.to(torch.float32).repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return full[..., :rows, :cols]


def dequantize_blocks(weight: Tensor, scale_inv: Tensor, block: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """weight [..., R, C] float8_e4m3fn, scale_inv [..., gR, gC] -> [..., R, C] in `dtype`:
    float32(fp8) * scale_inv, rounded once to `dtype`."""
    rows, cols = weight.shape[-2:]
    return (weight.to(torch.float32) * expand_scales(scale_inv, rows, cols, block)).to(dtype)


def quantize_blocks(weight: Tensor, block: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """weight [..., R, C] -> (fp8 [..., R, C], scale_inv [..., gR, gC] float32): each block's largest
    magnitude maps to the largest FP8 value (an all-zero block gets scale 1)."""
    rows, cols = weight.shape[-2:]
    grid = scale_grid(rows, cols, block)
    w = weight.to(torch.float32)
    padded = F.pad(w, (0, grid[1] * block[1] - cols, 0, grid[0] * block[0] - rows))
    tiles = padded.unflatten(-1, (grid[1], block[1])).unflatten(-3, (grid[0], block[0]))  # [..., gR, br, gC, bc]
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., gR, gC]
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    fp8 = (w / expand_scales(scale_inv, rows, cols, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return fp8, scale_inv


def quantize_activations(x: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """x [T, K] -> (x_fp8 [T, K], x_scale [T, ceil(K / group)] float32): dynamic scales per token per
    `group` columns (the checkpoint's activation_scheme 'dynamic')."""
    return quantize_blocks(x, (1, group))


def block_fp8_linear_reference(x: Tensor, weight: Tensor, scale_inv: Tensor, block: tuple[int, int]) -> Tensor:
    """x [T, K], weight [N, K] fp8, scale_inv [gN, gK] -> [T, N] in x's dtype: what `block_fp8_linear`
    computes (activations quantized per token per bc), emulated in float32 on any device."""
    x_fp8, x_scale = quantize_activations(x, block[1])
    x_deq = dequantize_blocks(x_fp8, x_scale, (1, block[1]), torch.float32)
    return (x_deq @ dequantize_blocks(weight, scale_inv, block, torch.float32).T).to(x.dtype)


def has_block_fp8_gemm(device: torch.device) -> bool:
    """Whether `block_fp8_linear` runs on `device`: a Hopper GPU (sm90) with CUDA >= 12.9 and torch's
    `scaled_mm`. Elsewhere (CPU, Ampere, Ada, Blackwell's other recipes) the experts dequantize per call."""
    if device.type != "cuda" or not hasattr(F, "scaled_mm") or torch.version.cuda is None:
        return False
    cuda = tuple(int(p) for p in torch.version.cuda.split(".")[:2])
    return torch.cuda.get_device_capability(device)[0] == 9 and cuda >= MIN_CUDA_FOR_BLOCK_GEMM


def block_fp8_linear(x: Tensor, weight: Tensor, scale_inv: Tensor) -> Tensor:
    """x [T, K] bf16 on a GPU where `has_block_fp8_gemm`; weight [N, K] fp8; scale_inv [N / 128, K / 128]
    (K and N multiples of 128) -> [T, N] bf16. One FP8 GEMM: activations quantized per token per 128
    columns, weights per 128 x 128 block, both scales applied inside the GEMM (fp32 accumulation)."""
    x_fp8, x_scale = quantize_activations(x, GEMM_BLOCK[1])
    # cuBLAS takes both scale tensors "outer-dim major": x_scale [T, K/128] column-major, and the
    # weight's [K/128, N/128] as the transposed view of the checkpoint's contiguous [N/128, K/128].
    return F.scaled_mm(x_fp8, weight.T, x_scale.T.contiguous().T, F.ScalingType.BlockWise1x128,
                       scale_inv.to(torch.float32).T, F.ScalingType.BlockWise128x128, output_dtype=x.dtype)
