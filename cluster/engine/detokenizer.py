"""A request's output side: incremental detokenization with stop strings, and the stream that hands
outputs from the engine thread to the asyncio consumer.

    token id -> tokenizers' DecodeStream (holds bytes until a whole UTF-8 character is there)
             -> text so far -> first stop string? cut the text just before it, stop
             -> emit everything except a tail that could still grow into a stop string

OpenAI semantics: the stop string is not part of the text. Text held back as a possible stop-string
prefix is released as soon as it can no longer become one, or when the sequence ends.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from nextserve.cluster.engine.scheduler import FinishReason
from nextserve.model.sampling import TokenLogprobs

log = logging.getLogger(__name__)

PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens the decoder sees first: tokenizers that drop a leading space at the start of a text
(Metaspace) need context to decode the first output token as it reads inside the whole text."""


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: tuple[str, ...] = ()) -> None:
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {stop!r}")
        self._tokenizer = tokenizer
        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        if tokenizer.decode(context, skip_special_tokens=True).endswith("\ufffd"):
            # A prompt that ends inside a UTF-8 character: DecodeStream would re-emit the context's
            # text with the first output token. Decode the output on its own, as `decode` would.
            context = []
        self._stream = DecodeStream(context, skip_special_tokens=True)
        self._stop = stop
        self._max_stop_chars = max(map(len, stop), default=0)
        self.text = ""
        """Text decoded so far, cut before the stop string once one is found."""
        self.num_emitted_chars = 0
        self.is_stopped = False
        """A stop string was found; the sequence should finish with reason STOP."""
        self.stop_string: str | None = None
        """The stop string found (the first in the text)."""

    def add(self, token_id: int) -> str:
        """Feed one generated token; returns the new text that is safe to send (often '')."""
        if self.is_stopped:
            return ""
        piece = self._stream.step(self._tokenizer, token_id)
        if piece:
            search_from = max(0, len(self.text) - self._max_stop_chars + 1)
            self.text += piece
            self._cut_at_stop(search_from)
        return self._take(is_final=self.is_stopped)

    def flush(self) -> str:
        """The sequence ended: release the text held back as a possible stop-string prefix."""
        return self._take(is_final=True)

    def _cut_at_stop(self, search_from: int) -> None:
        hits = [(i, s) for i, s in ((self.text.find(s, search_from), s) for s in self._stop) if i >= 0]
        if hits:
            at, self.stop_string = min(hits)
            self.text = self.text[:at]
            self.is_stopped = True

    def _held_back_chars(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        for n in range(min(self._max_stop_chars - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _take(self, is_final: bool) -> str:
        end = len(self.text) if is_final else len(self.text) - self._held_back_chars()
        if end <= self.num_emitted_chars:
            return ""
        delta = self.text[self.num_emitted_chars:end]
        self.num_emitted_chars = end
        return delta


@dataclass(slots=True)
class StepOutput:
    """What a request produced since its consumer's previous item."""
    request_id: str
    token_ids: list[int]
    text: str
    """Text delta; never ends inside a multi-byte character, never includes a stop string."""
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprobs] | None = None
    """One per token of `token_ids`, when the request asked for logprobs."""
    stop_string: str | None = None
    """The stop string that ended the request (finish_reason STOP by a stop string, not a stop token)."""

    def merge(self, later: StepOutput) -> StepOutput:
        logprobs = None if self.logprobs is None and later.logprobs is None else \
            (self.logprobs or []) + (later.logprobs or [])
        return StepOutput(self.request_id, self.token_ids + later.token_ids, self.text + later.text,
                          later.finish_reason, later.prompt_tokens, later.completion_tokens, logprobs,
                          later.stop_string)


class OutputStream:
    """Engine thread -> one asyncio consumer. Outputs the consumer has not read yet are merged into one
    item, so a consumer that falls behind pays one event for all its ready tokens, not one per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ready = asyncio.Event()
        self._lock = threading.Lock()
        self._pending: StepOutput | Exception | None = None

    def put(self, item: StepOutput | Exception) -> None:
        """From any thread. An exception replaces what is pending and is raised by `get`."""
        with self._lock:
            was_empty = self._pending is None
            if isinstance(self._pending, StepOutput) and isinstance(item, StepOutput):
                item = self._pending.merge(item)
            self._pending = item
        if was_empty:
            try:
                self._loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                log.debug("dropping output for a closed event loop")

    async def get(self) -> StepOutput:
        while True:
            await self._ready.wait()
            self._ready.clear()
            with self._lock:
                item, self._pending = self._pending, None
            if isinstance(item, Exception):
                raise item
            if item is not None:
                return item
