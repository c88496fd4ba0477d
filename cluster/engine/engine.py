"""Head engine: the head model plus an expert backend, serving many requests by continuous batching.

    generate() (asyncio) --inbox--> engine thread: loop { schedule -> forward -> sample -> detokenize
        ^                                                  -> stop? finish (blocks and slot freed) }
        |                                                             |
        +---- one OutputStream per request: outputs ready since the consumer last read, merged into one item

The step loop runs in one background thread (torch releases the GIL while it computes), so the
asyncio side only validates, enqueues and awaits. A consumer that falls behind gets every ready token
in its next item instead of one event per token. A consumer that stops iterating (client disconnect,
cancel) aborts its request; the next schedule drops the sequence and its cache.

The cache is allocated once, at start, from `CacheConfig.cache_memory_bytes` (KV blocks + state slots,
model/cache/budget.py). When a decode finds no free block the scheduler evicts prefix-cached blocks,
then preempts the most recently admitted sequence; it recomputes later and its stream simply goes on
(no token is sent twice). A request whose prompt starts like an earlier one's restores that prefix from
the prefix cache (model/cache/prefix_cache.py) and prefills only the rest; its outputs report the
prompt tokens it did not run (`StepOutput.cached_tokens`). A request with a grammar
(`EngineRequest.grammar`: structured outputs, forced tool calls) is compiled at admission and has its
logits row masked before each sample (cluster/engine/grammar.py); the grammar taking its stop token ends it.

Speculative decoding (`speculative`, a SpeculativeConfig): after each step the drafter
(cluster/engine/drafter.py) proposes up to K tokens per decoding sequence; the next step runs each drafted
sequence's last token and its drafts as one verify chunk through the same forward (one MoE round per layer,
logits at every position), and `_accept` keeps the drafts the target model agrees with: greedy, those equal
to the argmax (the output is exactly that of decoding without drafts); sampled, speculative sampling's rule
(`verify_draft`). One token more comes from the first rejected (or the bonus) position, and the rejected
positions are rolled back (the scheduler's blocks, the runner's DeltaNet states). Drafting is off while
more than `disable_by_batch_size` sequences run, and for a request that opts out
(EngineRequest.allow_speculation), and for a request with a grammar (its mask is per position; it decodes
one token per step).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from nextserve.model.cache.block_manager import BlockManager
from nextserve.cluster.engine.contract import (EngineError, EngineOverloadedError, EngineRequest, EngineRequestError,
                                               EngineStats, EngineUnavailableError, ErrorCode, FinishReason,
                                               SamplingParams, StepOutput, check_prompt_fits)
from nextserve.cluster.engine.drafter import DraftInput, Drafter
from nextserve.cluster.engine.mtp_drafter import MtpDrafter
from nextserve.cluster.engine.ngram_drafter import NgramDrafter
from nextserve.cluster.engine.speculative_config import SpeculativeConfig, SpeculativeConfigError, SpeculativeMethod
from nextserve.cluster.engine.detokenizer import MAX_STOP_CHARS, MAX_STOP_STRINGS, IncrementalDetokenizer, OutputStream
from nextserve.cluster.engine.grammar import GrammarCompiler, GrammarMasks
from nextserve.cluster.engine.model_runner import ModelRunner, head_cache_capacity
from nextserve.cluster.engine.scheduler import (ScheduledSeq, Scheduler, SchedulerConfig, SequenceState,
                                                SequenceStatus, StepPlan)
from nextserve.model.cache.budget import CacheConfig
from nextserve.model.cache.pools import HybridCache
from nextserve.model.expert_backend import ExpertBackend
from nextserve.cluster.tracing import is_enabled as tracing_is_enabled, start_head_span, start_step_span
from nextserve.model.qwen3_next import HeadModel
from nextserve.model.sampling import (TokenLogprobs, allowed_next_tokens, make_generator, sample, token_logprobs,
                                      verify_draft)
from nextserve.router.dispatcher import ExpertsUnavailableError

log = logging.getLogger(__name__)


class NonFiniteLogitsError(RuntimeError):
    """The model's logits for one sequence hold NaN: that sequence ends; the batch goes on."""


def step_failure(exc: Exception) -> EngineError:
    """What a request whose step (or own postprocessing) failed is told: experts without a live worker name
    the experts (503); any other failure is logged with its traceback where it happened and reaches the
    client as a stable message (500), never the exception's text."""
    if isinstance(exc, ExpertsUnavailableError):
        return EngineUnavailableError(f"{exc}; retry shortly")
    if isinstance(exc, NonFiniteLogitsError):
        return EngineError("the model produced non-finite values (NaN) for this request; it was logged, retry it")
    return EngineError("the server failed while generating this request; it was logged, retry it")


def make_drafter(config: SpeculativeConfig, head: HeadModel, experts: ExpertBackend, cache: HybridCache) -> Drafter:
    """The drafter `config.method` names for this head's checkpoint (SpeculativeConfigError when the
    checkpoint cannot serve it)."""
    if config.method is SpeculativeMethod.NGRAM:
        return NgramDrafter(config.prompt_lookup_min, config.prompt_lookup_max)
    if head.mtp is not None:
        return MtpDrafter(head, experts, cache)
    raise SpeculativeConfigError(f"--speculative-config method {config.method.value!r} needs the checkpoint's "
                                 f"MTP layer (mtp.* weights, num_nextn_predict_layers >= 1), which this head does "
                                 f"not load; serve it with method 'ngram' or without --speculative-config")


@dataclass(slots=True)
class SpecDecodeCounts:
    """Speculative decoding since start (EngineStats' spec_decode_* fields)."""
    num_drafts: int = 0
    """Verify chunks run: a sequence's step with >= 1 draft."""
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = dataclasses.field(default_factory=list)
    """[K] drafts accepted at each position of the chunks (position 0: the first draft)."""

    def count(self, num_drafts: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        self.accepted_per_pos.extend([0] * (num_drafts - len(self.accepted_per_pos)))
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1


@dataclass(slots=True)
class _Entry:
    seq: SequenceState
    detokenizer: IncrementalDetokenizer | None  # None: token ids only
    stream: OutputStream
    grammar: xgr.CompiledGrammar | None = None  # what the output must parse as (None: free text)
    matcher: xgr.GrammarMatcher | None = None  # built at its first sample, dropped when preempted


class Engine:
    def __init__(self, head: HeadModel, experts: ExpertBackend, tokenizer: PreTrainedTokenizerBase | None,
                 config: SchedulerConfig | None = None, max_model_len: int | None = None,
                 cache_config: CacheConfig | None = None, speculative: SpeculativeConfig | None = None,
                 drafter: Drafter | None = None) -> None:
        """`tokenizer` None serves token ids only (outputs carry no text; stop strings are refused).
        `max_model_len`: the context the engine admits (prompt + output tokens), at most the model's
        (max_position_embeddings, the default). `cache_config`: the cache budget and block size.
        `speculative`: draft and verify tokens (None: one token per sequence and step); `drafter`: its
        drafter, by default the one `speculative.method` names (make_drafter)."""
        context = head.config.max_position_embeddings
        self.max_model_len = context if max_model_len is None else max_model_len
        if not 2 <= self.max_model_len <= context:
            raise ValueError(f"max_model_len={self.max_model_len} must be in [2, {context}] (the model's context "
                             f"window, max_position_embeddings); lower it or omit it to use the full context")
        self.head, self.experts = head, experts
        config = config or SchedulerConfig()
        self.capacity = head_cache_capacity(head, cache_config or CacheConfig(), config.max_num_seqs,
                                            self.max_model_len)
        """KV blocks and state slots of the cache (ConfigError at start when the budget holds no sequence)."""
        self.scheduler = Scheduler(config, BlockManager(self.capacity.num_blocks, self.capacity.num_slots,
                                                        self.capacity.block_size, self.capacity.num_snapshots,
                                                        self.capacity.snapshot_every))
        self.speculative = speculative
        needs_hidden = drafter.needs_hidden_states if drafter is not None else (
            speculative is not None and speculative.method is SpeculativeMethod.MTP)
        self.runner = ModelRunner(head, experts, self.capacity, config, keep_hidden_states=needs_hidden)
        self.drafter = None if speculative is None else drafter or make_drafter(speculative, head, experts,
                                                                                self.runner.cache)
        self.spec_counts = SpecDecodeCounts()
        self._positions: dict[str, int] = {}  # request id -> its first position in the current step
        self.max_in_flight = min(config.max_num_seqs, self.capacity.num_slots) + config.max_queued_requests
        """Requests admitted and not finished a head holds at most: what runs at once + the waiting queue's
        bound (SchedulerConfig.max_queued_requests); `_submit` refuses past it (OVERLOADED)."""
        self.tokenizer = tokenizer
        self.vocab_size = head.config.vocab_size if tokenizer is None else min(len(tokenizer), head.config.vocab_size)
        """Token ids a prompt may hold: the tokenizer's (the real model pads its embedding past it)."""
        self._lock = threading.Lock()  # guards _inbox, _abort_ids, _request_ids (what is in flight), _is_stopped
        self._inbox: list[_Entry] = []
        self._abort_ids: list[str] = []
        self._request_ids: set[str] = set()
        self._is_stopped = False
        self._entries: dict[str, _Entry] = {}  # engine thread only, like _outbox
        self._outbox: list[tuple[OutputStream, StepOutput | Exception]] = []
        self._wake = threading.Event()
        self._stats = self._current_stats(num_steps=0)
        self._grammar_lock = threading.Lock()
        self._grammar_masks: GrammarMasks | None = None  # made at the first grammar request
        self._thread = threading.Thread(target=self._run, name="nextserve-engine", daemon=True)
        self._thread.start()

    async def generate(self, request: EngineRequest) -> AsyncGenerator[StepOutput, None]:
        """Stream a request's outputs; a bad request raises EngineRequestError at the first iteration, a
        failed step EngineError (its code says why). Stopping early (aclose, cancel, a client gone) aborts
        the request."""
        request_id = request.request_id
        span = start_head_span(request_id, request.trace_context)  # None unless traced (cluster/tracing.py)
        try:
            admitted = self.admit(request)
            if span is not None:  # the engine's steps link to the head's span (start_step_span)
                admitted = dataclasses.replace(admitted, trace_context=span.traceparent)
            stream = self._submit(admitted, OutputStream(asyncio.get_running_loop()))
        except Exception as exc:
            if span is not None:
                span.end(exc)
            raise
        if span is not None:
            span.admitted()
        error: Exception | None = None
        is_finished = False
        try:
            while not is_finished:
                out = await stream.get()
                is_finished = out.finish_reason is not None
                if span is not None:
                    span.on_output(out.token_ids, None if out.finish_reason is None else out.finish_reason.value,
                                   out.prompt_tokens, out.completion_tokens)
                yield out
        except Exception as exc:
            error = exc
            raise
        finally:
            if span is not None:
                span.end(error)
            if not is_finished:  # the consumer left (disconnect, cancel) or the step failed
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Free the request at the next step; its stream ends with finish_reason ABORT. Thread-safe."""
        with self._lock:
            self._abort_ids.append(request_id)
        self._wake.set()

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def is_running(self) -> bool:
        """The step loop is alive and not shut down."""
        return self._thread.is_alive() and not self._is_stopped

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the loop after the current step; unfinished requests end with ABORT."""
        with self._lock:
            self._is_stopped = True
        self._wake.set()
        self._thread.join(timeout_s)

    def generate_sync(self, prompts: Sequence[Sequence[int]],
                      params: SamplingParams | Sequence[SamplingParams]) -> list[StepOutput]:
        """All prompts concurrently, each merged into one output (for tests and scripts)."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        tag = uuid.uuid4().hex

        async def one(i: int) -> StepOutput:
            request = EngineRequest(f"{tag}-{i}", tuple(prompts[i]), per_prompt[i])
            outs = [out async for out in self.generate(request)]
            return functools.reduce(StepOutput.merge, outs)

        async def run_all() -> list[StepOutput]:
            return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))

        return asyncio.run(run_all())

    def admit(self, request: EngineRequest) -> EngineRequest:
        """The request as the engine will run it, or EngineRequestError naming the field and its code. The
        one place the serving rules live: the APIs check only the shape of their JSON and map the code.
        `max_tokens` is clamped to the room the prompt leaves in `max_model_len` (None: all the room the
        context and the cache leave); the sequence then ends with finish_reason "length" there. A request
        that could not run even alone in the whole cache (prompt + max_tokens past the tokens the budget
        holds) is refused: it would wait for blocks forever."""
        n, context, stop = len(request.prompt_ids), self.max_model_len, request.params.stop
        too_long = ErrorCode.CONTEXT_LENGTH_EXCEEDED
        if not request.request_id:
            raise EngineRequestError("the request id is empty; give every request a unique id", param="request_id")
        if n == 0:
            raise EngineRequestError("the prompt is empty; send at least one token", param="prompt")
        check_prompt_fits(n, context)
        bad = [t for t in request.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise EngineRequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})",
                                     param="prompt")
        if any(not s for s in stop):
            raise EngineRequestError(f"stop strings must be non-empty, got {list(stop)}", param="stop")
        if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
            raise EngineRequestError(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} "
                                     f"characters each are served, got {len(stop)} of up to "
                                     f"{max(map(len, stop))} characters", param="stop")
        if stop and self.tokenizer is None:
            raise EngineRequestError("stop strings need text: this engine serves token ids only (no tokenizer); "
                                     "use stop_token_ids", param="stop")
        if request.grammar is not None:
            self.grammar_masks(request.grammar.param).compiler.compile(request.grammar)
        room, asked = context - n, request.params.max_tokens
        fit = self.capacity.max_tokens  # the tokens one sequence's blocks can hold: the whole pool
        if n > fit:
            raise EngineRequestError(f"the prompt has {n} tokens, more than the {fit} tokens this server's cache "
                                     f"holds per sequence (--cache-memory); shorten it", param="prompt", code=too_long)
        cache_room = fit - n + 1  # the last output token is sampled, never cached
        if asked is not None and min(asked, room) > cache_room:
            raise EngineRequestError(f"prompt ({n} tokens) + max_tokens ({min(asked, room)}) need "
                                     f"{n + min(asked, room) - 1} cached tokens, more than the {fit} this server's "
                                     f"cache holds per sequence (--cache-memory); ask for at most {cache_room}",
                                     param="max_tokens", code=too_long)
        if asked is not None and asked <= room:
            return request
        room = min(room, cache_room)
        return dataclasses.replace(request, params=dataclasses.replace(request.params, max_tokens=room))

    def grammar_masks(self, param: str = "response_format") -> GrammarMasks:
        """The grammar compiler and step masks (made on first use: the tokenizer's vocabulary is read once);
        EngineRequestError naming `param` on an engine that cannot enforce a grammar."""
        with self._grammar_lock:
            if self._grammar_masks is None:
                if self.tokenizer is None:
                    raise EngineRequestError("a grammar needs the tokenizer's vocabulary: this engine serves token "
                                             "ids only", param=param)
                try:
                    compiler = GrammarCompiler(self.tokenizer, self.head.config.vocab_size,
                                               self.head.config.eos_token_ids)
                except ValueError as e:
                    raise EngineRequestError(f"this model cannot be constrained by a grammar: {e}", param=param) \
                        from None
                self._grammar_masks = GrammarMasks(compiler)
            return self._grammar_masks

    def _submit(self, request: EngineRequest, stream: OutputStream) -> OutputStream:
        detokenizer = None if self.tokenizer is None else IncrementalDetokenizer(
            self.tokenizer.backend_tokenizer, request.prompt_ids, request.params.stop)
        grammar = None if request.grammar is None else self.grammar_masks().compiler.compile(request.grammar)
        entry = _Entry(SequenceState(request, generator=make_generator(request.params)), detokenizer, stream, grammar)
        with self._lock:
            if self._is_stopped:
                raise EngineUnavailableError("this head is shutting down; retry: new requests go to the other "
                                             "head replicas")
            if request.request_id in self._request_ids:
                raise EngineRequestError(f"{request.request_id!r} is already in flight; use a unique id per "
                                         f"request", param="request_id")
            if len(self._request_ids) >= self.max_in_flight:
                raise EngineOverloadedError(f"this server's queue is full ({self.max_in_flight} requests in flight, "
                                            f"{self.scheduler.config.max_queued_requests} of them may wait: "
                                            f"--max-queued-requests); retry after the Retry-After delay")
            self._request_ids.add(request.request_id)
            self._inbox.append(entry)
        self._wake.set()
        return stream

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._is_stopped:
                self._take_inbox()
                if self.scheduler.has_work:
                    self._step()
                else:
                    self._wake.wait()
                    self._wake.clear()
        self._take_inbox()
        for entry in list(self._entries.values()):
            self._finish(entry, FinishReason.ABORT)
        self._flush_outbox()

    def _take_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            abort_ids, self._abort_ids = self._abort_ids, []
        for entry in inbox:
            self._entries[entry.seq.request_id] = entry
            self.scheduler.add(entry.seq)
        for request_id in abort_ids:
            self.scheduler.abort(request_id)

    def _step(self) -> None:
        plan = self.scheduler.schedule()
        for seq in plan.aborted:
            self._retire(self._entries[seq.request_id], FinishReason.ABORT, [])
        for seq in plan.preempted:  # recomputed later: its matcher is rebuilt over its output then
            self._entries[seq.request_id].matcher = None
            if self.drafter is not None:
                self.drafter.release(seq.request_id)
        if not plan.is_empty:
            span = None if not tracing_is_enabled() else start_step_span(
                (item.seq.request.trace_context for item in plan.scheduled), len(plan.scheduled),
                sum(item.num_scheduled_tokens for item in plan.scheduled))  # None: no traced request in it
            try:
                if self.drafter is not None:  # where each sequence's step starts, for the drafter after it
                    self._positions = {item.seq.request_id: item.seq.num_computed_tokens for item in plan.scheduled}
                self._postprocess(plan, self.runner.run(plan))
                self._propose(plan)
                if span is not None:
                    span.end()
            except Exception as exc:  # a failed step (e.g. a lost expert worker) fails its sequences only
                if span is not None:
                    span.end(exc)
                log.exception("step of %d sequences failed", len(plan.scheduled))
                for item in plan.scheduled:
                    if not item.seq.is_finished:
                        self._fail(self._entries[item.seq.request_id], exc)
        self._stats = self._current_stats(self._stats.num_steps + 1)
        self._flush_outbox()  # after the stats, so a consumer seeing its last item sees it gone from them

    def _current_stats(self, num_steps: int) -> EngineStats:
        scheduler, blocks = self.scheduler, self.scheduler.blocks
        return EngineStats(num_running=len(scheduler.running), num_waiting=len(scheduler.waiting), num_steps=num_steps,
                           blocks_used=blocks.num_used_blocks, blocks_total=blocks.num_blocks,
                           slots_used=blocks.num_used_slots, slots_total=blocks.num_slots,
                           num_preemptions=scheduler.num_preemptions, blocks_cached=blocks.num_cached_blocks,
                           snapshots_used=blocks.cache.num_used_snapshots, snapshots_total=blocks.cache.num_snapshots,
                           prefix_cache_queried_tokens=scheduler.prefix_queried_tokens,
                           prefix_cache_hit_tokens=scheduler.prefix_hit_tokens,
                           spec_decode_num_drafts=self.spec_counts.num_drafts,
                           spec_decode_num_draft_tokens=self.spec_counts.num_draft_tokens,
                           spec_decode_num_accepted_tokens=self.spec_counts.num_accepted_tokens,
                           spec_decode_num_accepted_tokens_per_pos=tuple(self.spec_counts.accepted_per_pos))

    def _flush_outbox(self) -> None:
        outbox, self._outbox = self._outbox, []
        for stream, item in outbox:
            stream.put(item)

    def _postprocess(self, plan: StepPlan, logits: torch.Tensor) -> None:
        """logits [R, V] (one row per sequence, k + 1 for one verifying k drafts) -> each sequence's tokens.
        What fails for one sequence (its sampling, its NaN logits, its stop or constraint state, its
        detokenization) ends that sequence alone with an EngineError; the others go on exactly as if it
        were not there. A sequence with a grammar is never drafted (`_propose`): its one row is masked."""
        raw_rows = self._mask_grammar_rows(plan, logits)
        # argmax treats NaN as the largest value, so a row holding a NaN has one at its argmax: the NaN check
        # reads R values, not R x V; one device sync for both.
        best = logits.argmax(dim=-1)  # [R]
        has_nan_at_best = torch.isnan(logits.gather(1, best[:, None]).squeeze(1)).long()  # [R]
        argmax, has_nan = torch.stack([best, has_nan_at_best]).tolist()
        kept: dict[int, int] = {}  # slot -> positions of its verify chunk that stay
        row = 0
        for item in plan.scheduled:
            seq, rows = item.seq, slice(row, row + 1 + item.num_draft_tokens)
            row = rows.stop
            if seq.is_finished and seq.request_id not in self._entries:  # failed above (its grammar matcher)
                continue
            if not item.samples_token:
                self.scheduler.advance(item, None)
                continue
            entry = self._entries[seq.request_id]
            try:
                if any(has_nan[rows]):
                    raise NonFiniteLogitsError(f"the model produced NaN logits for request {seq.request_id}")
                is_grammar_done = False
                if entry.grammar is not None:  # one row, masked
                    token, logprob = self._sample_row(seq, logits[rows.start], argmax[rows.start],
                                                      raw_rows.get(rows.start))
                    is_grammar_done = self._advance_grammar(entry, token)
                    tokens, logprobs = [token], [logprob]
                else:
                    tokens, logprobs = self._accept(seq, item.draft_ids, logits[rows], argmax[rows])
                if item.num_draft_tokens:
                    self.spec_counts.count(item.num_draft_tokens, len(tokens) - 1)
                    kept[seq.slot] = len(tokens)  # type: ignore[index]
                self._on_tokens(entry, item, tokens, logprobs, is_grammar_done)
            except Exception as exc:
                log.exception("request %s failed in its own postprocessing; the other %d sequences of the step "
                              "go on", seq.request_id, len(plan.scheduled) - 1)
                if not seq.is_finished:
                    self._fail(entry, exc)
                elif seq.request_id in self._entries:  # finished by the scheduler, its output not yet sent
                    self._forget(seq.request_id)
                    self._outbox.append((entry.stream, step_failure(exc)))
        if kept:
            self.runner.roll_back(kept)

    def _accept(self, seq: SequenceState, drafts: Sequence[int], rows: torch.Tensor,
                argmax: list[int]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """rows [k + 1, V] of a sequence verifying k drafts (k = 0: a plain decode) -> its tokens (the
        accepted drafts, then the token of the first rejected or the bonus position) and their logprobs."""
        params = seq.request.params
        tokens: list[int] = []
        for j, draft in enumerate(drafts):
            token = argmax[j] if params.is_greedy else verify_draft(rows[j], draft, params, seq.generator)
            tokens.append(token)
            if token != draft:
                break
        else:
            tokens.append(self._sample_row(seq, rows[len(drafts)], argmax[len(drafts)])[0])
        logprobs = [None if params.logprobs is None else token_logprobs(rows[j], t, params.logprobs)
                    for j, t in enumerate(tokens)]
        return tokens, logprobs

    def _mask_grammar_rows(self, plan: StepPlan, logits: torch.Tensor) -> dict[int, torch.Tensor]:
        """logits [R, V]: the rows of sequences with a grammar that sample now get their mask (in place);
        returns those rows' raw logits [V] where logprobs were asked for (logprobs are of the raw logits).
        A sequence whose matcher cannot be rebuilt fails alone."""
        rows, matchers, raw_rows = [], [], {}
        first_row = 0
        for item in plan.scheduled:
            i, first_row = first_row, first_row + 1 + item.num_draft_tokens  # a grammar's sequence has no drafts
            entry = self._entries.get(item.seq.request_id)
            if entry is None or entry.grammar is None or not item.samples_token:
                continue
            if entry.matcher is None:
                try:
                    entry.matcher = self.grammar_masks().compiler.matcher(entry.grammar, item.seq.output_ids)
                except Exception as exc:
                    log.exception("request %s: its grammar matcher could not be rebuilt", item.seq.request_id)
                    self._fail(entry, exc)
                    continue
            if item.seq.request.params.logprobs is not None:
                raw_rows[i] = logits[i].clone()
            rows.append(i)
            matchers.append(entry.matcher)
        if rows:
            self.grammar_masks().apply(logits, rows, matchers)
        return raw_rows

    @staticmethod
    def _advance_grammar(entry: _Entry, token: int) -> bool:
        """Advance the sequence's matcher by its new token; True when the grammar is complete (it took its
        stop token): the sequence ends."""
        if entry.matcher is None:
            return False
        if not entry.matcher.accept_token(token):
            raise RuntimeError(f"token {token} sampled for request {entry.seq.request_id} is refused by its grammar")
        return entry.matcher.is_terminated()

    def _sample_row(self, seq: SequenceState, row: torch.Tensor, argmax: int,
                    raw_row: torch.Tensor | None = None) -> tuple[int, TokenLogprobs | None]:
        """row [V] (masked by the sequence's grammar, if any; `raw_row` [V] before it) -> (the sequence's next
        token, its logprobs when asked for: of the raw logits)."""
        params = seq.request.params
        allowed = allowed_next_tokens(seq.output_ids, params.allowed_starts) if params.allowed_starts else None
        if allowed is not None:  # a constrained start: only tokens that stay on it
            masked = torch.full_like(row, float("-inf"))
            masked[allowed] = row[allowed]
            token = sample(masked, params, seq.generator)
        else:
            token = argmax if params.is_greedy else sample(row, params, seq.generator)
        raw = row if raw_row is None else raw_row
        logprobs = None if params.logprobs is None else token_logprobs(raw, token, params.logprobs)
        return token, logprobs

    def _on_tokens(self, entry: _Entry, item: ScheduledSeq, tokens: list[int],
                   logprobs: list[TokenLogprobs | None], is_grammar_done: bool = False) -> None:
        """The step's tokens of one sequence, in order, output up to the first that ends it (a stop token
        or string, max_tokens, the grammar's end after the last token): the rest are dropped, as if never
        drafted. Advances the scheduler."""
        seq, params, detokenizer = entry.seq, entry.seq.request.params, entry.detokenizer
        text, reason, n = "", None, 0
        for token in tokens:
            n += 1
            is_stop_token = (is_grammar_done and n == len(tokens)) or token in params.stop_token_ids or (
                not params.ignore_eos and token in self.head.config.eos_token_ids)
            # A stop token's text is not output.
            text += "" if is_stop_token or detokenizer is None else detokenizer.add(token)
            is_stop_string = detokenizer is not None and detokenizer.is_stopped
            reason = (FinishReason.STOP if is_stop_token or is_stop_string else
                      FinishReason.LENGTH if len(seq.output_ids) + n >= (params.max_tokens or 0) else None)
            if reason is not None:
                break
        self.scheduler.advance(item, tokens[n - 1], tokens[:n - 1])
        logprob_list = None if params.logprobs is None else [lp for lp in logprobs[:n] if lp is not None]
        if reason is None:
            self._outbox.append((entry.stream, self._output(seq, tokens[:n], text, None, logprob_list)))
        else:
            self._finish(entry, reason, tokens[:n], text, logprob_list)

    def _propose(self, plan: StepPlan) -> None:
        """The drafter's drafts for the step's sequences still running (module docstring); a drafter that
        fails costs the step's drafts, never a request."""
        if self.drafter is None or self.speculative is None:
            return
        is_drafting = len(self.scheduler.running) <= self.speculative.disable_by_batch_size
        inputs: list[DraftInput] = []
        seqs: list[SequenceState] = []
        offset = 0
        for item in plan.scheduled:
            seq, start, offset = item.seq, offset, offset + item.num_scheduled_tokens
            if seq.status is not SequenceStatus.RUNNING or seq.slot is None:
                continue
            params, num_tokens = seq.request.params, seq.num_prompt_tokens + len(seq.output_ids)
            k = 0
            if is_drafting and seq.request.allow_speculation and seq.request.grammar is None and (
                    not seq.is_prefilling) and (
                    not params.allowed_starts or allowed_next_tokens(seq.output_ids, params.allowed_starts) is None):
                k = max(0, min(self.speculative.num_speculative_tokens,
                               (params.max_tokens or 0) - len(seq.output_ids) - 1))
            position = self._positions[seq.request_id]
            num_kept = seq.num_computed_tokens - position
            hidden = None if self.runner.hidden is None else self.runner.hidden[start:start + num_kept]
            inputs.append(DraftInput(seq.request_id, seq.slot, seq.token_ids(0, num_tokens), position, hidden, k))
            seqs.append(seq)
        if not inputs:
            return
        try:
            proposals = self.drafter.propose(inputs)
        except Exception:
            log.exception("the drafter failed; the step's %d sequences decode without drafts", len(inputs))
            return
        for seq, drafts, x in zip(seqs, proposals, inputs):
            seq.draft_ids = list(drafts[:x.num_draft_tokens])

    def _finish(self, entry: _Entry, reason: FinishReason, token_ids: Sequence[int] = (), text: str = "",
                logprobs: list[TokenLogprobs] | None = None) -> None:
        self.scheduler.finish(entry.seq, reason)
        tail = "" if entry.detokenizer is None else entry.detokenizer.flush()
        self._retire(entry, reason, list(token_ids), text + tail, logprobs)

    def _retire(self, entry: _Entry, reason: FinishReason, token_ids: list[int], text: str = "",
                logprobs: list[TokenLogprobs] | None = None) -> None:
        seq = entry.seq
        self._forget(seq.request_id)
        stop_string = None if entry.detokenizer is None else entry.detokenizer.stop_string
        self._outbox.append((entry.stream, self._output(seq, token_ids, text, reason, logprobs, stop_string)))

    def _fail(self, entry: _Entry, exc: Exception) -> None:
        self.scheduler.finish(entry.seq, FinishReason.ABORT)
        self._forget(entry.seq.request_id)
        self._outbox.append((entry.stream, step_failure(exc)))

    def _forget(self, request_id: str) -> None:
        del self._entries[request_id]
        if self.drafter is not None:
            self.drafter.release(request_id)
        with self._lock:
            self._request_ids.discard(request_id)

    @staticmethod
    def _output(seq: SequenceState, token_ids: list[int], text: str, reason: FinishReason | None,
                logprobs: list[TokenLogprobs] | None = None, stop_string: str | None = None) -> StepOutput:
        return StepOutput(seq.request_id, token_ids, text, reason, seq.num_prompt_tokens, len(seq.output_ids),
                          logprobs, stop_string, seq.num_cached_prompt_tokens)
