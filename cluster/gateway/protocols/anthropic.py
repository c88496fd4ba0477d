"""Anthropic's Messages API as a translator: its request shapes into the internal model, the one event
stream out as its `message` body and SSE events, its errors. What Claude Code and the anthropic SDK speak.

Pure apart from logging: no HTTP, no engine. The gateway's flow for `POST /v1/messages`:

    parse_messages_request(body) -> MessagesRequest            (every client mistake: AnthropicError 400)
      -> generation_spec(req, defaults): GenerationSpec whose prompt is conversation(req): chat_messages(req)
         (OpenAI-style messages), template_tools(req), tool_choice(req)        (conversation.py)
      ... the gateway's one pipeline (generation.py) -> events (events.py) ...
      -> MessageReply: body(completed) -> message_response(...), or sse(events) -> MessagesStream:
         start, ping, events, finish | error, with stop_reason_for(finish_reason, has_tool_calls, stop_sequence)
      errors: anthropic_error(EngineError, spec), template_error(ChatTemplateError) -> AnthropicError

and for `POST /v1/messages/count_tokens`: parse_count_tokens_request -> conversation(req) -> its prompt ids ->
count_tokens_response. Errors the gateway raises itself become Anthropic's body with `error_body(status, ...)`.

Unknown extra fields are accepted and ignored, as Claude Code sends many. Accepted and ignored on purpose:
`thinking`, `metadata`, `context_management`, `output_config`, `service_tier`, `container`, `mcp_servers`,
`cache_control` (top level, on any block or tool), a tool's `defer_loading`/`strict`/`input_examples`,
`citations` on text blocks, `thinking`/`redacted_thinking` blocks in assistant history. Refused with a 400 naming the field: `image` and `document` blocks (also inside a
tool_result), unknown block types, server tools (a tool `type` other than "custom").
"""

from __future__ import annotations

import json
import math
import logging
import re
import secrets
import string
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

from pydantic import (BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator)
from pydantic_core import PydanticCustomError

from nextserve.cluster.engine.contract import EngineError, ErrorCode, FinishReason, SamplingDefaults, SamplingParams
from nextserve.cluster.gateway.chat_template import ChatTemplateError, ToolChoice
from nextserve.cluster.gateway.conversation import Conversation, GenerationSpec
from nextserve.cluster.gateway.events import ChoiceUpdate, Completed, Event, Finish, Started
from nextserve.cluster.gateway.protocols.json_body import BodyError, StrictModel, json_object
from nextserve.cluster.gateway.tool_calls import (ParsedOutput, TextDelta, ToolArgumentsDelta, ToolCallEvent,
                                                  ToolCallStart)

log = logging.getLogger(__name__)

# --- errors -------------------------------------------------------------------------------------------------

ErrorType = Literal["invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                    "request_too_large", "rate_limit_error", "api_error", "overloaded_error"]

_ERROR_TYPES: dict[int, ErrorType] = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error",
    529: "overloaded_error"}


def error_type_for(status: int) -> ErrorType:
    """Anthropic's error type for an HTTP status; other 4xx are invalid_request_error, other 5xx api_error."""
    return _ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "api_error")


def error_body(status: int, message: str, type: ErrorType | None = None) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}}`; the type follows `status` unless given."""
    return {"type": "error", "error": {"type": type or error_type_for(status), "message": message}}


class AnthropicError(Exception):
    """A request the gateway refuses: `status` is the HTTP status, `body` Anthropic's error body."""

    def __init__(self, status: int, message: str, type: ErrorType | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.body: dict[str, Any] = error_body(status, message, type)
        self.headers: dict[str, str] | None = None
        """Response headers the error needs (retry-after of a 429)."""


# --- request models -----------------------------------------------------------------------------------------

class _Model(StrictModel):
    """A StrictModel, frozen."""
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class TextBlock(_Model):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Model):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class _RefusedBlock(_Model):
    """Block types we recognise but cannot serve (a text-only model)."""
    type: Literal["image", "document"]

    @field_validator("type")
    @classmethod
    def _refuse(cls, value: str) -> str:
        raise PydanticCustomError("unsupported", "'{type}' content blocks are not supported by this server "
                                  "(it serves a text-only model); send the content as text", {"type": value})


class _IgnoredBlock(_Model):
    """Assistant history this model did not produce and cannot use; dropped from the prompt."""
    type: Literal["thinking", "redacted_thinking"]


def _blocks(value: Any) -> Any:
    """Content is a string or a list of blocks; a string is one text block."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if isinstance(value, list):
        return value
    raise PydanticCustomError("content_type", "expected a string or a list of content blocks")


def _optional_blocks(value: Any) -> Any:
    return [] if value is None else _blocks(value)


ToolResultContentBlock = Annotated[Union[TextBlock, _RefusedBlock], Field(discriminator="type")]


class ToolResultBlock(_Model):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Annotated[list[ToolResultContentBlock], BeforeValidator(_optional_blocks)] = Field(default_factory=list)
    is_error: bool = False

    @property
    def text(self) -> str:
        return "\n".join(b.text for b in self.content if isinstance(b, TextBlock))


UserBlock = Annotated[Union[TextBlock, ToolResultBlock, _RefusedBlock], Field(discriminator="type")]
AssistantBlock = Annotated[Union[TextBlock, ToolUseBlock, _IgnoredBlock], Field(discriminator="type")]


class UserMessage(_Model):
    role: Literal["user"]
    content: Annotated[list[UserBlock], BeforeValidator(_blocks)]


class AssistantMessage(_Model):
    role: Literal["assistant"]
    content: Annotated[list[AssistantBlock], BeforeValidator(_blocks)]


class SystemMessage(_Model):
    """Not in Anthropic's published API, but Claude Code (2.x) sends system reminders as messages with role
    "system" after the first turn. Their text joins the system prompt (a chat template takes one system turn,
    first)."""
    role: Literal["system"]
    content: Annotated[list[TextBlock], BeforeValidator(_blocks)]


Message = Annotated[Union[UserMessage, AssistantMessage, SystemMessage], Field(discriminator="role")]


class ToolDefinition(_Model):
    """A client tool. `type` comes first so that a server tool (no input_schema) is named as such."""
    type: str | None = None
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]

    @field_validator("type")
    @classmethod
    def _client_tools_only(cls, value: str | None) -> str | None:
        if value not in (None, "custom"):
            raise PydanticCustomError("unsupported", "tool type '{type}' (a server tool) is not supported by "
                                      "this server; only client tools (type 'custom' or no type) are",
                                      {"type": value})
        return value


class ToolChoiceParam(_Model):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, validate_default=True)
    disable_parallel_tool_use: bool = False

    @field_validator("name")
    @classmethod
    def _named(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("type") == "tool" and not value:
            raise PydanticCustomError("missing", "a tool_choice of type 'tool' needs the 'name' of the tool to "
                                      "call")
        return value


def _system(value: Any) -> Any:
    return None if value is None else _blocks(value)


class _Conversation(_Model):
    """What both endpoints read: the prompt side of a Messages request."""
    model: str
    messages: list[Message] = Field(min_length=1)
    system: Annotated[list[TextBlock] | None, BeforeValidator(_system)] = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: Any = None
    metadata: Any = None
    context_management: Any = None
    output_config: Any = None
    service_tier: Any = None
    container: Any = None
    mcp_servers: Any = None
    """Accepted for Claude Code and the SDK, and ignored."""

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
        seen: dict[str, int] = {}
        for i, tool in enumerate(tools or ()):
            if tool.name in seen:
                raise PydanticCustomError("duplicate_tool", "tool names must be unique: '{name}' is both "
                                          "tools.{first} and tools.{i}", {"name": tool.name, "first": seen[tool.name],
                                                                          "i": i})
            seen[tool.name] = i
        return tools


class MessagesRequest(_Conversation):
    """`POST /v1/messages`."""
    prompt_param: ClassVar[str] = "messages"
    """The field that holds the prompt, for errors about it (as the OpenAI requests have)."""
    max_tokens: int = Field(ge=1)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    """How many and how long: a serving rule, checked by the engine's admission (one owner)."""
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    """None means Anthropic's default, 1.0; 0 means greedy."""
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    """None or 0 disable it."""

    def max_tokens_request(self) -> tuple[int, str]:
        """(max tokens asked for; its field): always set, it is required."""
        return self.max_tokens, "max_tokens"

    def sampling_params(self, defaults: SamplingDefaults) -> SamplingParams:
        """Unset sampling fields take the checkpoint's defaults (current anthropic SDKs send none); the
        engine clamps max_tokens to the room the prompt leaves (stop_reason max_tokens there)."""
        return SamplingParams(max_tokens=self.max_tokens,
                              temperature=defaults.temperature if self.temperature is None else self.temperature,
                              top_p=defaults.top_p if self.top_p is None else self.top_p,
                              top_k=defaults.top_k if self.top_k is None else self.top_k,
                              stop=tuple(self.stop_sequences))


class MessagesCountTokensRequest(_Conversation):
    """`POST /v1/messages/count_tokens`: the prompt side only."""


# --- parsing and its errors ---------------------------------------------------------------------------------

_TAGS = frozenset({"user", "assistant", "system", "text", "tool_use", "tool_result", "image", "document", "thinking",
                   "redacted_thinking"})
"""Discriminator values pydantic puts into an error's loc after the list index of a tagged union's item."""


def field_path(loc: Sequence[int | str]) -> str:
    """('messages', 2, 'user', 'content', 0, 'text', 'text') -> 'messages.2.content.0.text'.

    Drops the union tags pydantic inserts after a list index (it inserts one only when a field follows)."""
    parts = [str(p) for i, p in enumerate(loc)
             if not (i and isinstance(loc[i - 1], int) and p in _TAGS and i + 1 < len(loc))]
    return ".".join(parts)


def _message(error: Any) -> str:
    """One pydantic error as 'path: what is wrong', with the discriminator errors said plainly."""
    loc, ctx = list(error["loc"]), error.get("ctx") or {}
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        key = ctx.get("discriminator", "'type'").strip("'")
        path = field_path([*loc, key])
        if error["type"] == "union_tag_not_found":
            return f"{path}: Field required"
        if key == "role":
            return (f"{path}: '{ctx.get('tag')}' is not a valid role; expected 'user' or 'assistant' (a system "
                    "prompt goes in the top-level 'system' field)")
        expected = ", ".join(t for t in re.findall(r"'([^']*)'", ctx.get("expected_tags", ""))
                             if t not in ("image", "document"))
        return f"{path}: unknown content block type '{ctx.get('tag')}' here; expected one of: {expected}"
    return f"{field_path(loc)}: {error['msg']}"


def validation_error(errors: list[Any]) -> AnthropicError:
    """The first of pydantic's errors as a 400 naming the field's path."""
    return AnthropicError(400, _message(errors[0]))


def _check_tool_choice(req: _Conversation) -> None:
    choice, names = req.tool_choice, [t.name for t in req.tools or ()]
    if choice is None or choice.type in ("auto", "none"):
        return
    if not names:
        raise AnthropicError(400, f"tool_choice.type: '{choice.type}' needs tools, but the request has none")
    if choice.type == "tool" and choice.name not in names:
        raise AnthropicError(400, f"tool_choice.name: the tool '{choice.name}' is not among the request's tools "
                             f"({', '.join(names)})")


R = TypeVar("R", bound=_Conversation)


def _parse(raw: bytes, model: type[R]) -> R:
    try:
        data = json_object(raw)
    except BodyError as e:
        raise AnthropicError(400, str(e)) from None
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None
    _check_tool_choice(req)
    return req


def parse_messages_request(raw: bytes) -> MessagesRequest:
    """Decode and validate a `/v1/messages` body; any problem is an AnthropicError 400 naming the field."""
    return _parse(raw, MessagesRequest)


def parse_count_tokens_request(raw: bytes) -> MessagesCountTokensRequest:
    """Decode and validate a `/v1/messages/count_tokens` body, as parse_messages_request does."""
    return _parse(raw, MessagesCountTokensRequest)


# --- to the chat template -----------------------------------------------------------------------------------

def _text(blocks: Iterable[Any]) -> str:
    return "\n".join(b.text for b in blocks if isinstance(b, TextBlock))


def chat_messages(req: _Conversation) -> list[dict[str, Any]]:
    """OpenAI-style messages for `tokenizer.apply_chat_template(messages, tools=template_tools(req))`.

    system -> a system message; a user message's tool_result blocks -> one tool message each, in order, then
    its text (if any) as a user message; an assistant message -> its text and its tool_use blocks as
    tool_calls (arguments as the dict, as the Qwen3-Coder template wants). A tool_result with is_error
    reads "Error: ..." so the model knows. Text blocks of one message are joined with newlines.
    When the last message is the assistant's, the client wants it continued (a prefill): render with
    `continue_final_message=True` instead of `add_generation_prompt=True`."""
    out: list[dict[str, Any]] = []
    system_texts = [_text(req.system)] if req.system else []
    system_texts += [_text(m.content) for m in req.messages if isinstance(m, SystemMessage)]
    if system := "\n\n".join(t for t in system_texts if t):
        out.append({"role": "system", "content": system})
    for msg in req.messages:
        if isinstance(msg, SystemMessage):
            continue
        if isinstance(msg, UserMessage):
            results = [b for b in msg.content if isinstance(b, ToolResultBlock)]
            for r in results:
                content = f"Error: {r.text}" if r.is_error else r.text
                out.append({"role": "tool", "tool_call_id": r.tool_use_id, "content": content})
            texts = [b for b in msg.content if isinstance(b, TextBlock)]
            if texts or not results:
                out.append({"role": "user", "content": _text(texts)})
        else:
            calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": dict(b.input)}}
                     for b in msg.content if isinstance(b, ToolUseBlock)]
            entry: dict[str, Any] = {"role": "assistant", "content": _text(msg.content)}
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
    return out


_KINDS: dict[str, Literal["auto", "none", "required", "named"]] = {
    "auto": "auto", "none": "none", "any": "required", "tool": "named"}


def tool_choice(req: _Conversation) -> ToolChoice:
    """The request's tool_choice: auto by default when there are tools, none when there are none."""
    _check_tool_choice(req)
    choice = req.tool_choice
    if choice is None:
        return ToolChoice("auto" if req.tools else "none")
    if not req.tools and choice.type == "auto":
        return ToolChoice("none")
    return ToolChoice(_KINDS[choice.type], choice.name if choice.type == "tool" else None,
                      not choice.disable_parallel_tool_use)


def template_tools(req: _Conversation) -> list[dict[str, Any]] | None:
    """The tools in OpenAI function format for the chat template; None when there are none. With
    tool_choice 'none' they are still rendered (as the template does), and the output is not parsed."""
    if not req.tools:
        return None
    out = []
    for tool in req.tools:
        function: dict[str, Any] = {"name": tool.name}
        if tool.description is not None:
            function["description"] = tool.description
        function["parameters"] = tool.input_schema
        out.append({"type": "function", "function": function})
    return out


def conversation(req: _Conversation) -> Conversation:
    """The request's prompt side in the internal model (what count_tokens counts and messages generates from)."""
    return Conversation(tuple(chat_messages(req)), tuple(template_tools(req) or ()), tool_choice(req))


_ANTHROPIC_FIELDS = {"stop": "stop_sequences", "prompt": "messages"}
"""The engine's field names as this API's request names them."""


def generation_spec(req: MessagesRequest, defaults: SamplingDefaults) -> GenerationSpec:
    """The request in the internal model: one choice over its conversation."""
    return GenerationSpec(conversation(req), req.sampling_params(defaults), 1, _ANTHROPIC_FIELDS)


def anthropic_error(e: EngineError, spec: GenerationSpec) -> AnthropicError:
    """An engine error in Anthropic's shape: unavailability and a full queue are 529 `overloaded_error` (what
    its SDKs retry)."""
    status = 529 if e.code in (ErrorCode.UNAVAILABLE, ErrorCode.OVERLOADED) else e.code.http_status
    message = e.message if e.param is None else f"{spec.request_field(e.param)}: {e.message}"
    error = AnthropicError(status, message)
    if e.retry_after_s is not None:
        error.headers = {"retry-after": str(math.ceil(e.retry_after_s))}
    return error


def template_error(e: ChatTemplateError) -> AnthropicError:
    return AnthropicError(400, f"{e.param}: {e.message}")


# --- replies ------------------------------------------------------------------------------------------------

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]

_BASE62 = string.digits + string.ascii_letters


def _random_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_BASE62) for _ in range(24))


def new_message_id() -> str:
    """`msg_` + 24 base62 characters, like Anthropic's."""
    return _random_id("msg_")


def new_tool_use_id() -> str:
    """`toolu_` + 24 base62 characters, like Anthropic's."""
    return _random_id("toolu_")


def stop_reason_for(finish_reason: str | Enum, has_tool_calls: bool, stop_sequence: str | None = None) -> StopReason:
    """The engine's finish reason as Anthropic's stop_reason.

    The engine says "stop" both for end-of-sequence and for a matched stop string; StepOutput.stop_string
    names the string (pass it as `stop_sequence`). "length" is max_tokens (even with a tool call: it is cut off).
    "abort" (the engine stopped or the request was cancelled) has no stop_reason: it raises ValueError,
    and the gateway should send an error (`MessagesStream.error`) instead."""
    reason = finish_reason.value if isinstance(finish_reason, Enum) else finish_reason
    if reason == "length":
        return "max_tokens"
    if reason != "stop":
        raise ValueError(f"finish reason {reason!r} has no Anthropic stop_reason; reply with an error instead")
    if stop_sequence is not None:
        return "stop_sequence"
    return "tool_use" if has_tool_calls else "end_turn"


@dataclass(frozen=True, slots=True)
class MessageUsage:
    """Token counts as Anthropic reports them: `input_tokens` excludes the prompt tokens read from cache."""
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0

    @classmethod
    def from_prompt(cls, prompt_tokens: int, output_tokens: int, cached_tokens: int = 0) -> MessageUsage:
        """From the engine's counts: the whole prompt, and the part of it served from the prefix cache."""
        return cls(prompt_tokens - cached_tokens, output_tokens, cached_tokens)

    def as_dict(self) -> dict[str, int]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": self.cache_read_input_tokens}


def message_response(message_id: str, model: str, parsed: ParsedOutput, stop_reason: StopReason,
                     usage: MessageUsage, stop_sequence: str | None = None) -> dict[str, Any]:
    """The non-streaming reply: a text block (when there is text; not whitespace alone before tool calls),
    then a tool_use block per call."""
    content: list[dict[str, Any]] = []
    if parsed.content and not (parsed.tool_calls and parsed.content.isspace()):
        content.append({"type": "text", "text": parsed.content})
    for call in parsed.tool_calls:
        content.append({"type": "tool_use", "id": new_tool_use_id(), "name": call.name, "input": call.arguments})
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage.as_dict()}


def count_tokens_response(input_tokens: int) -> dict[str, int]:
    return {"input_tokens": input_tokens}


# --- streaming ----------------------------------------------------------------------------------------------

def sse_event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class MessagesStream:
    """One reply's SSE text, event by event:

        message_start, then per content block: content_block_start, content_block_delta..., content_block_stop
        (text blocks carry text_delta, tool_use blocks input_json_delta), then message_delta (stop_reason,
        output_tokens) and message_stop; `ping` any time; `error` ends the stream instead.

    Block indices count from 0. Text that is only whitespace is held until non-whitespace follows (then it
    opens a text block) and dropped at a tool call, so tool calls are not preceded by an empty-looking block.
    The events are the tool-call parser's (cluster/gateway/tool_calls.py)."""

    def __init__(self) -> None:
        self._blocks = 0
        """Blocks opened so far; the next block's index."""
        self._open: Literal["text", "tool_use"] | None = None
        self._call: int | None = None
        """The parser's index of the tool call whose block is open."""
        self._held = ""
        self._started = self._ended = False
        self.tool_use_ids: list[str] = []
        """The ids given to the tool calls, in order."""

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.tool_use_ids)

    def start(self, message_id: str, model: str, input_tokens: int, cache_read_input_tokens: int = 0) -> str:
        """message_start: an empty message; output_tokens 1 as Anthropic sends (the final count comes last)."""
        if self._started:
            raise RuntimeError("the stream has already started")
        self._started = True
        usage = MessageUsage(input_tokens, 1, cache_read_input_tokens).as_dict()
        message = {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": usage}
        return sse_event("message_start", {"type": "message_start", "message": message})

    def events(self, evs: Iterable[ToolCallEvent]) -> str:
        """The SSE text for the parser's events (often '' when text is held)."""
        self._check_live()
        out: list[str] = []
        for ev in evs:
            if isinstance(ev, TextDelta):
                out.append(self._text(ev.text))
            elif isinstance(ev, ToolCallStart):
                out.append(self._tool_start(ev.index, ev.name))
            elif isinstance(ev, ToolArgumentsDelta):
                out.append(self._arguments(ev.index, ev.fragment))
            else:
                raise TypeError(f"not a tool-call parser event: {ev!r}")
        return "".join(out)

    def ping(self) -> str:
        return sse_event("ping", {"type": "ping"})

    def finish(self, stop_reason: StopReason, stop_sequence: str | None, output_tokens: int) -> str:
        """Close the open block, then message_delta and message_stop. Whitespace still held is sent only when
        it is the whole reply."""
        self._check_live()
        out = []
        if self._held and self._blocks == 0:
            out.append(self._open_text())
        out.append(self._close())
        self._ended = True
        out.append(sse_event("message_delta", {"type": "message_delta",
                                               "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                               "usage": {"output_tokens": output_tokens}}))
        out.append(sse_event("message_stop", {"type": "message_stop"}))
        return "".join(out)

    def error(self, status: int, message: str) -> str:
        """An `error` event (Anthropic's error body); it ends the stream."""
        self._ended = True
        return sse_event("error", error_body(status, message))

    def _check_live(self) -> None:
        if not self._started:
            raise RuntimeError("call start() first")
        if self._ended:
            raise RuntimeError("the stream has ended")

    def _text(self, text: str) -> str:
        if self._open == "text":
            return self._delta({"type": "text_delta", "text": text}) if text else ""
        self._held += text
        if not self._held.strip():
            return ""
        return self._close() + self._open_text()

    def _open_text(self) -> str:
        text, self._held = self._held, ""
        return (self._block_start({"type": "text", "text": ""}, "text")
                + self._delta({"type": "text_delta", "text": text}))

    def _tool_start(self, index: int, name: str) -> str:
        self._held = ""
        out = self._close()
        self._call = index
        self.tool_use_ids.append(new_tool_use_id())
        block = {"type": "tool_use", "id": self.tool_use_ids[-1], "name": name, "input": {}}
        return out + self._block_start(block, "tool_use")

    def _arguments(self, index: int, fragment: str) -> str:
        if self._open != "tool_use" or index != self._call:
            now = f"tool call {self._call}" if self._open == "tool_use" else f"{self._open or 'no'} block"
            raise ValueError(f"arguments for tool call {index} arrived while the stream has {now} open")
        return self._delta({"type": "input_json_delta", "partial_json": fragment}) if fragment else ""

    def _block_start(self, block: dict[str, Any], kind: Literal["text", "tool_use"]) -> str:
        self._open = kind
        self._blocks += 1
        return sse_event("content_block_start", {"type": "content_block_start", "index": self._blocks - 1,
                                                 "content_block": block})

    def _delta(self, delta: dict[str, str]) -> str:
        return sse_event("content_block_delta", {"type": "content_block_delta", "index": self._blocks - 1,
                                                 "delta": delta})

    def _close(self) -> str:
        if self._open is None:
            return ""
        self._open, self._call = None, None
        return sse_event("content_block_stop", {"type": "content_block_stop", "index": self._blocks - 1})


# --- out of the event stream --------------------------------------------------------------------------------

def _stop(finish: Finish) -> tuple[StopReason, str | None]:
    """(stop_reason, stop_sequence) of a finished choice; an engine abort has no stop_reason: a 529."""
    if finish.reason is FinishReason.ABORT:
        raise AnthropicError(529, "the server stopped this request before it finished (shutting down); retry")
    reason = stop_reason_for(finish.reason, finish.has_tool_calls, finish.stop_string)
    return reason, finish.stop_string if reason == "stop_sequence" else None


@dataclass(frozen=True, slots=True)
class MessageReply:
    """How one request's events become its reply: a `message` body, or its SSE events."""
    message_id: str
    model: str
    spec: GenerationSpec
    """For errors in the request's terms."""

    def body(self, completed: Completed) -> dict[str, Any]:
        """The non-streaming reply (raises AnthropicError 529 for an aborted one)."""
        (result,) = completed.choices
        stop_reason, stop_sequence = _stop(result.finish)
        parsed = result.parsed or ParsedOutput(result.text if result.text.strip() else None, [])
        usage = MessageUsage.from_prompt(completed.usage.prompt_tokens, result.finish.completion_tokens,
                                         completed.usage.cached_tokens)
        return message_response(self.message_id, self.model, parsed, stop_reason, usage, stop_sequence)

    async def sse(self, events: AsyncIterator[Event]) -> AsyncIterator[str]:
        """message_start and a ping, content blocks as the events come, message_delta and message_stop; a
        failure after the stream began is an `error` event."""
        stream = MessagesStream()
        try:
            async with aclosing(events) as it:  # type: ignore[type-var]  # an async generator
                async for event in it:
                    if isinstance(event, Started):
                        yield stream.start(self.message_id, self.model, event.prompt_tokens - event.cached_tokens,
                                           event.cached_tokens)
                        yield stream.ping()
                    elif isinstance(event, ChoiceUpdate):
                        finish = event.finish  # an abort raises here: the error event, not its last content
                        stop = None if finish is None else (*_stop(finish), finish.completion_tokens)
                        if event.events:
                            yield stream.events(event.events)
                        if stop is not None:
                            yield stream.finish(*stop)
        except EngineError as e:
            error = anthropic_error(e, self.spec)
            yield stream.error(error.status, error.message)
        except AnthropicError as e:
            yield stream.error(e.status, e.message)
        except Exception:
            log.exception("message %s failed while streaming", self.message_id)
            yield stream.error(500, "the server failed while generating this message; it was logged, retry it")
