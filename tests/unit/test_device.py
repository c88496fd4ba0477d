"""model/device.py: the device choice; with CUDA, an expert store on the GPU against the CPU one (skipped
without a GPU). A head's result on its GPU: tests/grpc/test_epoch_follower.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nextserve.experts.compute import DispatchBatch, compute_partial
from nextserve.experts.store import ExpertStore
from nextserve.model.config import ConfigError
from nextserve.model.device import resolve_device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="'tpu' is not one of auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="torch sees no CUDA GPU"):
            resolve_device("cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_expert_store_on_cuda_computes_what_the_cpu_store_does(reference: dict, dtype: str) -> None:
    path: Path = reference["small"][1]
    pairs = [(0, e) for e in range(4)]
    cpu, gpu = ExpertStore(path, dtype, "cpu"), ExpertStore(path, dtype, "cuda")
    cpu.load(pairs)
    gpu.load(pairs)
    assert gpu.snapshot()[0].gate_up.device.type == "cuda" and gpu.snapshot()[0].global_to_row.device.type == "cpu"
    H, torch_dtype = cpu.config.hidden_size, cpu.dtype
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, H, generator=g).to(torch_dtype)
    token, rows = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 3, 1, 2])  # rows are the expert ids here
    weights = torch.rand(4, generator=g).to(torch_dtype)
    want = compute_partial(DispatchBatch(0, cpu.snapshot()[0], hidden, token, rows, rows, weights))
    got = compute_partial(DispatchBatch(0, gpu.snapshot()[0], hidden, token, rows, rows, weights))
    assert got.device.type == "cpu"
    tol = {"float32": 1e-4, "bfloat16": 2e-2}[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    gpu.drop([(0, 1)])
    assert gpu.snapshot()[0].expert_ids == (0, 2, 3) and gpu.snapshot()[0].gate_up.device.type == "cuda"
