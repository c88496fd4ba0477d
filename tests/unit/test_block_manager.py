"""The block allocator and slot pool alone, then under the scheduler: no leak and no shared block after
10,000 random admit / decode / finish / abort operations under a budget that forces preemption; a double
free raises."""

from __future__ import annotations

import random

import pytest

from nextserve.model.cache.block_manager import BlockManager, CacheAccountingError
from nextserve.cluster.engine.contract import EngineRequest, FinishReason
from nextserve.cluster.engine.scheduler import (Scheduler, SchedulerConfig, SequenceState,
                                               SequenceStatus)
from nextserve.model.sampling import SamplingParams


def test_double_free_and_unknown_ids_raise() -> None:
    m = BlockManager(num_blocks=4, num_slots=2, block_size=16)
    blocks, slot = m.allocate_blocks(3), m.allocate_slot()
    assert blocks == [0, 1, 2] and slot == 0 and m.num_free_blocks == 1 and m.num_free_slots == 1
    m.free_blocks([blocks[1]])
    with pytest.raises(CacheAccountingError, match="block 1 is freed twice"):
        m.free_blocks([blocks[1]])
    m.free_slot(slot)
    with pytest.raises(CacheAccountingError, match="slot 0 is freed twice"):
        m.free_slot(slot)
    with pytest.raises(CacheAccountingError, match="block 3 is freed twice"):
        m.free_blocks([3])  # never handed out
    with pytest.raises(CacheAccountingError, match="does not exist"):
        m.free_blocks([4])
    with pytest.raises(CacheAccountingError, match="check can_allocate"):
        m.allocate_blocks(3)  # 2 free


def test_can_allocate_counts_blocks_and_a_slot() -> None:
    m = BlockManager(num_blocks=3, num_slots=1, block_size=32)
    assert m.blocks_for(1) == 1 and m.blocks_for(32) == 1 and m.blocks_for(33) == 2 and m.blocks_for(0) == 0
    assert m.can_allocate(3, slot=True) and not m.can_allocate(4)
    m.allocate_slot()
    assert m.can_allocate(3) and not m.can_allocate(1, slot=True)


def test_random_allocations_never_leak_or_share() -> None:
    rng = random.Random(0)
    m = BlockManager(num_blocks=64, num_slots=8, block_size=16)
    held: list[tuple[int, list[int]]] = []
    for _ in range(10_000):
        if held and (rng.random() < 0.45 or not m.can_allocate(1, slot=True)):
            slot, blocks = held.pop(rng.randrange(len(held)))
            m.free_blocks(blocks)
            m.free_slot(slot)
        else:
            n = rng.randint(0, 8)
            if m.can_allocate(n, slot=True):
                held.append((m.allocate_slot(), m.allocate_blocks(n)))
        owned = [b for _, blocks in held for b in blocks]
        assert len(owned) == len(set(owned)) == m.num_used_blocks
        assert len({s for s, _ in held}) == len(held) == m.num_used_slots
    for slot, blocks in held:
        m.free_blocks(blocks)
        m.free_slot(slot)
    assert m.num_free_blocks == 64 and m.num_free_slots == 8


def _check_ownership(s: Scheduler) -> None:
    owned = [b for seq in s.running for b in seq.block_ids]
    assert len(owned) == len(set(owned)) == s.blocks.num_used_blocks
    assert len({seq.slot for seq in s.running}) == len(s.running) == s.blocks.num_used_slots
    for seq in s.running:  # every running sequence holds the blocks for the tokens it has cached
        assert len(seq.block_ids) >= s.blocks.blocks_for(seq.num_computed_tokens)
    assert all(seq.slot is None and not seq.block_ids for seq in s.waiting)


def test_scheduler_random_admit_finish_preempt_keeps_the_books() -> None:
    """10,000 operations (add, step, finish, abort) on 24 blocks of 4 tokens: decodes run out of blocks
    often, so preemption and readmission happen throughout."""
    rng = random.Random(1)
    config = SchedulerConfig(max_num_seqs=6, max_tokens_per_step=32, prefill_chunk=8)
    s = Scheduler(config, BlockManager(num_blocks=24, num_slots=5, block_size=4))
    limit = 24 * 4  # tokens the pool holds: what the engine's admission guarantees a sequence fits in
    ids = 0
    for _ in range(10_000):
        op = rng.random()
        if op < 0.15:
            prompt = rng.randint(1, 40)
            max_tokens = rng.randint(1, limit - prompt + 1)
            s.add(SequenceState(EngineRequest(f"r{ids}", tuple(range(prompt)), SamplingParams(max_tokens=max_tokens))))
            ids += 1
        elif op < 0.2 and s.running:
            s.finish(rng.choice(s.running), FinishReason.STOP)
        elif op < 0.23 and (s.running or s.waiting):
            s.abort(rng.choice([*s.running, *s.waiting]).request_id)
        else:
            plan = s.schedule()
            for item in plan.scheduled:
                assert item.seq.status is SequenceStatus.RUNNING  # nothing preempted is run
                s.advance(item, 7 if item.samples_token else None)
                if len(item.seq.output_ids) >= (item.seq.request.params.max_tokens or 0):
                    s.finish(item.seq, FinishReason.LENGTH)
        _check_ownership(s)
    assert s.num_preemptions > 50
    for seq in [*s.running, *s.waiting]:
        s.finish(seq, FinishReason.ABORT)
    assert s.blocks.num_used_blocks == s.blocks.num_used_slots == 0 and not s.has_work


def test_preemption_takes_the_most_recent_and_requeues_it_first() -> None:
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_tokens_per_step=64, prefill_chunk=64),
                  BlockManager(num_blocks=4, num_slots=4, block_size=4))
    old, new, later = (SequenceState(EngineRequest(name, tuple(range(n)), SamplingParams(max_tokens=9)))
                       for name, n in (("old", 4), ("new", 4), ("later", 2)))
    for seq in (old, new):
        s.add(seq)
    plan = s.schedule()  # both prompts fill exactly one block each
    for item in plan.scheduled:
        s.advance(item, 7)
    s.add(later)
    plan = s.schedule()  # both decodes need a second block: 2 left, and "later" gets none
    assert [i.seq.request_id for i in plan.scheduled] == ["old", "new"] and not plan.preempted
    for item in plan.scheduled:
        s.advance(item, 8)
    plan = s.schedule()  # positions 5: room in the second blocks; "later" still waits (FCFS, 1 block)
    for item in plan.scheduled:
        s.advance(item, 9)
    while not plan.preempted:
        plan = s.schedule()
        for item in plan.scheduled:
            s.advance(item, 9)
    assert [seq.request_id for seq in plan.preempted] == ["new"]
    assert [seq.request_id for seq in s.waiting] == ["new", "later"]
    assert new.num_computed_tokens == 0 and new.num_prefill_tokens == 4 + len(new.output_ids)
    assert new.is_prefilling and new.slot is None
