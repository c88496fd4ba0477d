"""The head's waiting queue: FCFS within a tenant, weighted fair queuing across tenants.

    push(seq)        -> its tenant's queue (tenant = EngineRequest.tenant)
    push_front(seq)  -> the preempted line, served before every tenant (it was admitted once already)
    push_front_of_tenant(seq) -> first of its tenant's queue (preempted to give another tenant its share)
    peek()           -> the next to admit: the preempted line's first, else the first waiting sequence
                        of the tenant with the smallest start tag
                            start(tenant) = max(virtual_time, finish(tenant))
                        (ties: the tenant waiting longest)
    pop(seq)         -> admit it: virtual_time = its start; finish(tenant) = start + cost / weight

Start-time fair queuing over admissions: cost = the sequence's prefill tokens, at least MIN_COST_TOKENS
(a short request still holds a running slot for its whole decode). A tenant that keeps a queue moves its
finish tag ahead of the virtual time with every admission, while a tenant that was idle starts at the
virtual time itself: a quiet tenant's request is the next admitted, whatever the size of another
tenant's flood, and while both wait, a weight-2 tenant gets twice the prompt tokens of a weight-1 one.
Idle time earns no credit (the start is never below the virtual time). With a single tenant (a server
without keys) this is exactly FCFS.

`peek` reads only, so the scheduler can peek, find the sequence does not fit, and stop: the same
sequence is first next step (no one overtakes it, as in FCFS). Pure bookkeeping: no asyncio, no tensors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

MIN_COST_TOKENS = 128
"""What admitting a sequence costs at least, in prompt tokens: one prompt of 128 tokens or fewer counts
as one request."""


class Waiting(Protocol):
    """What the queue reads of a waiting sequence (SequenceState)."""
    @property
    def tenant(self) -> str: ...
    @property
    def tenant_weight(self) -> float: ...
    @property
    def num_prefill_tokens(self) -> int: ...


T = TypeVar("T", bound=Waiting)


class FairQueue(Generic[T]):
    def __init__(self, min_cost_tokens: int = MIN_COST_TOKENS) -> None:
        if min_cost_tokens < 1:
            raise ValueError(f"min_cost_tokens must be >= 1, got {min_cost_tokens}")
        self.min_cost_tokens = min_cost_tokens
        self._preempted: deque[T] = deque()
        self._queues: dict[str, deque[T]] = {}
        """Tenant -> its waiting sequences, FCFS; only tenants with one waiting are keys, in the order
        they started waiting."""
        self._finish: dict[str, float] = {}
        """Tenant -> the finish tag of its last admission (kept while it is idle: one entry per tenant)."""
        self.virtual_time = 0.0
        """The start tag of the last admission."""

    def __len__(self) -> int:
        return len(self._preempted) + sum(len(q) for q in self._queues.values())

    def __bool__(self) -> bool:
        return bool(self._preempted or self._queues)

    def __iter__(self) -> Iterator[T]:
        yield from self._preempted
        for queue in self._queues.values():
            yield from queue

    def push(self, seq: T) -> None:
        self._queues.setdefault(seq.tenant, deque()).append(seq)

    def push_front(self, seq: T) -> None:
        """A preempted sequence: first in line, ahead of every tenant's queue."""
        self._preempted.appendleft(seq)

    def push_front_of_tenant(self, seq: T) -> None:
        """A sequence preempted to give its slot to another tenant: first of its own tenant's queue."""
        self._queues.setdefault(seq.tenant, deque()).appendleft(seq)

    @property
    def is_preempted_next(self) -> bool:
        """The next to admit is from the preempted line (not chosen across tenants)."""
        return bool(self._preempted)

    def peek(self) -> T:
        """The sequence to admit next (IndexError when none waits)."""
        if self._preempted:
            return self._preempted[0]
        if not self._queues:
            raise IndexError("peek from an empty FairQueue")
        tenant = min(self._queues, key=self._start)  # min keeps the first of equals: the longest waiting
        return self._queues[tenant][0]

    def pop(self, seq: T) -> None:
        """Admit `seq`, which `peek` just returned."""
        if self._preempted and self._preempted[0] is seq:
            self._preempted.popleft()
            return
        tenant = seq.tenant
        queue = self._queues[tenant]
        assert queue[0] is seq, "pop what peek returned"
        start = self._start(tenant)
        self.virtual_time = start
        self._finish[tenant] = start + max(seq.num_prefill_tokens, self.min_cost_tokens) / seq.tenant_weight
        queue.popleft()
        if not queue:
            del self._queues[tenant]

    def remove(self, seq: T) -> None:
        """Drop a waiting sequence wherever it is (finished or aborted while waiting)."""
        if _remove_identical(self._preempted, seq):
            return
        queue = self._queues.get(seq.tenant, deque())
        if not _remove_identical(queue, seq):
            raise ValueError(f"request {getattr(seq, 'request_id', seq)!r} is not waiting")
        if not queue:
            del self._queues[seq.tenant]

    def _start(self, tenant: str) -> float:
        return max(self.virtual_time, self._finish.get(tenant, 0.0))


def _remove_identical(queue: deque[T], seq: T) -> bool:
    """Remove `seq` itself (not an equal one) from `queue`; False when it is not there."""
    for i, waiting in enumerate(queue):
        if waiting is seq:
            del queue[i]
            return True
    return False
