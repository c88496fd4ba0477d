"""Plan one MoE layer's dispatch: which worker serves each (token, expert) pair. Pure tensor code.

    ids, weights [T, k] -> flat pairs [A] -> worker of each pair (first alive replica of its expert)
    -> one WorkerBatch per worker: each token once, with all its (expert, weight) pairs there.

Letters: T = tokens, k = experts per token, A = T·k pairs, E = routed experts, R = replicas,
N = workers, t = tokens of one worker batch, P = pairs of one worker batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from router.placement import Placement


@dataclass(frozen=True, slots=True)
class Pairs:
    """A layer's routing flattened token-major: pair a is (token[a], expert[a], weight[a])."""
    token: Tensor   # [A] int64, non-decreasing
    expert: Tensor  # [A] int64 global expert ids
    weight: Tensor  # [A] model dtype

    @classmethod
    def from_topk(cls, ids: Tensor, weights: Tensor) -> "Pairs":
        T, k = ids.shape
        token = torch.arange(T).repeat_interleave(k)
        return cls(token, ids.reshape(-1).to(torch.int64), weights.reshape(-1))


@dataclass(frozen=True, slots=True)
class WorkerBatch:
    worker: int
    pair_index: Tensor  # [P] int64 index into Pairs, ascending (so token-major)
    tokens: Tensor      # [t] int64 distinct tokens, ascending
    counts: Tensor      # [t] int64 pairs per token
    experts: Tensor     # [P] int64 global expert ids
    weights: Tensor     # [P]


def replica_table(placement: Placement, layer: int) -> Tensor:
    """[E, R] int64 worker indices of each expert's replicas, primary first."""
    return torch.tensor(placement.layer_to_expert_workers[layer], dtype=torch.int64).view(-1, placement.replication)


def choose_workers(replicas: Tensor, alive: Tensor) -> Tensor:
    """replicas [E, R], alive [N] bool -> [E] the first alive replica of each expert, -1 if none."""
    ok = alive[replicas]  # [E, R]
    first = ok.to(torch.int8).argmax(dim=1, keepdim=True)  # [E, 1] first True (0 when none)
    chosen = replicas.gather(1, first).squeeze(1)
    return torch.where(ok.any(dim=1), chosen, torch.full_like(chosen, -1))


def unavailable_experts(pairs: Pairs, pending: Tensor, expert_to_worker: Tensor) -> list[int]:
    """Sorted global ids of the experts some pending pair needs that no alive worker holds."""
    experts = pairs.expert[pending]
    return sorted(set(experts[expert_to_worker[experts] < 0].tolist()))


def plan_batches(pairs: Pairs, pending: Tensor, expert_to_worker: Tensor) -> list[WorkerBatch]:
    """Group the pending pairs [P_all] (ascending indices) into one batch per worker, worker order.

    Every expert of a pending pair must have a worker (check `unavailable_experts` first).
    """
    worker = expert_to_worker[pairs.expert[pending]]  # [P_all]
    order = torch.argsort(worker, stable=True)  # stable: token-major order holds inside each worker
    sizes = torch.bincount(worker, minlength=int(expert_to_worker.max()) + 1).tolist()
    batches, start = [], 0
    for w, n in enumerate(sizes):
        if n == 0:
            continue
        index = pending[order[start:start + n]]
        start += n
        tokens, counts = torch.unique_consecutive(pairs.token[index], return_counts=True)
        batches.append(WorkerBatch(w, index, tokens, counts, pairs.expert[index], pairs.weight[index]))
    return batches
