"""Continuous-batching scheduler: which sequences run in the next step, how many tokens each, and which
cache blocks and state slots they hold.

    add() -> waiting (FairQueue) --schedule()--> running --finish()--> finished (blocks and slot freed)
                ^                              |
                +---------- preempted ---------+  (a decode found no free block: the most recently
                          (first in line)          admitted running sequence gives its blocks back)
          every step: decodes first (1 token each, or 1 + k to verify k drafts), then prefill chunks
          of the running sequences still prefilling, then newly admitted waiting sequences, while the
          token budget lasts.

Speculative decoding: a decoding sequence whose drafter proposed drafts (`SequenceState.draft_ids`, set by
the engine after each step) runs its last token and k of them as one verify chunk of k + 1 tokens. k is
cut so that the step never overshoots max_tokens, stays within the token budget (each other decode keeps
its one token), takes blocks only when they are free (drafts never preempt anyone), and, with the prefix
cache, never reaches a block boundary (the snapshot taken there must be of accepted tokens: a boundary
is reached by a plain decode). `advance` then counts the accepted drafts and gives back the blocks past
the kept tokens.

Waiting sequences are admitted in FairQueue order (cluster/engine/fair_queue.py): preempted ones first,
then FCFS within a tenant and weighted fair queuing across tenants, so one tenant's flood cannot
starve another's request; with one tenant it is FCFS. When every slot is taken and the next waiting
sequence's tenant runs fewer than its share of max_num_seqs (by weight), the newest sequence of a tenant
over its share is preempted to its own tenant's queue (`_preempt_for_share`): the quiet tenant's
request runs at the next step, not when the flood's next request finishes. The sequence FairQueue names next is admitted first
or no one is (it is never overtaken for fitting worse).

A sequence is admitted only when a state slot and the blocks for its whole prompt are free; a decode
takes a new block when its length crosses a block boundary. A preempted sequence gives back its blocks
and slot and goes first in line; readmitted, it prefills its prompt plus every token generated so far
(recomputed, never sampled again), then samples its next token: its stream goes on where it stopped.
A long prompt is cut into chunks of at most `prefill_chunk` tokens, so it never holds a step long
enough to starve the decodes.

Prefix cache (model/cache/prefix_cache.py), when the block manager has snapshots: admission looks up
the longest prefix of the tokens to prefill whose blocks are cached and whose last block has a state
snapshot, capped at (tokens - 1) rounded down to a block (the last token is always run: its logits give
the next token); the sequence references those blocks, its slot gets the snapshot (StepPlan.restores),
and it prefills the rest as continuing chunks. Snapshots of the DeltaNet state are taken after a step
(StepPlan.saves) where a sequence's computed tokens reach

    a multiple of `snapshot_every`   (prefill chunks end there)          -> published at once
    the prefill's last full block    (one chunk ends there: one more step when it would not have)
    any block boundary in decode     -> the sequence's "tail": one snapshot it holds and overwrites,
                                        published when it finishes (not on abort) or is preempted

so the next agent turn (prompt = previous prompt + output + new text) hits up to the last block
boundary the previous turn computed. Full blocks are keyed as they fill, after their step. Pure bookkeeping: no asyncio, no Ray, no tensors; the engine owns the
forward pass and calls `advance` and `finish` with what it produced.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from nextserve.model.cache.block_manager import BlockManager
from nextserve.cluster.engine.contract import EngineRequest, FinishReason
from nextserve.cluster.engine.fair_queue import FairQueue
from nextserve.model.cache.prefix_cache import BlockKey, block_key, salt_key


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Sequences running at once (each holds a state slot; a small cache budget may give fewer slots);
    more wait, admitted FCFS within a tenant and fairly across tenants (FairQueue)."""
    max_tokens_per_step: int = 512
    """Token budget of one batched forward: decodes + prefill chunks. Bounds a step's latency."""
    prefill_chunk: int = 256
    """Most prompt tokens one sequence brings to a step; half the default budget, so two prompts can
    prefill side by side while every running sequence still decodes."""
    micro_batches: int = 1
    """Split each step's sequences into this many micro-batches, run in ping-pong (while the experts
    serve one micro-batch's layer, the head computes the next one's mixer). Pays when the head and the
    experts have their own cores or GPUs; each split adds one dispatch round per MoE layer."""
    min_micro_batch_seqs: int = 4
    """A step with fewer sequences than this per micro-batch is not split."""
    max_queued_requests: int = 256
    """Requests a head holds admitted beyond those it can run at once: it holds at most (max_num_seqs, or
    fewer when the cache has fewer state slots) + max_queued_requests in flight, and refuses a new one past
    that at once (ErrorCode.OVERLOADED: 429 with Retry-After) instead of queueing without bound. 256 is
    four full batches at the default max_num_seqs: a deeper queue only adds latency that a client would
    rather see as a refusal it can retry."""

    @staticmethod
    def auto_micro_batches(head_on_accelerator: bool, experts_on_accelerators: bool) -> int:
        """`--micro-batches auto`: 2 when the head and the experts compute on devices of their own (the
        head's GPU would idle through each round), else 1: on shared CPU cores the overlap has no idle
        core to use and each half pays a round's fixed costs again (`nextserve bench step`: 70.9 ms per
        step with 1, 98.1 ms with 2 on 2 cores)."""
        return 2 if head_on_accelerator and experts_on_accelerators else 1

    def __post_init__(self) -> None:
        if self.micro_batches < 1 or self.min_micro_batch_seqs < 1:
            raise ValueError(f"micro_batches ({self.micro_batches}) and min_micro_batch_seqs "
                             f"({self.min_micro_batch_seqs}) must be >= 1")
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests ({self.max_queued_requests}) must be >= 0")
        if self.max_num_seqs < 1 or self.prefill_chunk < 1:
            raise ValueError(f"max_num_seqs ({self.max_num_seqs}) and prefill_chunk ({self.prefill_chunk}) "
                             f"must be >= 1")
        if self.max_tokens_per_step < self.max_num_seqs:
            raise ValueError(f"max_tokens_per_step ({self.max_tokens_per_step}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}), or a full batch of decodes would not fit in one step")


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class SequenceState:
    """One request's progress and the cache it holds: a state slot and the blocks of its tokens, from
    admission until it finishes or is preempted."""
    request: EngineRequest
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    """Seeded sampling state; a preemption leaves it alone (recomputed tokens are not sampled again)."""
    num_computed_tokens: int = 0
    """Tokens in the cache: the position of the next token run through the model."""
    num_prefill_tokens: int = -1
    """Tokens to run before the next sample: the prompt, or after a preemption the prompt plus every
    token generated so far. -1: the prompt (set at construction)."""
    slot: int | None = None
    block_ids: list[int] = field(default_factory=list)
    """KV blocks holding tokens [i·bs, (i+1)·bs), in order (full ones may be shared)."""
    block_keys: list[BlockKey] = field(default_factory=list)
    """Prefix-cache keys of the first full blocks of prompt + output (tokens that never change)."""
    num_keyed_blocks: int = 0
    """Of block_ids, the first ones already registered with the prefix cache (or hit there)."""
    snapshot_id: int | None = None
    """A state snapshot this sequence holds: being filled by its step, or its tail."""
    snapshot_tokens: int = 0
    """The tokens the held snapshot's state is after; 0: not filled yet."""
    num_cached_prompt_tokens: int = 0
    """Prompt tokens its (last) prefill of the prompt found in the prefix cache."""
    draft_ids: list[int] = field(default_factory=list)
    """Draft tokens proposed after its last step, verified by its next one (speculative decoding)."""

    def __post_init__(self) -> None:
        if self.num_prefill_tokens < 0:
            self.num_prefill_tokens = len(self.request.prompt_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def tenant_weight(self) -> float:
        return self.request.tenant_weight

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prefill_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        prompt, n = self.request.prompt_ids, len(self.request.prompt_ids)
        return list(prompt[start:end]) + self.output_ids[max(start - n, 0):max(end - n, 0)]


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    seq: SequenceState
    num_scheduled_tokens: int
    """New tokens this sequence brings to the step: a prefill chunk, or 1 for a decode."""
    snapshot_id: int | None = None
    """The snapshot its state is copied into after the step (StepPlan.saves), if any."""
    publishes_snapshot: bool = False
    """That snapshot is published once the step succeeded (else the sequence keeps it as its tail)."""
    draft_ids: tuple[int, ...] = ()
    """A verify chunk's drafts: the sequence runs its last token and these (num_scheduled_tokens = k + 1)."""

    @property
    def num_draft_tokens(self) -> int:
        return len(self.draft_ids)

    @property
    def samples_token(self) -> bool:
        """The step completes the prefill (or decodes), so its logits give the next token."""
        return self.seq.num_computed_tokens + self.num_scheduled_tokens >= self.seq.num_prefill_tokens

    def input_ids(self) -> list[int]:
        """A prefill chunk, or for a decode the last sampled token (and its drafts, verifying them)."""
        start = self.seq.num_computed_tokens
        return self.seq.token_ids(start, start + self.num_scheduled_tokens - self.num_draft_tokens) + \
            list(self.draft_ids)


@dataclass(frozen=True, slots=True)
class StepPlan:
    scheduled: tuple[ScheduledSeq, ...]
    aborted: tuple[SequenceState, ...]
    """Sequences dropped by this schedule (abort requested); already FINISHED with ABORT."""
    new_blocks: tuple[tuple[int, int, int], ...] = ()
    """(slot, index in its block table, block id) of every block handed out by this schedule."""
    preempted: tuple[SequenceState, ...] = ()
    """Sequences this schedule preempted (back in the waiting queue, first in line)."""
    shared_blocks: tuple[tuple[int, int, int], ...] = ()
    """(slot, index, block id) of every cached block a newly admitted sequence references (not zeroed)."""
    restores: tuple[tuple[int, int], ...] = ()
    """(snapshot, slot): copy the snapshot's DeltaNet states into the slot before the step."""
    saves: tuple[tuple[int, int], ...] = ()
    """(slot, snapshot): copy the slot's DeltaNet states into the snapshot after the step."""

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: FairQueue[SequenceState] = FairQueue()
        self.running: list[SequenceState] = []
        """In admission order: the last one is preempted first."""
        self.num_preemptions = 0
        """Preemptions since start."""
        self.prefix_queried_tokens = 0
        """Tokens to prefill looked up in the prefix cache at admissions since start (readmissions too)."""
        self.prefix_hit_tokens = 0
        """Of those, tokens found (not run)."""
        self._by_id: dict[str, SequenceState] = {}
        self._abort_ids: set[str] = set()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    def add(self, seq: SequenceState) -> None:
        if seq.request_id in self._by_id:
            raise ValueError(f"request_id {seq.request_id!r} is already scheduled")
        seq.status = SequenceStatus.WAITING
        self.waiting.push(seq)
        self._by_id[seq.request_id] = seq

    def abort(self, request_id: str) -> bool:
        """Mark for removal at the next `schedule`; False when the id is unknown or already finished."""
        if request_id not in self._by_id:
            return False
        self._abort_ids.add(request_id)
        return True

    def schedule(self) -> StepPlan:
        aborted = self._drop_aborted()
        budget = self.config.max_tokens_per_step
        scheduled: list[ScheduledSeq] = []
        new_blocks: list[tuple[int, int, int]] = []
        shared_blocks: list[tuple[int, int, int]] = []
        restores: list[tuple[int, int]] = []
        preempted: list[SequenceState] = []
        self._preempt_for_share(preempted)
        # decodes first: one token each, always within budget (see config); drafts from what is left
        spare = budget - sum(1 for seq in self.running if not seq.is_prefilling)
        for seq in list(self.running):
            if seq.status is SequenceStatus.RUNNING and not seq.is_prefilling \
                    and self._grow(seq, seq.num_computed_tokens + 1, new_blocks, preempted):
                drafts = self._drafts(seq, spare, new_blocks)
                scheduled.append(ScheduledSeq(seq, 1 + len(drafts), draft_ids=drafts) if drafts
                                 else self._with_snapshot(seq, 1))
                budget -= 1 + len(drafts)
                spare -= len(drafts)
        for seq in self.running:  # their blocks were taken at admission
            if seq.is_prefilling and budget > 0:
                scheduled.append(self._chunk(seq, budget))
                budget -= scheduled[-1].num_scheduled_tokens
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.peek()  # the next in fair order always gets in first, or no one does
            hit_blocks, snapshot = self._lookup(seq)
            need = self.blocks.blocks_for(seq.num_prefill_tokens) - len(hit_blocks)
            if not self.blocks.can_allocate(need, slot=True, reusing=hit_blocks):
                break
            self.waiting.pop(seq)
            seq.slot = self.blocks.allocate_slot()
            self._reference(seq, hit_blocks, snapshot, shared_blocks, restores)
            self._grow(seq, seq.num_prefill_tokens, new_blocks, preempted)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(self._chunk(seq, budget))
            budget -= scheduled[-1].num_scheduled_tokens
        saves = tuple((item.seq.slot, item.snapshot_id) for item in scheduled if item.snapshot_id is not None)
        return StepPlan(tuple(scheduled), tuple(aborted), tuple(new_blocks), tuple(preempted), tuple(shared_blocks),
                        tuple(restores), saves)  # type: ignore[arg-type]

    def advance(self, item: ScheduledSeq, token_id: int | None, accepted: Sequence[int] = ()) -> None:
        """Record a finished step for one sequence: the tokens it ran, the token it sampled; key the
        blocks it filled and publish the snapshot it took. A verify chunk: `accepted` are its drafts that
        stay (a prefix of them), output before token_id; the blocks past the kept tokens go back."""
        seq = item.seq
        seq.num_computed_tokens += item.num_scheduled_tokens - item.num_draft_tokens + len(accepted)
        seq.output_ids.extend(accepted)
        if token_id is not None:
            seq.output_ids.append(token_id)
        seq.draft_ids = []
        if len(accepted) < item.num_draft_tokens:
            self._truncate(seq)
        if not self.blocks.is_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.blocks.block_size
        keys = self._keys(seq, num_full)
        for i in range(seq.num_keyed_blocks, num_full):
            self.blocks.cache.register(seq.block_ids[i], keys[i])
        seq.num_keyed_blocks = max(seq.num_keyed_blocks, num_full)
        if item.snapshot_id is not None:
            seq.snapshot_tokens = seq.num_computed_tokens
            if item.publishes_snapshot:
                self.blocks.cache.publish_snapshot(item.snapshot_id, keys[num_full - 1])
                seq.snapshot_id, seq.snapshot_tokens = None, 0

    def finish(self, seq: SequenceState, reason: FinishReason) -> None:
        """Leave the batch now, giving back its blocks and slot (and publishing its tail snapshot, unless
        aborted: a failed step may have left it half written)."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._free(seq, publish=reason is not FinishReason.ABORT)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        del self._by_id[seq.request_id]
        self._abort_ids.discard(seq.request_id)

    def _grow(self, seq: SequenceState, num_tokens: int, new_blocks: list[tuple[int, int, int]],
              preempted: list[SequenceState]) -> bool:
        """Give seq the blocks for num_tokens tokens, preempting the most recently admitted running
        sequences while none are free; False when seq itself was the one preempted."""
        need = self.blocks.blocks_for(num_tokens) - len(seq.block_ids)
        while not self.blocks.can_allocate(need):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        assert seq.slot is not None
        for block in self.blocks.allocate_blocks(need):
            new_blocks.append((seq.slot, len(seq.block_ids), block))
            seq.block_ids.append(block)
        return True

    def _drafts(self, seq: SequenceState, spare: int, new_blocks: list[tuple[int, int, int]]) -> tuple[int, ...]:
        """The drafts seq verifies this step (its blocks taken): as many of seq.draft_ids as the output
        left (max_tokens), `spare` budget tokens, free blocks and, with the prefix cache, the next block
        boundary allow (module docstring)."""
        k = min(len(seq.draft_ids), spare)
        max_tokens = seq.request.params.max_tokens
        if max_tokens is not None:
            k = min(k, max_tokens - len(seq.output_ids) - 1)  # the step outputs up to k + 1 tokens
        end, bs = seq.num_computed_tokens + 1, self.blocks.block_size  # tokens cached after a plain decode
        if self.blocks.is_prefix_caching:
            k = min(k, -end % bs - 1)  # ends c + 1 .. c + 1 + k all short of the next boundary
        if k < 1:
            return ()
        need = self.blocks.blocks_for(end + k) - len(seq.block_ids)
        if not self.blocks.can_allocate(need):
            return ()
        assert seq.slot is not None
        for block in self.blocks.allocate_blocks(need):
            new_blocks.append((seq.slot, len(seq.block_ids), block))
            seq.block_ids.append(block)
        return tuple(seq.draft_ids[:k])

    def _truncate(self, seq: SequenceState) -> None:
        """Give back the blocks past seq's cached tokens and the one it decodes next (rejected drafts')."""
        keep = self.blocks.blocks_for(seq.num_computed_tokens + 1)
        if len(seq.block_ids) > keep:
            self.blocks.free_blocks(seq.block_ids[:keep - 1:-1])
            del seq.block_ids[keep:]

    def _preempt(self, seq: SequenceState, for_share: bool = False) -> None:
        """Back to the head of the queue without blocks or slot, to recompute prompt + output (from the
        prefix cache as far as its blocks and tail snapshot survive there); `for_share`: to the head of
        its tenant's queue (it waits its tenant's turn), else first in line."""
        self.running.remove(seq)
        self._free(seq, publish=True)
        seq.num_computed_tokens, seq.draft_ids = 0, []
        seq.num_prefill_tokens = seq.num_prompt_tokens + len(seq.output_ids)
        seq.status = SequenceStatus.WAITING
        if for_share:
            self.waiting.push_front_of_tenant(seq)
        else:
            self.waiting.push_front(seq)
        self.num_preemptions += 1

    def _preempt_for_share(self, preempted: list[SequenceState]) -> None:
        """Every slot is taken and the next waiting sequence's tenant runs fewer than its share of
        max_num_seqs (by weight, among the tenants running or next): preempt the most recently admitted
        sequence of a tenant that stays at or above its share without it. So a tenant's flood holding all
        slots gives one up at once to another tenant's request instead of when one of its own finishes;
        a tenant alone keeps every slot."""
        if len(self.running) < self.config.max_num_seqs or not self.waiting or self.waiting.is_preempted_next:
            return
        candidate = self.waiting.peek()
        weights = {s.tenant: s.tenant_weight for s in (*self.running, candidate)}
        total, num_running = sum(weights.values()), Counter(s.tenant for s in self.running)

        def share(tenant: str) -> float:
            return self.config.max_num_seqs * weights[tenant] / total

        if num_running[candidate.tenant] + 1 > share(candidate.tenant):
            return
        for victim in reversed(self.running):
            if num_running[victim.tenant] - 1 >= share(victim.tenant):
                self._preempt(victim, for_share=True)
                preempted.append(victim)
                return

    def _free(self, seq: SequenceState, publish: bool) -> None:
        if seq.slot is not None:
            self.blocks.free_blocks(seq.block_ids[::-1])  # leaves first: the root is evicted last
            self.blocks.free_slot(seq.slot)
        if seq.snapshot_id is not None:
            if publish and seq.snapshot_tokens:
                key = self._keys(seq, seq.snapshot_tokens // self.blocks.block_size)[-1]
                self.blocks.cache.publish_snapshot(seq.snapshot_id, key)
            else:
                self.blocks.cache.free_snapshot(seq.snapshot_id)
        seq.slot, seq.block_ids, seq.num_keyed_blocks = None, [], 0
        seq.snapshot_id, seq.snapshot_tokens = None, 0

    def _keys(self, seq: SequenceState, num_blocks: int) -> list[BlockKey]:
        """The keys of seq's first num_blocks full blocks (computed once, kept on the sequence)."""
        keys, bs = seq.block_keys, self.blocks.block_size
        for i in range(len(keys), num_blocks):
            parent = keys[i - 1] if i else salt_key(seq.request.tenant, seq.request.cache_salt)
            keys.append(block_key(parent, seq.token_ids(i * bs, (i + 1) * bs)))
        return keys[:num_blocks]

    def _lookup(self, seq: SequenceState) -> tuple[list[int], int | None]:
        """The longest cached prefix of seq's tokens to prefill with a snapshot at its end: its blocks
        and the snapshot, or ([], None)."""
        if not self.blocks.is_prefix_caching:
            return [], None
        keys = self._keys(seq, (seq.num_prefill_tokens - 1) // self.blocks.block_size)
        blocks = self.blocks.cache.match(keys)
        for n in range(len(blocks), 0, -1):
            snapshot = self.blocks.cache.snapshot_for(keys[n - 1])
            if snapshot is not None:
                return blocks[:n], snapshot
        return [], None

    def _reference(self, seq: SequenceState, hit_blocks: list[int], snapshot: int | None,
                   shared_blocks: list[tuple[int, int, int]], restores: list[tuple[int, int]]) -> None:
        """A newly admitted seq starts after its prefix-cache hit: the hit blocks referenced in its
        table, the snapshot restored into its slot."""
        assert seq.slot is not None and not seq.block_ids
        num_hit = len(hit_blocks) * self.blocks.block_size
        self.prefix_queried_tokens += seq.num_prefill_tokens
        self.prefix_hit_tokens += num_hit
        if not seq.output_ids:
            seq.num_cached_prompt_tokens = num_hit
        if snapshot is None:
            return
        self.blocks.cache.acquire(hit_blocks)
        shared_blocks.extend((seq.slot, i, block) for i, block in enumerate(hit_blocks))
        seq.block_ids, seq.num_keyed_blocks, seq.num_computed_tokens = list(hit_blocks), len(hit_blocks), num_hit
        restores.append((snapshot, seq.slot))

    def _chunk(self, seq: SequenceState, budget: int) -> ScheduledSeq:
        """The next prefill chunk, ending at the next snapshot boundary when one comes before its end."""
        start = seq.num_computed_tokens
        end = start + min(seq.num_prefill_tokens - start, self.config.prefill_chunk, budget)
        if self.blocks.is_prefix_caching:
            every, bs = self.blocks.snapshot_every, self.blocks.block_size
            # the last full block of the prefill too: its tail, at the cost of one more chunk when the
            # prefill's last block boundary falls inside what would have been its last chunk
            points = ((start // every + 1) * every, seq.num_prefill_tokens // bs * bs)
            end = min([end] + [p for p in points if start < p < end])
        return self._with_snapshot(seq, end - start)

    def _with_snapshot(self, seq: SequenceState, n: int) -> ScheduledSeq:
        """seq running n tokens, with a snapshot to take after the step when they end on a boundary
        worth one (module docstring): into the snapshot seq holds, else a new one."""
        end, every, bs = seq.num_computed_tokens + n, self.blocks.snapshot_every, self.blocks.block_size
        if not self.blocks.is_prefix_caching or end % bs:
            return ScheduledSeq(seq, n)
        publishes = end % every == 0
        is_point = publishes or n == 1 or (seq.is_prefilling and end == seq.num_prefill_tokens // bs * bs)
        if not is_point or self.blocks.cache.has_snapshot(self._keys(seq, end // bs)[-1]):
            return ScheduledSeq(seq, n)
        if seq.snapshot_id is None:
            seq.snapshot_id, seq.snapshot_tokens = self.blocks.cache.take_snapshot(is_tail=not publishes), 0
            if seq.snapshot_id is None:
                return ScheduledSeq(seq, n)
        return ScheduledSeq(seq, n, seq.snapshot_id, publishes)

    def _drop_aborted(self) -> list[SequenceState]:
        aborted = [self._by_id[i] for i in self._abort_ids if i in self._by_id]
        self._abort_ids.clear()
        for seq in aborted:
            self.finish(seq, FinishReason.ABORT)
        return aborted
