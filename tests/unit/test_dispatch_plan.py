"""router/plan.py with replicas split: against a loop reference, over ragged placements and dead
workers; each token once per worker with all its pairs there; hot experts split over replicas."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from nextserve.router.eplb import rebalance
from nextserve.router.placement import Placement, build_placement
from nextserve.model.layers.experts import Assignments
from nextserve.router.plan import (alive_replicas, assign_pairs, group_by_worker, replica_table,
                                   unavailable_experts)


def score_reference(token: int, worker: int) -> int:
    """The rendezvous hash with Python ints, masked to 32 bits at every step."""
    x = (token * 257 + worker) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x2C1B3C6D) & 0xFFFFFFFF
    x = ((x ^ (x >> 15)) * 0x297A2D39) & 0xFFFFFFFF
    return x ^ (x >> 16)


def assign_reference(pairs: Assignments, pending: list[int], replicas: list[list[int]]) -> list[int]:
    """The obvious loops: a pair of a one-replica expert goes there; any other goes to the replica
    its token visits through such a pair, else to the one its token scores highest (first on ties)."""
    visits: dict[int, set[int]] = {}
    for i in pending:
        if len(replicas[int(pairs.expert[i])]) == 1:
            visits.setdefault(int(pairs.token[i]), set()).add(replicas[int(pairs.expert[i])][0])
    out = []
    for i in pending:
        t, reps = int(pairs.token[i]), replicas[int(pairs.expert[i])]
        keys = [(w in visits.get(t, set()), score_reference(t, w)) for w in reps]
        out.append(reps[keys.index(max(keys))])
    return out


def skewed_ids(T: int, E: int, k: int, seed: int) -> torch.Tensor:
    """[T, k] distinct experts per token, drawn ∝ 1/(rank+1) (a few hot experts)."""
    g = torch.Generator().manual_seed(seed)
    p = (1 / torch.arange(1, E + 1, dtype=torch.float64)).expand(T, E)
    return torch.multinomial(p, k, generator=g)


def ragged(E: int, N: int, R: int, spare: int, seed: int) -> Placement:
    ids = skewed_ids(500, E, 2, seed)
    return rebalance({0: torch.bincount(ids.reshape(-1), minlength=E).double()}, N, R, spare)


PLACEMENTS: list[tuple[str, Callable[[], Placement]]] = [
    ("uniform", lambda: build_placement([0], 13, 4, 2)),
    ("ragged R=1", lambda: ragged(13, 4, 1, 2, 0)),
    ("ragged R=2", lambda: ragged(16, 5, 2, 3, 1)),
    ("everything everywhere", lambda: ragged(6, 3, 1, 9, 2)),
]


@pytest.mark.parametrize("dead", [(), (1,), (0, 2)])
@pytest.mark.parametrize("name,make", PLACEMENTS)
@pytest.mark.parametrize("T", [1, 11, 127])
def test_assign_equals_reference_and_plans_each_token_once(name: str, make: Callable[[], Placement],
                                                           dead: tuple[int, ...], T: int) -> None:
    placement = make()
    E, N, k = placement.num_experts, placement.num_workers, 3
    ids = skewed_ids(T, E, k, seed=T)
    pairs = Assignments.from_topk(ids, torch.rand(T, k))
    alive = torch.ones(N, dtype=torch.bool)
    alive[list(dead)] = False
    table = alive_replicas(replica_table(placement, 0), alive)
    pending = torch.arange(T * k)
    pending = pending[table[pairs.expert, 0] >= 0]  # the pairs with an alive replica
    worker = assign_pairs(pairs, pending, table, N)
    rows = [[w for w in row if w >= 0] for row in table.tolist()]
    assert worker.tolist() == assign_reference(pairs, pending.tolist(), rows)
    seen = torch.zeros(T * k, dtype=torch.int64)
    for b in group_by_worker(pairs, pending, worker):
        assert alive[b.worker]
        assert all(b.worker in placement.workers_of(0, e) for e in b.experts.tolist())
        assert torch.equal(b.tokens, torch.unique(b.tokens)), "a token appears twice in one request"
        assert torch.equal(torch.repeat_interleave(b.tokens, b.counts), pairs.token[b.pair_index])
        seen[b.pair_index] += 1
    assert bool((seen[pending] == 1).all()) and int(seen.sum()) == pending.numel()


def test_hot_expert_tokens_split_over_its_replicas() -> None:
    placement = Placement(4, 1, {0: ((0, 1, 2, 3), (1,), (2,))})
    T = 400
    pairs = Assignments.from_topk(torch.zeros(T, 1, dtype=torch.int64), torch.ones(T, 1))
    table = replica_table(placement, 0)
    counts = torch.bincount(assign_pairs(pairs, torch.arange(T), table, 4), minlength=4)
    assert int(counts.sum()) == T and int(counts.min()) >= 0.8 * T / 4, counts.tolist()
    alive = torch.tensor([True, False, True, True])  # a dead replica's share goes to the others
    counts = torch.bincount(assign_pairs(pairs, torch.arange(T), alive_replicas(table, alive), 4), minlength=4)
    assert counts[1] == 0
    assert int(counts[[0, 2, 3]].min()) >= 0.8 * T / 3, counts.tolist()
    ids = torch.tensor([[0, 1]] * T)  # expert 1 lives on worker 1 only: expert 0 joins it there
    pairs = Assignments.from_topk(ids, torch.ones(T, 2))
    assert bool((assign_pairs(pairs, torch.arange(2 * T), table, 4) == 1).all())


def test_token_stays_on_workers_it_visits() -> None:
    """Everything on every worker: each token goes to one worker, tokens spread over all of them."""
    placement = Placement(3, 3, {0: tuple((0, 1, 2) for _ in range(8))})
    T = 300
    pairs = Assignments.from_topk(skewed_ids(T, 8, 4, seed=3), torch.ones(T, 4))
    worker = assign_pairs(pairs, torch.arange(T * 4), replica_table(placement, 0), 3).view(T, 4)
    assert bool((worker == worker[:, :1]).all())
    assert int(torch.bincount(worker[:, 0], minlength=3).min()) >= 0.8 * T / 3


def test_replica_table_pads_ragged_rows_and_alive_replicas_skip_padding() -> None:
    placement = Placement(3, 1, {0: ((2,), (0, 1, 2), (1, 0))})
    table = replica_table(placement, 0)
    assert table.tolist() == [[2, -1, -1], [0, 1, 2], [1, 0, -1]]
    alive = torch.tensor([False, True, True])
    assert alive_replicas(table, alive).tolist() == [[2, -1, -1], [1, 2, -1], [1, -1, -1]]
    assert alive_replicas(table, torch.tensor([True, True, False]))[:, 0].tolist() == [-1, 0, 1]
    pairs = Assignments.from_topk(torch.tensor([[0, 1], [2, 1]]), torch.ones(2, 2))
    dead2 = alive_replicas(table, torch.tensor([True, True, False]))
    assert unavailable_experts(pairs, torch.arange(4), dead2[:, 0]) == [0]
