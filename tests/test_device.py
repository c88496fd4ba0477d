"""model/device.py: the device choice, and the adapter that gives a head on a GPU a CPU-wire backend;
with CUDA, an expert store on the GPU against the CPU one (skipped without a GPU)."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from torch import Tensor

from nextserve.experts.compute import DispatchBatch, compute_partial
from nextserve.experts.store import ExpertStore
from nextserve.model.config import ConfigError
from nextserve.model.device import DeviceExpertBackend, resolve_device
from nextserve.model.expert_backend import LocalExpertBackend

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="'tpu' is not one of auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="torch sees no CUDA GPU"):
            resolve_device("cuda")


def _local(E: int = 6, H: int = 16, I: int = 8) -> LocalExpertBackend:
    g = torch.Generator().manual_seed(0)
    return LocalExpertBackend({0: torch.randn(E, 2 * I, H, generator=g)}, {0: torch.randn(E, H, I, generator=g)})


def _inputs(T: int = 5, H: int = 16, E: int = 6, k: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices
    return torch.randn(T, H, generator=g), ids, torch.rand(T, k, generator=g)


def test_device_backend_on_cpu_passes_the_inner_result_through() -> None:
    local, (hidden, ids, weights) = _local(), _inputs()
    got = DeviceExpertBackend(local, torch.device("cpu")).submit(0, hidden, ids, weights).result()
    assert torch.equal(got, local.forward(0, hidden, ids, weights))


def test_device_backend_passes_the_inner_failure_on() -> None:
    class Failing:
        def submit(self, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor) -> "Future[Tensor]":
            future: Future[Tensor] = Future()
            future.set_exception(RuntimeError("worker gone"))
            return future

    with pytest.raises(RuntimeError, match="worker gone"):
        DeviceExpertBackend(Failing(), torch.device("cpu")).submit(0, *_inputs()).result(timeout=5)


@needs_cuda
def test_device_backend_brings_the_result_to_the_head_device() -> None:
    local, (hidden, ids, weights) = _local(), _inputs()
    seen: list[str] = []

    class Recording:  # what the remote backend would be handed: it serialises CPU tensors only
        def submit(self, layer: int, h: Tensor, i: Tensor, w: Tensor) -> "Future[Tensor]":
            seen.extend(t.device.type for t in (h, i, w))
            return local.submit(layer, h, i, w)

    backend = DeviceExpertBackend(Recording(), torch.device("cuda"))
    got = backend.submit(0, hidden.cuda(), ids.cuda(), weights.cuda()).result(timeout=30)
    assert seen == ["cpu"] * 3 and got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), local.forward(0, hidden, ids, weights))


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
