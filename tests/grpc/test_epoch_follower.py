"""A head's one expert backend (router/epoch_follower.py) against a real redis-server and real
gRPC expert workers: its result is the in-process experts', it records what /metrics exports, it
follows a new placement epoch, and a round whose experts have no live worker waits for the next epoch
(or fails naming them once `unavailable_wait_s` is spent)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from nextserve.router.epoch_follower import EpochFollowingBackend
from nextserve.cluster.control.redis_server import LocalRedis
from nextserve.cluster.control.registry import Registry
from nextserve.experts.server import BackgroundWorkers
from nextserve.model.config import Qwen3NextConfig
from nextserve.router.local_backend import load_local_backend
from nextserve.router.dispatcher import ExpertsUnavailableError
from nextserve.router.placement import build_placement

pytestmark = pytest.mark.grpc
TOKEN = "test-admin-token"
"""The workers' cluster token: every call to them carries it."""
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture()
def redis_registry() -> Iterator[Registry]:
    with LocalRedis() as server:
        yield Registry(server.url, "follower-test")


@pytest.fixture(scope="module")
def workers() -> Iterator[BackgroundWorkers]:
    background = BackgroundWorkers(admin_token=TOKEN)
    yield background
    background.close()


def _inputs(config: Qwen3NextConfig, T: int = 7) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.rand(T, config.num_experts, generator=g).topk(config.num_experts_per_tok, dim=1).indices
    return torch.randn(T, config.hidden_size, generator=g), ids, torch.rand(T, config.num_experts_per_tok, generator=g)


def test_result_metrics_and_a_new_epoch(reference: dict, redis_registry: Registry, workers: BackgroundWorkers) -> None:
    path: Path = reference["small"][1]
    config = Qwen3NextConfig.from_json(path)
    layer = config.moe_layers[0]
    two = build_placement(config.moe_layers, config.num_experts, 2, 1)
    started = [workers.start(path, two.experts_of(w)) for w in range(2)]
    redis_registry.publish_placement(two, [f"127.0.0.1:{w.port}" for w in started])
    backend = EpochFollowingBackend(redis_registry, torch.float32, 10.0, config.num_experts, admin_token=TOKEN)
    try:
        hidden, ids, weights = _inputs(config)
        want = load_local_backend(path).forward(layer, hidden, ids, weights)
        torch.testing.assert_close(backend.submit(layer, hidden, ids, weights).result(timeout=30), want)
        latency, tokens = backend.recorder.drain()
        assert len(latency[layer]) == 1 and latency[layer][0] > 0
        assert sum(tokens.values()) == ids.numel() and all(l == layer for l, _ in tokens)
        # All experts on one worker now: the next round follows the new epoch.
        one = build_placement(config.moe_layers, config.num_experts, 1, 1)
        whole = workers.start(path, one.experts_of(0))
        epoch = redis_registry.publish_placement(one, [f"127.0.0.1:{whole.port}"])
        assert backend.refresh() and backend.epoch == epoch
        before = whole.servicer.info().dispatch_calls
        torch.testing.assert_close(backend.submit(layer, hidden, ids, weights).result(timeout=30), want)
        assert whole.servicer.info().dispatch_calls == before + 1
    finally:
        backend.close()


def test_unavailable_experts_wait_for_the_next_epoch(reference: dict, redis_registry: Registry,
                                                     workers: BackgroundWorkers) -> None:
    """The published worker is gone (its port refuses): the round waits; a placement on a live worker,
    published meanwhile, serves it. Without one, the round fails naming the experts."""
    path: Path = reference["small"][1]
    config = Qwen3NextConfig.from_json(path)
    layer = config.moe_layers[0]
    one = build_placement(config.moe_layers, config.num_experts, 1, 1)
    gone = workers.start(path, one.experts_of(0))
    workers.stop(gone)
    redis_registry.publish_placement(one, [f"127.0.0.1:{gone.port}"])
    backend = EpochFollowingBackend(redis_registry, torch.float32, 2.0, config.num_experts, unavailable_wait_s=20.0,
                                    admin_token=TOKEN)
    try:
        hidden, ids, weights = _inputs(config)
        pending = backend.submit(layer, hidden, ids, weights)
        live = workers.start(path, one.experts_of(0))
        redis_registry.publish_placement(one, [f"127.0.0.1:{live.port}"])  # the watcher picks it up
        want = load_local_backend(path).forward(layer, hidden, ids, weights)
        torch.testing.assert_close(pending.result(timeout=60), want)
        workers.stop(live)
        backend.unavailable_wait_s = 0.5
        with pytest.raises(ExpertsUnavailableError, match=f"layer {layer} experts"):
            backend.submit(layer, hidden, ids, weights).result(timeout=60)
    finally:
        backend.close()


@needs_cuda
def test_a_head_on_cuda_sends_cpu_bytes_and_gets_its_result_on_the_gpu(reference: dict, redis_registry: Registry,
                                                                        workers: BackgroundWorkers) -> None:
    path: Path = reference["small"][1]
    config = Qwen3NextConfig.from_json(path)
    layer = config.moe_layers[0]
    one = build_placement(config.moe_layers, config.num_experts, 1, 1)
    worker = workers.start(path, one.experts_of(0))
    redis_registry.publish_placement(one, [f"127.0.0.1:{worker.port}"])
    backend = EpochFollowingBackend(redis_registry, torch.float32, 10.0, config.num_experts,
                                    device=torch.device("cuda"), admin_token=TOKEN)
    try:
        hidden, ids, weights = _inputs(config)
        got = backend.submit(layer, hidden.cuda(), ids.cuda(), weights.cuda()).result(timeout=30)
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), load_local_backend(path).forward(layer, hidden, ids, weights))
    finally:
        backend.close()
