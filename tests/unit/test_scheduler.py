"""Scheduler alone (no model): token budget, chunked prefill, decodes never starved, FCFS, caps, abort."""

from __future__ import annotations

import pytest

from nextserve.cluster.engine.contract import EngineRequest, FinishReason
from nextserve.cluster.engine.scheduler import Scheduler, SchedulerConfig, SequenceState, SequenceStatus, StepPlan
from nextserve.model.cache.block_manager import BlockManager
from nextserve.model.sampling import SamplingParams


def _scheduler(config: SchedulerConfig, num_blocks: int = 1000, block_size: int = 16) -> Scheduler:
    return Scheduler(config, BlockManager(num_blocks, config.max_num_seqs, block_size))


def _seq(request_id: str, prompt_len: int, max_tokens: int = 8) -> SequenceState:
    return SequenceState(EngineRequest(request_id, tuple(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens)))


def _run(scheduler: Scheduler, plan: StepPlan) -> None:
    """Pretend the model ran the plan: sample token 7 where the step ends a prompt or decodes."""
    for item in plan.scheduled:
        scheduler.advance(item, 7 if item.samples_token else None)
        seq = item.seq
        if len(seq.output_ids) >= seq.request.params.max_tokens:
            scheduler.finish(seq, FinishReason.LENGTH)


def _tokens(plan: StepPlan) -> dict[str, int]:
    return {item.seq.request_id: item.num_scheduled_tokens for item in plan.scheduled}


def test_long_prompt_is_chunked_and_samples_only_at_its_end() -> None:
    s = _scheduler(SchedulerConfig(max_num_seqs=4, max_tokens_per_step=64, prefill_chunk=32))
    s.add(_seq("long", 100, max_tokens=2))
    chunks, samples = [], []
    while s.has_work:
        plan = s.schedule()
        chunks.append(_tokens(plan)["long"])
        samples.append(plan.scheduled[0].samples_token)
        _run(s, plan)
    assert chunks == [32, 32, 32, 4, 1]
    assert samples == [False, False, False, True, True]


@pytest.mark.parametrize("budget,chunk", [(8, 8), (16, 5), (64, 32), (33, 100)])
def test_budget_respected_and_decodes_never_starved(budget: int, chunk: int) -> None:
    s = _scheduler(SchedulerConfig(max_num_seqs=6, max_tokens_per_step=budget, prefill_chunk=chunk))
    for i in range(3):
        s.add(_seq(f"short{i}", 2, max_tokens=1000))
    _run(s, s.schedule())  # the short prompts prefill together and start decoding
    for i, n in enumerate((1, 11, 127, 300)):
        s.add(_seq(f"long{i}", n, max_tokens=3))
    prefill_steps = 0
    while any(seq.is_prefilling for seq in (*s.running, *s.waiting)):
        plan = s.schedule()
        tokens = _tokens(plan)
        assert plan.num_scheduled_tokens <= budget
        assert all(v <= chunk for k, v in tokens.items() if k.startswith("long"))
        assert all(tokens.get(f"short{i}") == 1 for i in range(3)), tokens  # every decode, every step
        prefill_steps += 1
        _run(s, plan)
    assert prefill_steps >= (1 + 11 + 127 + 300) // (budget - 3)


def test_fcfs_admission_and_max_num_seqs() -> None:
    s = _scheduler(SchedulerConfig(max_num_seqs=2, max_tokens_per_step=20, prefill_chunk=16))
    for name, n, m in [("a", 30, 1), ("b", 2, 1), ("c", 2, 1), ("d", 2, 1)]:
        s.add(_seq(name, n, max_tokens=m))
    plan = s.schedule()
    assert list(_tokens(plan)) == ["a", "b"]  # the 30-token head of the queue goes first, b fills the rest
    assert [q.request_id for q in s.waiting] == ["c", "d"] and len(s.running) == 2
    _run(s, plan)  # b finishes (1 token); a is still prefilling
    assert [q.request_id for q in s.running] == ["a"]
    plan = s.schedule()
    assert list(_tokens(plan)) == ["a", "c"] and len(s.running) == 2
    order = []
    while s.has_work:
        plan = s.schedule()
        order += [k for k in _tokens(plan) if k not in order]
        assert len(s.running) <= 2
        _run(s, plan)
    assert order[-1] == "d"


def test_abort_frees_running_and_waiting_at_next_schedule() -> None:
    s = _scheduler(SchedulerConfig(max_num_seqs=1, max_tokens_per_step=8, prefill_chunk=8))
    run, wait = _seq("run", 4, max_tokens=50), _seq("wait", 4)
    s.add(run)
    s.add(wait)
    _run(s, s.schedule())
    assert run.slot is not None and run.block_ids  # admitted: a slot and its prompt's blocks
    assert run.status is SequenceStatus.RUNNING and wait.status is SequenceStatus.WAITING
    assert s.abort("run") and s.abort("wait") and not s.abort("nobody")
    assert run.status is SequenceStatus.RUNNING  # nothing happens until the next schedule
    plan = s.schedule()
    assert {seq.request_id for seq in plan.aborted} == {"run", "wait"} and plan.is_empty
    for seq in (run, wait):
        assert seq.status is SequenceStatus.FINISHED and seq.finish_reason is FinishReason.ABORT
    assert run.slot is None and not run.block_ids and not s.has_work and "run" not in s
    assert s.blocks.num_used_blocks == s.blocks.num_used_slots == 0
    s.add(_seq("run", 2))  # the id is free again, and not aborted by the stale request
    assert list(_tokens(s.schedule())) == ["run"]


def test_config_rejects_a_budget_smaller_than_a_full_decode_batch() -> None:
    with pytest.raises(ValueError, match="max_tokens_per_step"):
        SchedulerConfig(max_num_seqs=64, max_tokens_per_step=32)
    with pytest.raises(ValueError, match="prefill_chunk"):
        SchedulerConfig(prefill_chunk=0)
