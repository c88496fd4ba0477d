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
from nextserve.cluster.engine.detokenizer import MAX_STOP_CHARS, MAX_STOP_STRINGS, IncrementalDetokenizer, OutputStream
from nextserve.cluster.engine.grammar import GrammarCompiler, GrammarMasks
from nextserve.cluster.engine.model_runner import ModelRunner, head_cache_capacity
from nextserve.cluster.engine.scheduler import Scheduler, SchedulerConfig, SequenceState, StepPlan
from nextserve.model.cache.budget import CacheConfig
from nextserve.model.expert_backend import ExpertBackend
from nextserve.model.qwen3_next import HeadModel
from nextserve.model.sampling import TokenLogprobs, allowed_next_tokens, make_generator, sample, token_logprobs
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
                 cache_config: CacheConfig | None = None) -> None:
        """`tokenizer` None serves token ids only (outputs carry no text; stop strings are refused).
        `max_model_len`: the context the engine admits (prompt + output tokens), at most the model's
        (max_position_embeddings, the default). `cache_config`: the cache budget and block size."""
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
        self.runner = ModelRunner(head, experts, self.capacity, config)
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
        stream = self._submit(self.admit(request), OutputStream(asyncio.get_running_loop()))
        is_finished = False
        try:
            while not is_finished:
                out = await stream.get()
                is_finished = out.finish_reason is not None
                yield out
        finally:
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
        if not plan.is_empty:
            try:
                self._postprocess(plan, self.runner.run(plan))
            except Exception as exc:  # a failed step (e.g. a lost expert worker) fails its sequences only
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
                           prefix_cache_hit_tokens=scheduler.prefix_hit_tokens)

    def _flush_outbox(self) -> None:
        outbox, self._outbox = self._outbox, []
        for stream, item in outbox:
            stream.put(item)

    def _postprocess(self, plan: StepPlan, logits: torch.Tensor) -> None:
        """logits [B, V] -> each row's token. What fails for one row (its sampling, its NaN logits, its stop
        or constraint state, its detokenization) ends that sequence alone with an EngineError; the others
        go on exactly as if it were not there."""
        raw_rows = self._mask_grammar_rows(plan, logits)
        # argmax treats NaN as the largest value, so a row holding a NaN has one at its argmax: the NaN check
        # reads B values, not B x V; one device sync for both.
        best = logits.argmax(dim=-1)  # [B]
        has_nan_at_best = torch.isnan(logits.gather(1, best[:, None]).squeeze(1)).long()  # [B]
        argmax, has_nan = torch.stack([best, has_nan_at_best]).tolist()
        for i, item in enumerate(plan.scheduled):
            seq = item.seq
            if seq.is_finished and seq.request_id not in self._entries:  # failed above (its grammar matcher)
                continue
            if not item.samples_token:
                self.scheduler.advance(item, None)
                continue
            entry = self._entries[seq.request_id]
            try:
                if has_nan[i]:
                    raise NonFiniteLogitsError(f"the model produced NaN logits for request {seq.request_id}")
                token, logprobs = self._sample_row(seq, logits[i], argmax[i], raw_rows.get(i))
                is_grammar_done = self._advance_grammar(entry, token)
                self.scheduler.advance(item, token)
                self._on_token(entry, token, logprobs, is_grammar_done)
            except Exception as exc:
                log.exception("request %s failed in its own postprocessing; the other %d sequences of the step "
                              "go on", seq.request_id, len(plan.scheduled) - 1)
                if not seq.is_finished:
                    self._fail(entry, exc)
                elif seq.request_id in self._entries:  # finished by the scheduler, its output not yet sent
                    self._forget(seq.request_id)
                    self._outbox.append((entry.stream, step_failure(exc)))

    def _mask_grammar_rows(self, plan: StepPlan, logits: torch.Tensor) -> dict[int, torch.Tensor]:
        """logits [B, V]: the rows of sequences with a grammar that sample now get their mask (in place);
        returns those rows' raw logits [V] where logprobs were asked for (logprobs are of the raw logits).
        A sequence whose matcher cannot be rebuilt fails alone."""
        rows, matchers, raw_rows = [], [], {}
        for i, item in enumerate(plan.scheduled):
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

    def _on_token(self, entry: _Entry, token: int, logprobs: TokenLogprobs | None,
                  is_grammar_done: bool = False) -> None:
        seq, params, detokenizer = entry.seq, entry.seq.request.params, entry.detokenizer
        is_stop_token = is_grammar_done or token in params.stop_token_ids or (
            not params.ignore_eos and token in self.head.config.eos_token_ids)
        # A stop token's text is not output.
        text = "" if is_stop_token or detokenizer is None else detokenizer.add(token)
        is_stop_string = detokenizer is not None and detokenizer.is_stopped
        reason = (FinishReason.STOP if is_stop_token or is_stop_string else
                  FinishReason.LENGTH if len(seq.output_ids) >= (params.max_tokens or 0) else None)
        logprob_list = None if logprobs is None else [logprobs]
        if reason is None:
            self._outbox.append((entry.stream, self._output(seq, [token], text, None, logprob_list)))
        else:
            self._finish(entry, reason, [token], text, logprob_list)

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
        with self._lock:
            self._request_ids.discard(request_id)

    @staticmethod
    def _output(seq: SequenceState, token_ids: list[int], text: str, reason: FinishReason | None,
                logprobs: list[TokenLogprobs] | None = None, stop_string: str | None = None) -> StepOutput:
        return StepOutput(seq.request_id, token_ids, text, reason, seq.num_prompt_tokens, len(seq.output_ids),
                          logprobs, stop_string, seq.num_cached_prompt_tokens)
