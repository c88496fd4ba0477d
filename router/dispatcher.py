"""The remote expert backend: one MoE layer's routed experts over gRPC, with replica failover.

    [Router: ids, weights]  ->  [Plan: pairs -> alive replicas (split, token affinity) -> one batch
    per worker]  ->  [Dispatch: concurrent Dispatch calls, each token once per worker, raw bytes]
    ->  [Combine: partials index-added in (worker, round) order]  ->  [T, H]

An expert with several alive replicas has its tokens split over them (router/plan.py:assign_pairs).
A failed call (deadline, unavailable, or experts not held: a worker out of step with the placement)
marks its worker dead; only that worker's pairs are planned again onto the remaining replicas. With none left, `ExpertsUnavailableError` names the experts.
Partials are summed in a fixed order, so a result depends on which replica served only by rounding.
Letters: T = tokens, H = hidden, k = experts per token, t = tokens sent to one worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future

import grpc
import torch
from torch import Tensor

from nextserve.proto import expert_pb2
from nextserve.router.channels import DispatchLoop, WorkerChannels
from nextserve.router.placement import Placement
from nextserve.model.layers.experts import Assignments
from nextserve.router.plan import WorkerBatch, alive_replicas, plan_batches, replica_table, unavailable_experts
from nextserve.router.wire import TORCH_TO_DTYPE, decode_partial, encode_request
from nextserve.router.worker_stream import WorkerCallError, reply_of

log = logging.getLogger(__name__)

FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
                            grpc.StatusCode.FAILED_PRECONDITION})
"""Codes that mean "this worker, not this request": the pairs go to another replica. FAILED_PRECONDITION
is a worker not holding the experts the placement gives it (one Ray restarted with an older assignment,
before the controller re-syncs it): it is treated like a dead worker for `retry_dead_after_s`."""


class ExpertsUnavailableError(RuntimeError):
    """No live worker holds some experts a batch needs."""

    def __init__(self, layer: int, experts: list[int], dead_workers: list[int]) -> None:
        self.pairs = [(layer, e) for e in experts]
        super().__init__(f"experts unavailable: layer {layer} experts {experts} have no live replica "
                         f"(dead workers {dead_workers}); restart those workers or raise replication")


class DispatchError(RuntimeError):
    """A worker rejected a request (a bug or a placement mismatch, not a worker failure)."""


class RemoteExpertBackend:
    """`model.expert_backend.ExpertBackend` over gRPC expert workers (addresses[i] is worker i)."""

    def __init__(self, addresses: Sequence[str], placement: Placement, dtype: torch.dtype = torch.float32,
                 deadline_s: float = 5.0, retry_dead_after_s: float = 10.0, loop: DispatchLoop | None = None, *,
                 admin_token: str | None) -> None:
        """`loop`: a shared loop thread for the channels (else they get their own; see router/channels.py).
        `admin_token`: the cluster's token, which every call to a worker carries (None: workers without one)."""
        if len(addresses) != placement.num_workers:
            raise ValueError(f"{len(addresses)} addresses for a placement of {placement.num_workers} workers")
        if dtype not in TORCH_TO_DTYPE:
            raise ValueError(f"dtype {dtype} is not supported; use one of {sorted(map(str, TORCH_TO_DTYPE))}")
        self.placement = placement
        self.dtype = dtype
        self.deadline_s = deadline_s
        self.retry_dead_after_s = retry_dead_after_s
        self.channels = WorkerChannels(addresses, loop, admin_token=admin_token)
        self._replicas = {layer: replica_table(placement, layer) for layer in placement.layers}
        self._dead_since: dict[int, float] = {}  # worker -> monotonic time; loop thread only
        self._alive: dict[tuple[int, tuple[int, ...]], Tensor] = {}  # (layer, dead) -> [E, R]

    def submit(self, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor) -> "Future[Tensor]":
        """hidden [T, H], ids/weights [T, k] -> Future of the routed-expert output [T, H]."""
        return self.channels.run(self.dispatch(layer, hidden, ids, weights))

    def close(self) -> None:
        self.channels.close()

    def __enter__(self) -> "RemoteExpertBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def dispatch(self, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        """hidden [T, H], ids/weights [T, k] (CPU) -> the routed-expert output [T, H]; on the channels' loop."""
        if layer not in self._replicas:
            raise ValueError(f"layer {layer} is not in the placement (layers {list(self._replicas)})")
        out = torch.zeros(hidden.shape, dtype=self.dtype)  # [T, H]
        if hidden.shape[0] == 0:
            return out
        hidden = hidden.detach().to(self.dtype).contiguous()
        pairs = Assignments.from_topk(ids, weights.to(self.dtype))
        pending = torch.arange(pairs.token.numel())
        partials: list[tuple[int, int, Tensor, Tensor]] = []  # (worker, round, tokens [t], partial [t, H])
        # Each failed round marks >= 1 worker dead, so N + 1 rounds reach either success or a round
        # whose experts have no live replica left.
        for round_ in range(self.placement.num_workers + 1):
            replicas = self._alive_replicas(layer)
            missing = unavailable_experts(pairs, pending, replicas[:, 0])
            if missing:
                raise ExpertsUnavailableError(layer, missing, sorted(self._dead_since))
            batches = plan_batches(pairs, pending, replicas, self.placement.num_workers)
            results = await self._round(layer, hidden, batches)
            failed = [self._check(b, r, partials, round_) for b, r in zip(batches, results)]
            failed = [f for f in failed if f is not None]
            if not failed:
                break
            pending = torch.sort(torch.cat(failed)).values
        else:  # a worker came back (retry_dead_after_s) and failed again in every round
            raise ExpertsUnavailableError(layer, sorted(set(pairs.expert[pending].tolist())), sorted(self._dead_since))
        for _, _, tokens, partial in sorted(partials, key=lambda p: (p[0], p[1])):
            out.index_add_(0, tokens, partial)
        return out

    def _check(self, batch: WorkerBatch, result: Tensor | BaseException,
               partials: list[tuple[int, int, Tensor, Tensor]], round_: int) -> Tensor | None:
        """Keep a partial; return the pair indices of a failed worker; raise anything else."""
        if isinstance(result, Tensor):
            partials.append((batch.worker, round_, batch.tokens, result))
            return None
        if isinstance(result, WorkerCallError) and result.code() in FAILOVER_CODES:
            log.warning("expert worker %d (%s) failed: %s %s; failing over its %d tokens", batch.worker,
                        self.channels.addresses[batch.worker], result.code().name, result.details(),
                        batch.tokens.numel())
            self._dead_since[batch.worker] = time.monotonic()
            return batch.pair_index
        if isinstance(result, WorkerCallError):
            raise DispatchError(f"worker {batch.worker} ({self.channels.addresses[batch.worker]}) "
                                f"rejected the request: {result.code().name}: {result.details()}") from result
        raise result

    def _alive_replicas(self, layer: int) -> Tensor:
        """[E, R] each expert's replicas on workers not marked dead, first; -1 after."""
        now = time.monotonic()
        for w, since in list(self._dead_since.items()):
            if now - since > self.retry_dead_after_s:
                del self._dead_since[w]  # give it another chance; a failure marks it again
        key = (layer, tuple(sorted(self._dead_since)))
        if key not in self._alive:
            alive = torch.ones(self.placement.num_workers, dtype=torch.bool)
            alive[list(self._dead_since)] = False
            self._alive[key] = alive_replicas(self._replicas[layer], alive)
        return self._alive[key]

    async def _round(self, layer: int, hidden: Tensor, batches: list[WorkerBatch]) -> list[Tensor | BaseException]:
        """Each batch's message written to its worker's stream, then one wait for all replies, all within
        one deadline (no task or timer per call) -> each batch's partial [t, H], or its error."""
        streams = [self.channels.streams[b.worker] for b in batches]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s  # one for the whole round, writes included
        futures = [await s.send(encode_request(layer, self.placement.epoch, hidden, b, self.dtype), deadline)
                   for s, b in zip(streams, batches)]
        _, late = await asyncio.wait(futures, timeout=max(0.0, deadline - loop.time()))
        results: list[Tensor | BaseException] = []
        for stream, batch, future in zip(streams, batches, futures):
            if future in late:
                stream.expire(future, self.deadline_s)
            try:
                reply = reply_of(future)
                results.append(decode_partial(reply, batch.tokens.numel(), hidden.shape[1], self.dtype))
            except Exception as exc:  # noqa: BLE001 - sorted by _check: failover, rejection, or a bug
                results.append(exc)
        return results

    async def fetch_info(self) -> list[expert_pb2.InfoReply]:
        """Every worker's Info (held experts, tokens served, bytes); run it with `channels.run`."""
        return list(await asyncio.gather(*(s.Info(expert_pb2.InfoRequest(), timeout=self.deadline_s,
                                                  metadata=self.channels.metadata) for s in self.channels.stubs)))
