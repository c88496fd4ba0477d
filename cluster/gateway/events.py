"""The one stream of events a generation yields, which every API renders (as SSE chunks or one JSON body).

    Started(prompt_tokens, cached_tokens, n)
    ChoiceUpdate(index, events, logprobs, ...) ...     per engine output of choice `index`, in arrival order;
        events: TextDelta | ToolCallStart | ToolArgumentsDelta   (tool_calls.py's parser, fed the forced
                                                                  call opening first)
        finish: Finish(reason, has_tool_calls, stop_string, completion_tokens) on a choice's last update
    Completed(choices: ChoiceResult per choice, usage)  the whole reply: text, tool calls parsed from the
                                                        whole output, logprobs, finish; token usage
    (a failure raises from the stream: an EngineError with its code, or anything else)

What is decided once, here, for every API: tool-call parsing (streamed and whole), the forced opening's
events, whether a choice ended in tool calls, token usage with the prefix-cache hits. What each API names
things (finish_reason "tool_calls", stop_reason "tool_use") is its translator's (protocols/).
"""

from __future__ import annotations

from dataclasses import dataclass

from nextserve.cluster.engine.contract import FinishReason, StepOutput, TokenLogprobs
from nextserve.cluster.gateway.chat_template import ChatPrompt
from nextserve.cluster.gateway.tool_calls import (ParsedOutput, TextDelta, ToolArgumentsDelta, ToolCallEvent,
                                                  ToolCallParser, ToolCallStart, parse_tool_calls)

__all__ = ["ChoiceEvents", "ChoiceResult", "ChoiceUpdate", "Completed", "Event", "Finish", "Started",
           "TextDelta", "TokenUsage", "ToolArgumentsDelta", "ToolCallEvent", "ToolCallStart"]


@dataclass(frozen=True, slots=True)
class TokenUsage:
    prompt_tokens: int
    completion_tokens: int
    """Over all choices."""
    cached_tokens: int = 0
    """Of the prompt, the tokens the head served from its prefix cache (the first choice's)."""


@dataclass(frozen=True, slots=True)
class Finish:
    """How a choice ended."""
    reason: FinishReason
    has_tool_calls: bool
    """The output holds at least one complete tool call (OpenAI: "tool_calls", Anthropic: "tool_use")."""
    stop_string: str | None
    """The stop string that ended it (reason STOP), None for end-of-sequence or another reason."""
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Started:
    """The engine accepted every choice (first outputs in hand): the prompt's size is known."""
    prompt_tokens: int
    cached_tokens: int
    n: int


@dataclass(frozen=True, slots=True)
class ChoiceUpdate:
    """What one engine output of choice `index` adds."""
    index: int
    events: tuple[ToolCallEvent, ...]
    """Content: text, and tool calls as they are parsed (plain text when the output is not parsed)."""
    logprobs: tuple[TokenLogprobs, ...]
    """One per new token, when the request asked for logprobs."""
    text_offset: int
    """Characters of this choice's output before this update's (completions report each token's offset)."""
    is_first: bool
    """The choice's first update."""
    finish: Finish | None = None
    """Set on the choice's last update."""


@dataclass(frozen=True, slots=True)
class ChoiceResult:
    """One whole choice."""
    index: int
    text: str
    """The output as generated (tool-call markup included; the forced opening not)."""
    parsed: ParsedOutput | None
    """Content and tool calls parsed from the whole output (forced opening first); None when the request's
    output is not parsed (no tools, tool_choice none, a raw prompt)."""
    logprobs: tuple[TokenLogprobs, ...]
    finish: Finish


@dataclass(frozen=True, slots=True)
class Completed:
    """Every choice finished: the whole reply."""
    choices: tuple[ChoiceResult, ...]
    usage: TokenUsage


Event = Started | ChoiceUpdate | Completed


class ChoiceEvents:
    """One choice's engine outputs as events: its text through the tool-call parser when tools are parsed."""

    def __init__(self, index: int, prompt: ChatPrompt) -> None:
        self.index, self.prompt = index, prompt
        self.max_calls = None if prompt.choice.parallel else 1
        self.parser = ToolCallParser(prompt.tool_schemas, max_calls=self.max_calls) if prompt.tool_schemas else None
        self.pending: list[ToolCallEvent] = self.parser.feed(prompt.choice.forced_prefix) if self.parser else []
        """A forced call's opening: its events go out with the first output, as if generated."""
        self.texts: list[str] = []
        self.num_chars = 0
        self.logprobs: list[TokenLogprobs] = []
        self.last: StepOutput | None = None

    def on_output(self, out: StepOutput) -> ChoiceUpdate:
        offset, is_first = self.num_chars, self.last is None
        self.texts.append(out.text)
        self.num_chars += len(out.text)
        self.logprobs += out.logprobs or []
        self.last = out
        events, self.pending = self.pending, []
        if self.parser is None:
            events += [TextDelta(out.text)] if out.text else []
        else:
            events += self.parser.feed(out.text) if out.text else []
        finish = None
        if out.finish_reason is not None:
            events += self.parser.finish() if self.parser is not None else []
            has_calls = self.parser is not None and bool(self.parser.tool_calls)
            finish = Finish(out.finish_reason, has_calls, out.stop_string, out.completion_tokens)
        return ChoiceUpdate(self.index, tuple(events), tuple(out.logprobs or ()), offset, is_first, finish)

    @property
    def completion_tokens(self) -> int:
        return self.last.completion_tokens if self.last is not None else 0

    def result(self) -> ChoiceResult:
        """The whole choice; the same parser run on the whole output (a call left open stays content)."""
        last = self.last
        assert last is not None and last.finish_reason is not None, "result() of an unfinished choice"
        text = "".join(self.texts)
        parsed = None
        if self.parser is not None:
            parsed = parse_tool_calls(self.prompt.choice.forced_prefix + text, self.prompt.tool_schemas,
                                      max_calls=self.max_calls)
        finish = Finish(last.finish_reason, bool(parsed and parsed.tool_calls), last.stop_string,
                        last.completion_tokens)
        return ChoiceResult(self.index, text, parsed, tuple(self.logprobs), finish)
