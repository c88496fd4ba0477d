"""Continuous-batching scheduler: which sequences run in the next step, and how many tokens each.

    add() -> waiting (FCFS) --schedule()--> running --finish()--> finished (cache dropped)
                                  |
          every step: decodes first (1 token each), then prefill chunks of the running sequences
          still prefilling, then newly admitted waiting sequences, while the token budget lasts.

A long prompt is cut into chunks of at most `prefill_chunk` tokens, so it never holds a step long
enough to starve the decodes. Pure bookkeeping: no asyncio, no Ray, no tensors; the engine owns the
forward pass and calls `advance` and `finish` with what it produced.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import torch

from nextserve.model.cache import SequenceCache
from nextserve.model.sampling import SamplingParams


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Sequences running at once (each holds a hybrid cache); more wait in FCFS order."""
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

    def __post_init__(self) -> None:
        if self.micro_batches < 1 or self.min_micro_batch_seqs < 1:
            raise ValueError(f"micro_batches ({self.micro_batches}) and min_micro_batch_seqs "
                             f"({self.min_micro_batch_seqs}) must be >= 1")
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


class FinishReason(enum.Enum):
    """Values are OpenAI's `finish_reason` strings (abort has none there; the gateway maps it)."""
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(frozen=True, slots=True)
class Request:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    stop: tuple[str, ...] = ()
    """Stop strings: the text ends just before the first one found (it is not included)."""


@dataclass(slots=True)
class SequenceState:
    """One request's progress. `cache` is allocated by the engine on the first step and dropped
    (set to None) when the sequence finishes, which frees its hybrid state."""
    request: Request
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_prefilled: int = 0
    """Prompt tokens already run through the model."""
    output_ids: list[int] = field(default_factory=list)
    cache: SequenceCache | None = None
    generator: torch.Generator | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.num_prefilled < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    seq: SequenceState
    num_scheduled_tokens: int
    """New tokens this sequence brings to the step: a prefill chunk, or 1 for a decode."""

    @property
    def samples_token(self) -> bool:
        """The step completes the prompt (or decodes), so its logits give the next token."""
        return self.seq.num_prefilled + self.num_scheduled_tokens >= self.seq.num_prompt_tokens

    def input_ids(self) -> list[int]:
        seq = self.seq
        if seq.is_prefilling:
            return list(seq.request.prompt_ids[seq.num_prefilled:seq.num_prefilled + self.num_scheduled_tokens])
        return [seq.output_ids[-1]]


@dataclass(frozen=True, slots=True)
class StepPlan:
    scheduled: tuple[ScheduledSeq, ...]
    aborted: tuple[SequenceState, ...]
    """Sequences dropped by this schedule (abort requested); already FINISHED with ABORT."""

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []
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
        self.waiting.append(seq)
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
        for seq in self.running:  # decodes first: one token each, always within budget (see config)
            if not seq.is_prefilling:
                scheduled.append(ScheduledSeq(seq, 1))
                budget -= 1
        for seq in self.running:
            if seq.is_prefilling and budget > 0:
                scheduled.append(self._chunk(seq, budget))
                budget -= scheduled[-1].num_scheduled_tokens
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.popleft()  # FCFS: the head of the queue always gets in first
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(self._chunk(seq, budget))
            budget -= scheduled[-1].num_scheduled_tokens
        return StepPlan(tuple(scheduled), tuple(aborted))

    def advance(self, item: ScheduledSeq, token_id: int | None) -> None:
        """Record a finished step for one sequence: the prompt chunk it consumed, the token it sampled."""
        seq = item.seq
        if seq.is_prefilling:
            seq.num_prefilled += item.num_scheduled_tokens
        if token_id is not None:
            seq.output_ids.append(token_id)

    def finish(self, seq: SequenceState, reason: FinishReason) -> None:
        """Leave the batch now; the cache is dropped with the reference."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason, seq.cache = SequenceStatus.FINISHED, reason, None
        del self._by_id[seq.request_id]
        self._abort_ids.discard(seq.request_id)

    def _chunk(self, seq: SequenceState, budget: int) -> ScheduledSeq:
        left = seq.num_prompt_tokens - seq.num_prefilled
        return ScheduledSeq(seq, min(left, self.config.prefill_chunk, budget))

    def _drop_aborted(self) -> list[SequenceState]:
        aborted = [self._by_id[i] for i in self._abort_ids if i in self._by_id]
        self._abort_ids.clear()
        for seq in aborted:
            self.finish(seq, FinishReason.ABORT)
        return aborted
