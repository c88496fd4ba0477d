"""The head's waiting queue: FCFS within a tenant, weighted deficit round robin across tenants.

    push(seq)        -> its tenant's queue (tenant = EngineRequest.tenant)
    push_front(seq)  -> the preempted line, served before every tenant (it was admitted once already)
    peek()           -> the next to admit: the preempted line's first, else by DRR:
                          the tenant at the front of the round, on its turn, gets QUANTUM_TOKENS * weight
                          of credit once; it is served while its first waiting prompt costs no more than
                          its credit, else its turn ends and the next tenant's starts
    pop(seq)         -> admit the peeked sequence: its prompt tokens are taken from its tenant's credit

The cost of a sequence is its prefill tokens (at least MIN_COST_TOKENS), so a tenant sending long
prompts gets fewer admissions per round than one sending short ones, and another tenant's request waits
behind at most one turn of a flood, whatever its size: a short request from a quiet tenant is admitted
within one round. A tenant whose queue empties leaves the round and loses its credit (DRR: credit is not banked while
idle). With a single tenant (a server without keys) this is exactly FCFS.

`peek` only reads or starts a turn (which it does once per turn), so the scheduler can peek, find the
sequence does not fit, and stop: the same sequence is first next step (no one overtakes it, as in FCFS).
Pure bookkeeping: no asyncio, no tensors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

QUANTUM_TOKENS = 256
"""Credit a weight-1 tenant gets per turn, in prompt tokens: one default prefill chunk."""
MIN_COST_TOKENS = 128
"""What admitting a sequence costs at least: a short request holds a running slot for its whole decode,
whatever its prompt, so a turn admits at most QUANTUM_TOKENS / MIN_COST_TOKENS = 2 of a weight-1 tenant's
short requests and another tenant's request waits behind at most that many of a flood's."""


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
    def __init__(self, quantum_tokens: int = QUANTUM_TOKENS, min_cost_tokens: int = MIN_COST_TOKENS) -> None:
        if quantum_tokens < 1 or min_cost_tokens < 1:
            raise ValueError(f"quantum_tokens ({quantum_tokens}) and min_cost_tokens ({min_cost_tokens}) "
                             f"must be >= 1")
        self.quantum_tokens, self.min_cost_tokens = quantum_tokens, min_cost_tokens
        self._preempted: deque[T] = deque()
        self._queues: dict[str, deque[T]] = {}
        """Tenant -> its waiting sequences, FCFS; only tenants with one waiting are keys."""
        self._round: deque[str] = deque()
        """Tenants with sequences waiting, in round order: the first one's turn is current."""
        self._credit: dict[str, float] = {}
        self._turn_started = False
        """The first tenant of the round has had its quantum for this turn."""

    def __len__(self) -> int:
        return len(self._preempted) + sum(len(q) for q in self._queues.values())

    def __bool__(self) -> bool:
        return bool(self._preempted or self._round)

    def __iter__(self) -> Iterator[T]:
        yield from self._preempted
        for queue in self._queues.values():
            yield from queue

    def push(self, seq: T) -> None:
        queue = self._queues.get(seq.tenant)
        if queue is None:
            queue = self._queues[seq.tenant] = deque()
            self._round.append(seq.tenant)
            self._credit[seq.tenant] = 0.0
        queue.append(seq)

    def push_front(self, seq: T) -> None:
        """A preempted sequence: first in line, ahead of every tenant's queue."""
        self._preempted.appendleft(seq)

    def peek(self) -> T:
        """The sequence to admit next (IndexError when none waits)."""
        if self._preempted:
            return self._preempted[0]
        if not self._round:
            raise IndexError("peek from an empty FairQueue")
        while True:
            tenant = self._round[0]
            head = self._queues[tenant][0]
            if not self._turn_started:
                self._credit[tenant] += self.quantum_tokens * head.tenant_weight
                self._turn_started = True
            if self._credit[tenant] >= self._cost(head):
                return head
            self._round.rotate(-1)  # its turn ends; the credit carries to its next turn
            self._turn_started = False

    def pop(self, seq: T) -> None:
        """Admit `seq`, which `peek` just returned."""
        if self._preempted and self._preempted[0] is seq:
            self._preempted.popleft()
            return
        tenant = seq.tenant
        assert self._round and self._round[0] == tenant and self._queues[tenant][0] is seq, "pop what peek returned"
        self._queues[tenant].popleft()
        self._credit[tenant] -= self._cost(seq)
        if not self._queues[tenant]:
            self._leave(tenant)

    def remove(self, seq: T) -> None:
        """Drop a waiting sequence wherever it is (finished or aborted while waiting)."""
        if _remove_identical(self._preempted, seq):
            return
        queue = self._queues.get(seq.tenant, deque())
        if not _remove_identical(queue, seq):
            raise ValueError(f"request {getattr(seq, 'request_id', seq)!r} is not waiting")
        if not queue:
            self._leave(seq.tenant)

    def _cost(self, seq: Waiting) -> int:
        return max(seq.num_prefill_tokens, self.min_cost_tokens)

    def _leave(self, tenant: str) -> None:
        if self._round[0] == tenant:
            self._turn_started = False
        self._round.remove(tenant)
        del self._queues[tenant], self._credit[tenant]


def _remove_identical(queue: deque[T], seq: T) -> bool:
    """Remove `seq` itself (not an equal one) from `queue`; False when it is not there."""
    for i, waiting in enumerate(queue):
        if waiting is seq:
            del queue[i]
            return True
    return False
