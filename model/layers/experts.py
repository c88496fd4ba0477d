"""Routed-expert SwiGLU math for a batch of (token, expert, weight) assignments.

The one place the routed experts are computed: the local backend and the gRPC expert worker both
call `experts_forward`, so a distributed MoE block runs the same arithmetic as a local one.

The weights are either dense (the model dtype) or `Fp8Experts` (a fine-grained FP8 checkpoint's, kept
in FP8 with their block scales: half the bytes of bf16). FP8 experts are computed with block-scaled FP8
GEMMs where the device has them (`has_block_fp8_gemm`), else with the active experts' weights
dequantized per call (model/kernels/fp8_block.py) and then the dense math: the same numbers as a dense
run on the dequantized checkpoint.

Letters: T = tokens, H = hidden, I = moe intermediate, E = experts held here, A = assignments,
P = projections stacked along the rows (gate and up: 2, down: 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nextserve.model.kernels.fp8_block import GEMM_BLOCK, block_fp8_linear, dequantize_blocks, has_block_fp8_gemm


@dataclass(frozen=True, slots=True)
class Assignments:
    """A layer's routing as flat (token, expert, weight) triples, the one record for it across the tree:
    the router plans dispatch with global expert ids, a worker computes with ids into the stacked
    weights it holds. From `from_topk` they are token-major (token non-decreasing)."""
    token: Tensor   # [A] int64 in [0, T)
    expert: Tensor  # [A] int64 expert ids
    weight: Tensor  # [A] model dtype

    @classmethod
    def from_topk(cls, ids: Tensor, weights: Tensor) -> "Assignments":
        """ids, weights [T, k] -> A = T·k triples in token-major order."""
        T, k = ids.shape
        token = torch.arange(T, device=ids.device).repeat_interleave(k)
        return cls(token=token, expert=ids.reshape(-1).to(torch.int64), weight=weights.reshape(-1))


@dataclass(frozen=True, slots=True)
class Fp8Experts:
    """Stacked expert projections in fine-grained FP8, as the checkpoint stores them. Each of the P
    projections stacked along the rows keeps its own block grid, so a ragged last block of gate never
    shares a scale with up's first rows."""
    weight: Tensor     # [E, P, R, C] float8_e4m3fn
    scale_inv: Tensor  # [E, P, ceil(R / br), ceil(C / bc)] float32
    block: tuple[int, int]
    dtype: torch.dtype
    """The compute dtype (the model's): what the weights dequantize to."""

    @property
    def shape(self) -> torch.Size:
        """The dense stack's shape: [E, P·R, C]."""
        E, P, R, C = self.weight.shape
        return torch.Size((E, P * R, C))

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scale_inv.nbytes

    def __getitem__(self, index: Tensor) -> "Fp8Experts":
        """The experts at `index` [k] int64."""
        return Fp8Experts(self.weight[index], self.scale_inv[index], self.block, self.dtype)

    def contiguous(self) -> "Fp8Experts":
        return Fp8Experts(self.weight.contiguous(), self.scale_inv.contiguous(), self.block, self.dtype)

    def to(self, device: torch.device | str) -> "Fp8Experts":
        return Fp8Experts(self.weight.to(device), self.scale_inv.to(device), self.block, self.dtype)

    @classmethod
    def cat(cls, stacks: "list[Fp8Experts]") -> "Fp8Experts":
        return cls(torch.cat([s.weight for s in stacks]), torch.cat([s.scale_inv for s in stacks]),
                   stacks[0].block, stacks[0].dtype)

    def dequantize(self) -> Tensor:
        """[E, P·R, C] in the compute dtype: fp8 * scale_inv per block (model/kernels/fp8_block.py)."""
        return dequantize_blocks(self.weight, self.scale_inv, self.block, self.dtype).flatten(1, 2)

    def is_gemm_ready(self) -> bool:
        """Whether `block_fp8_linear` takes these weights: 128 x 128 blocks that tile every projection."""
        R, C = self.weight.shape[-2:]
        return self.block == GEMM_BLOCK and R % GEMM_BLOCK[0] == 0 and C % GEMM_BLOCK[1] == 0


ExpertWeights = Tensor | Fp8Experts
"""One layer's stacked projections: dense [E, P·R, C] in the model dtype, or FP8 with scales."""


def cat_experts(stacks: list[ExpertWeights]) -> ExpertWeights:
    """Stacks of one layer's experts, all dense or all FP8, concatenated along the experts."""
    if all(isinstance(s, Fp8Experts) for s in stacks):
        return Fp8Experts.cat(stacks)  # type: ignore[arg-type]
    if any(isinstance(s, Fp8Experts) for s in stacks):
        raise TypeError("a layer's experts are all FP8 or all dense: one checkpoint loads them all")
    return torch.cat(stacks)  # type: ignore[arg-type]


def weight_bytes(weights: ExpertWeights) -> int:
    """Bytes the stack holds (FP8: weights and scales)."""
    return weights.nbytes


def _swiglu_grouped(x_sorted: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """x_sorted [A, H] grouped by expert, counts [E] -> [A, H]: one grouped GEMM per projection."""
    inter = down.shape[-1]
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    gu = F.grouped_mm(x_sorted, gate_up.transpose(1, 2), offs=offs)  # [A, 2I]
    return F.grouped_mm(F.silu(gu[:, :inter]) * gu[:, inter:], down.transpose(1, 2), offs=offs)


def _swiglu_per_expert(x_sorted: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """Same contract as `_swiglu_grouped`: one gate_up and one down matmul per active expert."""
    inter = down.shape[-1]
    y_sorted = torch.empty_like(x_sorted)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            gu = F.linear(x_sorted[start:start + n], gate_up[e])  # [n, 2I]
            y_sorted[start:start + n] = F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], down[e])
            start += n
    return y_sorted


def _has_grouped_gemm(x: Tensor) -> bool:
    # torch's grouped GEMM runs on CPU in any float dtype; on CUDA it needs bfloat16 (Hopper kernels).
    return hasattr(F, "grouped_mm") and (x.device.type == "cpu" or x.dtype == torch.bfloat16)


def _swiglu_fp8_gemm(x_sorted: Tensor, counts: Tensor, gate_up: Fp8Experts, down: Fp8Experts) -> Tensor:
    """Same contract as `_swiglu_grouped`, on FP8 tensor cores: two block-scaled GEMMs per active expert."""
    inter = down.shape[-1]
    y_sorted = torch.empty_like(x_sorted)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            gu = block_fp8_linear(x_sorted[start:start + n], gate_up.weight[e].flatten(0, 1),
                                  gate_up.scale_inv[e].flatten(0, 1))  # [n, 2I]
            y_sorted[start:start + n] = block_fp8_linear(F.silu(gu[:, :inter]) * gu[:, inter:], down.weight[e, 0],
                                                         down.scale_inv[e, 0])
            start += n
    return y_sorted


def _swiglu_fp8_dequantized(x_sorted: Tensor, counts: Tensor, gate_up: Fp8Experts, down: Fp8Experts) -> Tensor:
    """Same contract as `_swiglu_grouped`: the active experts' weights dequantized, then the dense math
    (a group's result does not depend on the other groups, so skipping idle experts changes no bit)."""
    active = counts.nonzero().squeeze(1)  # [e] ascending, as x_sorted is grouped
    dense_gate_up, dense_down = gate_up[active].dequantize(), down[active].dequantize()
    swiglu = _swiglu_grouped if _has_grouped_gemm(x_sorted) else _swiglu_per_expert
    return swiglu(x_sorted, counts[active], dense_gate_up, dense_down)


def _swiglu_for(hidden: Tensor, gate_up: ExpertWeights, down: ExpertWeights) -> Callable[..., Tensor]:
    """The SwiGLU implementation for these weights on this device."""
    if isinstance(gate_up, Fp8Experts) and isinstance(down, Fp8Experts):
        is_gemm = has_block_fp8_gemm(hidden.device) and hidden.dtype == torch.bfloat16 \
            and gate_up.is_gemm_ready() and down.is_gemm_ready()
        return _swiglu_fp8_gemm if is_gemm else _swiglu_fp8_dequantized
    if isinstance(gate_up, Fp8Experts) or isinstance(down, Fp8Experts):
        raise TypeError(f"gate_up is {type(gate_up).__name__} but down is {type(down).__name__}: a layer's "
                        f"experts are all FP8 or all dense")
    return _swiglu_grouped if _has_grouped_gemm(hidden) else _swiglu_per_expert


def experts_forward(hidden: Tensor, assign: Assignments, gate_up: ExpertWeights, down: ExpertWeights) -> Tensor:
    """hidden [T, H]; gate_up [E, 2I, H] (gate rows first); down [E, H, I] -> [T, H].

    out[t] = Σ_{a: token[a]=t} weight[a] · down_e(silu(gate_e x_t) · up_e x_t). Assignments are sorted
    by expert (stable), run as a grouped GEMM (the two give bitwise-equal results on CPU), weighted, and
    scatter-added per token in that fixed order, so a result is reproducible.
    """
    out = torch.zeros_like(hidden)
    if assign.token.numel() == 0:
        return out
    order = torch.argsort(assign.expert, stable=True)
    tok_sorted = assign.token[order]
    x_sorted = hidden[tok_sorted]  # [A, H]
    counts = torch.bincount(assign.expert, minlength=gate_up.shape[0])  # [E]
    y_sorted = _swiglu_for(hidden, gate_up, down)(x_sorted, counts, gate_up, down)
    out.index_add_(0, tok_sorted, y_sorted * assign.weight[order, None])
    return out
