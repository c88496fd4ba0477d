"""The distributed MoE block equals the local one: real gRPC workers on loopback ports.

N workers x replication R x batch sizes x routing (random top-k, skewed onto a few experts); float32
results within 1e-6 of `LocalExpertBackend`. Also: each token crosses the wire once per worker
(counted in bytes by the workers), and the pure planner's invariants.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nextserve.experts.server import BackgroundWorkers
from nextserve.model.config import Qwen3NextConfig
from nextserve.router.local_backend import LocalExpertBackend, load_local_backend
from nextserve.router.dispatcher import RemoteExpertBackend
from nextserve.router.placement import build_placement
from nextserve.model.layers.experts import Assignments
from nextserve.router.plan import alive_replicas, assign_pairs, group_by_worker, replica_table

pytestmark = pytest.mark.grpc
TOKEN = "test-admin-token"
"""The workers' cluster token: every call to them carries it."""
TOL = 1e-6
SETUPS = [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (5, 1), (5, 2)]


class Cluster:
    """Workers for every (N, R) setup of one checkpoint, started on first use, in this process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config = Qwen3NextConfig.from_json(path)
        self.local: LocalExpertBackend = load_local_backend(path)
        self.workers = BackgroundWorkers(admin_token=TOKEN)
        self.backends: dict[tuple[int, int], RemoteExpertBackend] = {}

    def backend(self, num_workers: int, replication: int) -> RemoteExpertBackend:
        key = (num_workers, replication)
        if key not in self.backends:
            placement = build_placement(self.config.moe_layers, self.config.num_experts, num_workers, replication)
            started = [self.workers.start(self.path, placement.experts_of(w)) for w in range(num_workers)]
            self.backends[key] = RemoteExpertBackend([f"127.0.0.1:{w.port}" for w in started], placement, admin_token=TOKEN)
        return self.backends[key]

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        self.workers.close()


@pytest.fixture(scope="module", params=["small", "awkward"])
def cluster(request: pytest.FixtureRequest, reference: dict) -> Iterator[Cluster]:
    c = Cluster(reference[request.param][1])
    yield c
    c.close()


def routing(config: Qwen3NextConfig, num_tokens: int, kind: str, seed: int) -> tuple[torch.Tensor, ...]:
    """hidden [T, H], ids [T, k], weights [T, k] (normalised, like the gate's)."""
    g = torch.Generator().manual_seed(seed)
    E, k = config.num_experts, config.num_experts_per_tok
    hidden = torch.randn(num_tokens, config.hidden_size, generator=g)
    if kind == "random":
        ids = torch.rand(num_tokens, E, generator=g).topk(k, dim=1).indices
    else:  # skewed: every token picks the same few experts, in a token-dependent order
        few = torch.tensor([E - 1, 3, 0, 7, 5][:k])
        ids = torch.stack([few[torch.randperm(k, generator=g)] for _ in range(num_tokens)]) \
            if num_tokens else torch.zeros(0, k, dtype=torch.int64)
    weights = torch.rand(num_tokens, k, generator=g).softmax(dim=1)
    return hidden, ids, weights


@pytest.mark.parametrize("kind", ["random", "skewed"])
@pytest.mark.parametrize("num_workers,replication", SETUPS)
def test_distributed_block_equals_local(cluster: Cluster, num_workers: int, replication: int, kind: str) -> None:
    backend = cluster.backend(num_workers, replication)
    for layer in cluster.config.moe_layers:
        for num_tokens in (0, 1, 7, 300):
            hidden, ids, weights = routing(cluster.config, num_tokens, kind, seed=num_tokens + layer)
            got = backend.submit(layer, hidden, ids, weights).result(timeout=30)
            want = cluster.local.forward(layer, hidden, ids, weights)
            assert got.shape == want.shape == (num_tokens, cluster.config.hidden_size)
            diff = (got - want).abs().max().item() if num_tokens else 0.0
            assert diff <= TOL, f"layer {layer} T={num_tokens}: max abs diff {diff}"


def test_concurrent_calls_from_several_heads(cluster: Cluster) -> None:
    backend = cluster.backend(3, 2)
    layer = cluster.config.moe_layers[-1]
    batches = [routing(cluster.config, 50 + i, "random", seed=100 + i) for i in range(12)]
    futures = [backend.submit(layer, *b) for b in batches]  # all in flight at once
    for b, f in zip(batches, futures):
        assert (f.result(timeout=30) - cluster.local.forward(layer, *b)).abs().max().item() <= TOL


def test_each_token_crosses_the_wire_once_per_worker(cluster: Cluster) -> None:
    """Bytes counted by the workers: hidden payload = sum over workers of distinct tokens x H x 4."""
    num_workers = 3
    backend = cluster.backend(num_workers, 1)
    info = lambda: backend.channels.run(backend.fetch_info()).result()  # noqa: E731
    before = [i.hidden_bytes for i in info()]
    layer = cluster.config.moe_layers[0]
    hidden, ids, weights = routing(cluster.config, 300, "random", seed=7)
    backend.submit(layer, hidden, ids, weights).result(timeout=30)
    got = [i.hidden_bytes - b for i, b in zip(info(), before)]
    owner = torch.tensor([backend.placement.workers_of(layer, e)[0] for e in range(cluster.config.num_experts)])
    token_workers = owner[ids]  # [T, k]
    H = cluster.config.hidden_size
    want = [int((token_workers == w).any(dim=1).sum()) * H * 4 for w in range(num_workers)]
    assert got == want
    naive = ids.numel() * H * 4  # a token sent once per expert
    assert sum(got) < naive


def test_plan_sends_each_token_once_with_all_its_pairs_there() -> None:
    g = torch.Generator().manual_seed(0)
    T, E, k, N = 97, 13, 3, 4
    ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices
    weights = torch.rand(T, k, generator=g)
    placement = build_placement([0], E, N, 2)
    alive = torch.tensor([True, False, True, True])
    replicas = alive_replicas(replica_table(placement, 0), alive)
    pairs = Assignments.from_topk(ids, weights)
    pending = torch.arange(T * k)
    pair_worker = assign_pairs(pairs, pending, replicas, N)  # the dispatcher's own planning
    batches = group_by_worker(pairs, pending, pair_worker)
    seen = torch.zeros(T * k, dtype=torch.int64)
    for b in batches:
        assert alive[b.worker]
        assert torch.equal(b.tokens, torch.unique(b.tokens)), "a token appears twice in one request"
        assert int(b.counts.sum()) == b.experts.numel()
        assert bool((pair_worker[b.pair_index] == b.worker).all())
        assert all(b.worker in placement.workers_of(0, int(e)) for e in b.experts)
        seen[b.pair_index] += 1
        token_of_pair = torch.repeat_interleave(b.tokens, b.counts)
        assert torch.equal(token_of_pair, pairs.token[b.pair_index])
    assert bool((seen == 1).all()), "every (token, expert) pair is planned exactly once"


def test_bfloat16_block_matches_local_bfloat16(reference: dict) -> None:
    """bf16 on the wire and on the workers: equal to the local bf16 block up to bf16 rounding of the
    per-worker partial sums."""
    path = reference["small"][1]
    config = Qwen3NextConfig.from_json(path)
    local = load_local_backend(path, "bfloat16")
    placement = build_placement(config.moe_layers, config.num_experts, 2, 1)
    workers = BackgroundWorkers(admin_token=TOKEN)
    try:
        started = [workers.start(path, placement.experts_of(w), dtype="bfloat16") for w in range(2)]
        with RemoteExpertBackend([f"127.0.0.1:{w.port}" for w in started], placement, torch.bfloat16, admin_token=TOKEN) as backend:
            hidden, ids, weights = routing(config, 64, "random", seed=3)
            hidden, weights = hidden.bfloat16(), weights.bfloat16()
            got = backend.submit(0, hidden, ids, weights).result(timeout=30)
        want = local.forward(0, hidden, ids, weights)
        assert got.dtype == torch.bfloat16
        assert (got.float() - want.float()).abs().max().item() <= 2e-2 * want.float().abs().max().item()
    finally:
        workers.close()
