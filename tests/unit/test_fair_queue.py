"""FairQueue alone and in the scheduler: FCFS within a tenant, weighted fair queuing across tenants,
preempted sequences first; a flood of 24 from one tenant does not hold back another's request."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from nextserve.cluster.engine.contract import EngineRequest, FinishReason
from nextserve.cluster.engine.fair_queue import FairQueue
from nextserve.cluster.engine.scheduler import Scheduler, SchedulerConfig, SequenceState, StepPlan
from nextserve.model.cache.block_manager import BlockManager
from nextserve.model.sampling import SamplingParams


@dataclass(eq=False)
class Item:
    name: str
    tenant: str
    num_prefill_tokens: int = 100
    tenant_weight: float = 1.0


def _drain(queue: FairQueue[Item]) -> list[str]:
    order = []
    while queue:
        item = queue.peek()
        assert queue.peek() is item  # peeking twice changes nothing
        queue.pop(item)
        order.append(item.name)
    return order


def test_one_tenant_is_fcfs() -> None:
    q: FairQueue[Item] = FairQueue(min_cost_tokens=1)
    for i, n in enumerate((10, 500, 3, 77)):
        q.push(Item(f"x{i}", "", n))
    assert _drain(q) == ["x0", "x1", "x2", "x3"]


def test_equal_weights_alternate_by_tokens() -> None:
    q: FairQueue[Item] = FairQueue(min_cost_tokens=1)
    for i in range(6):
        q.push(Item(f"a{i}", "A"))
    for i in range(2):
        q.push(Item(f"b{i}", "B"))
    assert _drain(q) == ["a0", "b0", "a1", "b1", "a2", "a3", "a4", "a5"]


def test_weight_two_gets_twice_the_tokens() -> None:
    q: FairQueue[Item] = FairQueue(min_cost_tokens=1)
    for i in range(12):
        q.push(Item(f"a{i}", "A", tenant_weight=2.0))
        q.push(Item(f"b{i}", "B"))
    order = _drain(q)
    assert order[:9] == ["a0", "b0", "a1", "a2", "b1", "a3", "a4", "b2", "a5"]
    assert sum(name.startswith("a") for name in order[:18]) == 12  # 2:1 while both wait


def test_long_prompts_cost_more() -> None:
    """A's 400-token prompts cost four of B's 100-token ones."""
    q: FairQueue[Item] = FairQueue(min_cost_tokens=1)
    for i in range(2):
        q.push(Item(f"a{i}", "A", 400))
    for i in range(6):
        q.push(Item(f"b{i}", "B", 100))
    assert _drain(q) == ["a0", "b0", "b1", "b2", "b3", "a1", "b4", "b5"]


def test_a_quiet_tenant_goes_next_and_idle_time_earns_nothing() -> None:
    q: FairQueue[Item] = FairQueue(min_cost_tokens=1)
    for i in range(10):
        q.push(Item(f"a{i}", "A"))
    assert _drain(q) == [f"a{i}" for i in range(10)]
    for i in range(10):
        q.push(Item(f"a{i}", "A"))
    for _ in range(5):
        q.pop(q.peek())
    q.push(Item("b0", "B"))  # B was idle through A's 15 admissions: next, but only once ahead
    q.push(Item("b1", "B"))
    assert _drain(q)[:4] == ["b0", "a5", "b1", "a6"]


def test_preempted_first_and_remove() -> None:
    q: FairQueue[Item] = FairQueue(min_cost_tokens=1)
    a0, a1, b0, p = Item("a0", "A"), Item("a1", "A"), Item("b0", "B"), Item("p", "B")
    for item in (a0, a1, b0):
        q.push(item)
    q.push_front(p)
    assert q.peek() is p
    q.remove(a0)
    assert len(q) == 3 and [i.name for i in q] == ["p", "a1", "b0"]
    assert _drain(q) == ["p", "a1", "b0"]
    with pytest.raises(ValueError, match="a0"):
        q.remove(a0)
    with pytest.raises(IndexError):
        q.peek()


def _seq(request_id: str, tenant: str, prompt_len: int, max_tokens: int) -> SequenceState:
    return SequenceState(EngineRequest(request_id, tuple(range(3, 3 + prompt_len)),
                                       SamplingParams(max_tokens=max_tokens), tenant=tenant))


def test_scheduler_admits_b_at_the_next_step_while_a_floods() -> None:
    """A keeps 24 requests waiting with max_num_seqs 4 (all slots A's); B's one short request, arriving
    after them, runs at the next step: A's newest running sequence is preempted back to the head of A's
    queue (FCFS would make B wait for 20 of A's admissions)."""
    config = SchedulerConfig(max_num_seqs=4, max_tokens_per_step=256, prefill_chunk=128)
    s = Scheduler(config, BlockManager(1000, config.max_num_seqs, 16))
    for i in range(24):
        s.add(_seq(f"a{i}", "A", 40, max_tokens=30))
    plan = s.schedule()
    assert [item.seq.request_id for item in plan.scheduled] == ["a0", "a1", "a2", "a3"]
    for item in plan.scheduled:
        s.advance(item, 7)
    s.add(_seq("b", "B", 8, max_tokens=2))
    plan = s.schedule()
    assert [seq.request_id for seq in plan.preempted] == ["a3"]
    assert [item.seq.request_id for item in plan.scheduled] == ["a0", "a1", "a2", "b"]
    assert [seq.request_id for seq in s.waiting][:2] == ["a3", "a4"] and len(s.waiting) == 21
    for item in plan.scheduled:
        s.advance(item, 7 if item.samples_token else None)
    plan = s.schedule()  # B runs; a3 waits for a slot of its own (A's 3 running are at or above its share)
    assert not plan.preempted and "b" in _ids(plan) and "a3" not in _ids(plan)


def _ids(plan: StepPlan) -> list[str]:
    return [item.seq.request_id for item in plan.scheduled]


def test_a_tenant_alone_is_never_preempted_for_share() -> None:
    config = SchedulerConfig(max_num_seqs=2, max_tokens_per_step=64, prefill_chunk=64)
    s = Scheduler(config, BlockManager(1000, config.max_num_seqs, 16))
    for i in range(6):
        s.add(_seq(f"a{i}", "A", 10, max_tokens=3))
    while s.has_work:
        plan = s.schedule()
        assert not plan.preempted
        for item in plan.scheduled:
            s.advance(item, 7 if item.samples_token else None)
            if len(item.seq.output_ids) >= 3:
                s.finish(item.seq, FinishReason.LENGTH)
