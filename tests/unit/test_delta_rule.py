"""The decode step of the gated delta rule (in place, by matmuls) against the token-by-token reference
form (transformers' op order), at awkward sizes, on a pool slice as the engine runs it."""

from __future__ import annotations

import pytest
import torch

from nextserve.model.kernels.delta_rule import gated_delta_step, recurrent_gated_delta_rule


@pytest.mark.parametrize("B,h,dk,dv", [(1, 1, 16, 8), (3, 6, 24, 20), (7, 4, 32, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_in_place_equals_the_reference(B: int, h: int, dk: int, dv: int, dtype: torch.dtype) -> None:
    g_ = torch.Generator().manual_seed(B * 100 + h)
    q, k = (torch.randn(B, 1, h, dk, generator=g_).to(dtype) for _ in range(2))
    v = torch.randn(B, 1, h, dv, generator=g_).to(dtype)
    g = -torch.rand(B, 1, h, generator=g_) * 2  # fp32, <= 0
    beta = torch.rand(B, 1, h, generator=g_).to(dtype)
    pool = torch.randn(B + 3, h, dk, dv, generator=g_)  # fp32 states of B + 3 slots
    want_out, want_state = recurrent_gated_delta_rule(q, k, v, g, beta, pool[2:2 + B])
    others = pool[[0, 1, B + 2]].clone()
    out = gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], pool[2:2 + B])  # a run of slots
    assert out.dtype == dtype
    torch.testing.assert_close(pool[2:2 + B], want_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.float(), want_out[:, 0].float(), rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.equal(pool[[0, 1, B + 2]], others)  # the other slots are untouched
