"""A request's output side: incremental detokenization with stop strings, and the stream that hands
outputs from the engine thread to the asyncio consumer.

    token id -> tokenizers' DecodeStream (holds bytes until a whole UTF-8 character is there)
             -> new text -> StopMatcher: a stop string completed? cut the text just before it, stop
             -> emit everything except a tail that could still grow into a stop string

OpenAI semantics: the stop string is not part of the text. Text held back as a possible stop-string
prefix is released as soon as it can no longer become one, or when the sequence ends. The cost per
token is O(new characters x stop strings), whatever the length of the text or of the stop strings:
nothing rescans the text, and only the held-back tail (shorter than the longest stop string) is kept.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from nextserve.cluster.engine.contract import StepOutput

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4
"""Most stop strings one request may carry (OpenAI's limit); the gateway answers 400 past it."""
MAX_STOP_CHARS = 256
"""Longest stop string, in characters; the gateway answers 400 past it. It bounds the text a request
holds back (and so the delay before a held-back tail is streamed)."""

PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens the decoder sees first: tokenizers that drop a leading space at the start of a text
(Metaspace) need context to decode the first output token as it reads inside the whole text."""


def _kmp_fallback(stop: str) -> list[int]:
    """fallback[i]: the length of the longest proper prefix of stop[:i + 1] that also ends it (KMP)."""
    fallback = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fallback[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fallback[i] = k
    return fallback


class StopMatcher:
    """Finds stop strings in text that arrives piece by piece: one Knuth-Morris-Pratt automaton per stop
    string, so each new character costs amortized O(1) per stop string and the text is never rescanned.

    Which stop wins: the first to complete (the earliest end); of those ending at the same character,
    the longest (the earliest start). That does not depend on how the text was split into tokens.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = stop
        self._fallback = [_kmp_fallback(s) for s in stop]
        self._matched = [0] * len(stop)
        """Per stop string: the length of its longest prefix that ends the text fed so far (< its length)."""

    @property
    def num_held_chars(self) -> int:
        """The longest tail of the text fed so far that is a proper prefix of some stop string."""
        return max(self._matched, default=0)

    def feed(self, piece: str) -> tuple[int, str] | None:
        """Advance over `piece`. When a stop string completes in it: (where it starts, as an index into
        `piece`: negative when it began in earlier text, never before num_held_chars back; the stop)."""
        for i, char in enumerate(piece):
            found: tuple[int, str] | None = None
            for j, stop in enumerate(self._stop):
                k = self._matched[j]
                while k and stop[k] != char:
                    k = self._fallback[j][k - 1]
                if stop[k] == char:
                    k += 1
                if k == len(stop):
                    if found is None or i + 1 - k < found[0]:
                        found = (i + 1 - k, stop)
                    k = self._fallback[j][k - 1]
                self._matched[j] = k
            if found is not None:
                return found
        return None


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
        self._matcher = StopMatcher(stop) if stop else None
        self._held = ""
        """Decoded text not sent yet: a tail that may still become a stop string."""
        self.is_stopped = False
        """A stop string was found; the sequence should finish with reason STOP."""
        self.stop_string: str | None = None
        """The stop string found (the first to complete, see StopMatcher)."""

    def add(self, token_id: int) -> str:
        """Feed one generated token; returns the new text that is safe to send (often '')."""
        if self.is_stopped:
            return ""
        piece = self._stream.step(self._tokenizer, token_id)
        if not piece or self._matcher is None:
            return piece or ""
        found = self._matcher.feed(piece)
        text = self._held + piece
        if found is None:
            return self._release(text, len(text) - self._matcher.num_held_chars)
        start, self.stop_string = found
        self.is_stopped = True
        return self._release(text[:len(self._held) + start], len(self._held) + start)

    def flush(self) -> str:
        """The sequence ended: release the text held back as a possible stop-string prefix."""
        return self._release(self._held, len(self._held))

    def _release(self, text: str, end: int) -> str:
        """Send text[:end], hold the rest."""
        self._held = text[end:]
        return text[:end]


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
