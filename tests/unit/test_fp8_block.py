"""Block-scaled FP8 math (model/kernels/fp8_block.py) against loop references, and the FP8 experts'
dequantized path against the dense one: the same bits. The GPU GEMM test needs an sm90 GPU (skipped here)."""

from __future__ import annotations

import pytest
import torch

from nextserve.model.kernels.fp8_block import (FP8_DTYPE, FP8_MAX, block_fp8_linear, block_fp8_linear_reference,
                                               dequantize_blocks, expand_scales, has_block_fp8_gemm, quantize_activations,
                                               quantize_blocks, scale_grid)
from nextserve.model.layers.experts import Assignments, Fp8Experts, experts_forward

SHAPES = [(1, 1), (11, 7), (127, 130), (64, 48), (33, 3333)]
BLOCKS = [(1, 1), (16, 16), (128, 128), (16, 32), (7, 5)]


def _dequantize_by_loops(fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The format's definition, one block at a time."""
    out = torch.empty(fp8.shape, dtype=torch.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = fp8[rows, cols].to(torch.float32) * scale_inv[i, j]
    return out


@pytest.mark.parametrize("shape,block", [(shape, block) for shape in SHAPES for block in BLOCKS
                                         if shape[0] * shape[1] // (block[0] * block[1]) <= 20_000])  # loop time
def test_dequantize_is_fp8_times_its_blocks_scale(shape: tuple[int, int], block: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(shape[0] * 7 + block[1])
    weight = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 3
    fp8, scale_inv = quantize_blocks(weight, block)
    assert fp8.dtype == FP8_DTYPE and scale_inv.dtype == torch.float32
    assert tuple(scale_inv.shape) == scale_grid(*shape, block)
    deq = dequantize_blocks(fp8, scale_inv, block, torch.float32)
    assert torch.equal(deq, _dequantize_by_loops(fp8, scale_inv, block))
    assert torch.equal(dequantize_blocks(fp8, scale_inv, block, torch.bfloat16), deq.to(torch.bfloat16))
    # e4m3 rounds to 3 mantissa bits (relative error <= 2^-4), subnormals to steps of 2^-9 (x the block's scale)
    bound = weight.abs() / 16 + expand_scales(scale_inv, *shape, block) * 2.0**-10
    assert bool(((deq - weight).abs() <= bound * (1 + 1e-6)).all())


def test_an_all_zero_block_keeps_scale_one_and_zeros() -> None:
    weight = torch.zeros(4, 6)
    weight[:, 3:] = 2.0
    fp8, scale_inv = quantize_blocks(weight, (4, 3))
    assert torch.equal(scale_inv, torch.tensor([[1.0, 2.0 / FP8_MAX]], dtype=torch.float32))
    assert torch.equal(dequantize_blocks(fp8, scale_inv, (4, 3), torch.float32), weight)


@pytest.mark.parametrize("tokens", [1, 11, 127])
def test_the_gemm_reference_quantizes_activations_per_token_group(tokens: int) -> None:
    """block_fp8_linear_reference (what the GPU GEMM computes) against the dequantized-weight matmul: the
    activations' own FP8 rounding is the only difference, ~1-3% relative."""
    g = torch.Generator().manual_seed(tokens)
    x, weight = torch.randn(tokens, 256, generator=g), torch.randn(384, 256, generator=g) * 0.05
    fp8, scale_inv = quantize_blocks(weight, (128, 128))
    x_fp8, x_scale = quantize_activations(x, 128)
    assert tuple(x_scale.shape) == (tokens, 2)
    assert torch.allclose(x_scale, x.abs().unflatten(1, (2, 128)).amax(-1) / FP8_MAX)
    exact = x @ dequantize_blocks(fp8, scale_inv, (128, 128), torch.float32).T
    emulated = block_fp8_linear_reference(x, fp8, scale_inv, (128, 128))
    assert ((emulated - exact).norm() / exact.norm()).item() < 0.05


@pytest.mark.parametrize("num_tokens", [1, 11, 40])
def test_fp8_experts_dequantized_per_call_equal_the_dense_experts_bitwise(num_tokens: int) -> None:
    """Only the active experts are dequantized, then the dense grouped math: the same bits as the dense
    stack of the dequantized weights (I = 24 with 16-row blocks: gate's last block is ragged)."""
    E, H, I, k, block = 13, 40, 24, 3, (16, 32)
    g = torch.Generator().manual_seed(num_tokens)
    gate_up = quantize_blocks(torch.randn(E, 2, I, H, generator=g) * 0.2, block)
    down = quantize_blocks(torch.randn(E, 1, H, I, generator=g) * 0.2, block)
    fp8_gate_up, fp8_down = Fp8Experts(*gate_up, block, torch.float32), Fp8Experts(*down, block, torch.float32)
    hidden = torch.randn(num_tokens, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(num_tokens)])
    assign = Assignments.from_topk(ids, torch.rand(num_tokens, k, generator=g))
    dense = experts_forward(hidden, assign, fp8_gate_up.dequantize(), fp8_down.dequantize())
    assert torch.equal(experts_forward(hidden, assign, fp8_gate_up, fp8_down), dense)
    assert fp8_gate_up.dequantize().shape == fp8_gate_up.shape == (E, 2 * I, H)
    assert fp8_gate_up.nbytes < fp8_gate_up.dequantize().to(torch.bfloat16).nbytes * 0.55


needs_sm90 = pytest.mark.skipif(not torch.cuda.is_available() or not has_block_fp8_gemm(torch.device("cuda")),
                                reason="block-scaled FP8 GEMM needs a Hopper (sm90) GPU and CUDA >= 12.9")

GPU_GEMM_RTOL = 0.02
"""block_fp8_linear vs its float32 emulation: both round the activations to FP8 the same way; the GEMM
accumulates in fp32 on tensor cores and rounds its output to bf16 (2^-8 relative), so within 2%.
Against the dequantized-weight path (bf16 activations) the activations' FP8 rounding adds ~3%: 6%."""


@needs_sm90
@pytest.mark.parametrize("tokens", [1, 16, 200])
def test_gpu_block_fp8_gemm_matches_the_dequantized_path(tokens: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 2048, generator=g).to("cuda", torch.bfloat16)
    fp8, scale_inv = quantize_blocks(torch.randn(1024, 2048, generator=g) * 0.02, (128, 128))
    fp8, scale_inv = fp8.cuda(), scale_inv.cuda()
    got = block_fp8_linear(x, fp8, scale_inv).float()
    emulated = block_fp8_linear_reference(x.float(), fp8, scale_inv, (128, 128))
    dequantized = x.float() @ dequantize_blocks(fp8, scale_inv, (128, 128), torch.float32).T
    assert ((got - emulated).norm() / emulated.norm()).item() < GPU_GEMM_RTOL
    assert ((got - dequantized).norm() / dequantized.norm()).item() < 3 * GPU_GEMM_RTOL
