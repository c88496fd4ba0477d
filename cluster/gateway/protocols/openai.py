"""The OpenAI HTTP API as a translator: its request shapes into the internal model, the one event stream
out as its response bodies and SSE chunks, its errors.

    body -> parse_request(body, CompletionRequest | ChatCompletionRequest)   (a 400 naming the field)
      -> generation_spec(req, defaults): GenerationSpec (conversation.py; a completion's prompt as sent)
      ... the gateway's one pipeline (generation.py) -> events (events.py) ...
      -> Reply(header, ...): chunks(events) -> SSE (a choice's first chunk carries the role; usage with
         stream_options.include_usage; `data: [DONE]`), or body(completed) -> one JSON body
      errors: openai_error(EngineError, spec), template_error(ChatTemplateError) -> RequestError

Pure apart from the tokenizer (token texts of logprobs): no HTTP, no engine. `parse_request` turns every
client mistake into a `RequestError` carrying the OpenAI error body: malformed JSON, a wrong type, a missing
field, a value out of range, a feature we don't serve (echo, best_of, suffix, non-text content). Unknown
extra fields are accepted and ignored, as OpenAI clients send many. Chat requests carry `tools` (function
tools), `tool_choice`, `parallel_tool_calls`; both endpoints `n` (1-16), logprobs and `response_format`
({"type": "text" | "json_object"} or {"type": "json_schema", "json_schema": {name, schema, strict}}: the
output is constrained to it by the engine's grammar, conversation.py's ResponseFormat).
"""

from __future__ import annotations

import json
import math
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (BaseModel, ConfigDict, Field, PlainValidator, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from transformers import PreTrainedTokenizerBase

from nextserve.cluster.engine.contract import (EngineError, ErrorCode, FinishReason, SamplingDefaults,
                                               SamplingParams, TokenLogprobs)
from nextserve.cluster.gateway.chat_template import ChatTemplateError, ToolChoice
from nextserve.cluster.gateway.conversation import Conversation, GenerationSpec, ResponseFormat
from nextserve.cluster.gateway.events import (ChoiceResult, ChoiceUpdate, Completed, Event, Finish, TextDelta,
                                              TokenUsage, ToolCallEvent, ToolCallStart)
from nextserve.cluster.gateway.protocols.json_body import BodyError, StrictModel, json_object
from nextserve.cluster.gateway.tool_calls import ParsedToolCall

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
MAX_CHOICES = 16
"""Most choices (`n`) per request."""
MAX_LOGPROBS = 20
"""Most alternatives per token (OpenAI's limit for top_logprobs)."""
SERVER_ERROR = "server_error"


class RequestError(Exception):
    """A request the gateway refuses; `body()` is the OpenAI error body sent with `status_code`."""

    def __init__(self, status_code: int, message: str, param: str | None = None,
                 type: str = INVALID_REQUEST, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code, self.message, self.param, self.type, self.code = status_code, message, param, type, code
        self.headers: dict[str, str] | None = None
        """Response headers the error needs (Retry-After of a 429)."""

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = INVALID_REQUEST, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _unsupported(what: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported", "{what} is not supported by this server", {"what": what})


def _prompt(value: Any) -> str | list[int]:
    """A string, token ids, or a batch of exactly one of those (batches of several are refused)."""
    if isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
        if len(value) != 1:
            raise PydanticCustomError("batch", "a batch of {n} prompts is not supported; send one request per "
                                      "prompt", {"n": len(value)})
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    raise PydanticCustomError("prompt_type", "expected a string or a list of token ids (integers)")


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise PydanticCustomError("stop_type", "expected a non-empty string or a list of non-empty strings")
    return items  # how many and how long: a serving rule, the engine's admission (one owner)


def _content(value: Any) -> str | None:
    """Message content: a string, or a list of text parts (joined); other part types are refused."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        if any(p.get("type") != "text" for p in value):
            raise _unsupported("content other than text parts")
        if not all(isinstance(p.get("text"), str) for p in value):
            raise PydanticCustomError("content_type", "every text part needs a string 'text'")
        return "\n".join(p["text"] for p in value)
    raise PydanticCustomError("content_type", "expected a string or a list of content parts")


Prompt = Annotated[str | list[int], PlainValidator(_prompt)]
Stop = Annotated[list[str], PlainValidator(_stop)]
Content = Annotated[str | None, PlainValidator(_content)]


class StreamOptions(StrictModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    """The JSON Schema the output must be valid against (the keywords the engine enforces: docs/AGENTS.md)."""
    strict: bool | None = None


class ResponseFormatParam(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormatParam:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError("response_format", "type 'json_schema' needs `json_schema`: {name, schema}")
        return self

    def spec(self) -> ResponseFormat:
        if self.type != "json_schema" or self.json_schema is None:
            return ResponseFormat(self.type)
        f = self.json_schema
        return ResponseFormat("json_schema", f.json_schema, f.name, bool(f.strict))


class GenerationRequest(StrictModel):
    """Fields common to both endpoints; strict, so "5" is not an int and 1 is not a bool."""
    prompt_param: ClassVar[str]
    """The field that holds the prompt, for errors about it."""
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    """None means OpenAI's default, 1.0; 0 means greedy."""
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    """vLLM extension; None, 0 or -1 disable it."""
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    """The range a torch generator accepts."""
    stop: Stop = Field(default_factory=list)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    user: str | None = None
    ignore_eos: bool = False
    """vLLM extension: keep generating past end-of-sequence (load generators want fixed lengths)."""
    cache_salt: str = Field("", max_length=256)
    """vLLM extension: requests share prefix-cache entries only with requests of the same tenant and salt."""
    response_format: ResponseFormatParam | None = None
    """What the output must parse as (JSON object, JSON valid against a schema); None: text."""

    @field_validator("n", mode="before")
    @classmethod
    def _n_default(cls, n: Any) -> Any:
        return 1 if n is None else n

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def max_tokens_request(self) -> tuple[int | None, str]:
        """(max tokens asked for, None for the rest of the context; the field that holds it)."""
        return self.max_tokens, "max_tokens"

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives to report per token (None: no logprobs at all)."""
        return None

    def sampling_params(self, defaults: SamplingDefaults) -> SamplingParams:
        """Unset sampling fields take the checkpoint's defaults (its generation_config.json); the engine
        clamps max_tokens to the room the prompt leaves in the context."""
        return SamplingParams(max_tokens=self.max_tokens_request()[0],
                              temperature=defaults.temperature if self.temperature is None else self.temperature,
                              top_p=defaults.top_p if self.top_p is None else self.top_p,
                              top_k=defaults.top_k if self.top_k is None else max(self.top_k, 0),
                              seed=self.seed, ignore_eos=self.ignore_eos, logprobs=self.num_logprobs,
                              stop=tuple(self.stop))


class CompletionRequest(GenerationRequest):
    prompt_param = "prompt"
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1)
    """OpenAI's default for completions; None means the rest of the context."""
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """Report the sampled token's logprob and this many alternatives per token."""
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("echo", "suffix", "best_of")
    @classmethod
    def _refuse(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and value is not False and not (info.field_name == "best_of" and value == 1):
            raise _unsupported(str(info.field_name))
        return value

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


class FunctionCall(StrictModel):
    name: str
    arguments: str | dict[str, Any] = "{}"
    """A JSON string, as OpenAI clients send it (an object is accepted too); decoded before rendering."""


class ToolCall(StrictModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    """Assistant messages: the calls it made."""
    tool_call_id: str | None = None
    """Tool messages: the call this result answers."""

    def as_template_input(self) -> dict[str, Any]:
        """The message as the chat template reads it (chat_template.py decodes the arguments)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class FunctionDefinition(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """The arguments' JSON schema; the parser types each value by its `properties`."""
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


def _tool_choice(value: Any) -> str | NamedToolChoice | None:
    if value is None or value in ("auto", "none", "required"):
        return value
    if isinstance(value, dict):
        return NamedToolChoice.model_validate(value)
    raise PydanticCustomError("tool_choice", "expected 'auto', 'none', 'required' or "
                              "{'type': 'function', 'function': {'name': ...}}")


ToolChoiceParam = Annotated[str | NamedToolChoice | None, PlainValidator(_tool_choice)]


class ChatCompletionRequest(GenerationRequest):
    prompt_param = "messages"
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """Wins over max_tokens (OpenAI's newer name); neither means the rest of the context."""
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """Alternatives per token, with logprobs true."""
    tools: list[Tool] | None = None
    tool_choice: ToolChoiceParam = None
    """Default: "auto" with tools, "none" without."""
    parallel_tool_calls: bool = True

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs_default(cls, value: Any) -> Any:
        return False if value is None else value

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise PydanticCustomError("top_logprobs", "top_logprobs needs logprobs: true")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise PydanticCustomError("tools", "tool names must be unique, got {names}", {"names": names})
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise PydanticCustomError("tool_choice", "tool_choice names {name!r}, which is not among the tools "
                                      "({names}); add it to `tools` or use 'auto'",
                                      {"name": self.tool_choice.function.name, "names": ", ".join(names) or "none"})
        if self.tool_choice == "required" and not names:
            raise PydanticCustomError("tool_choice", "tool_choice 'required' needs tools; send `tools`")
        return self

    def max_tokens_request(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template takes them (OpenAI's shape), None without any."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def tool_choice_spec(self) -> ToolChoice:
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if self.tools else "none")
        if isinstance(choice, NamedToolChoice):
            return ToolChoice("named", choice.function.name, self.parallel_tool_calls)
        return ToolChoice(choice, None, self.parallel_tool_calls)


def param_path(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


R = TypeVar("R", bound=BaseModel)


def parse_request(body: bytes, model: type[R]) -> R:
    """Decode and validate a JSON body; any problem becomes a 400 RequestError naming the field."""
    try:
        data = json_object(body)
    except BodyError as e:
        raise RequestError(400, str(e)) from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None


def validation_error(errors: list[Any]) -> RequestError:
    """The first of pydantic's (or FastAPI's) errors as a 400 naming the field's path."""
    first = errors[0]
    loc = tuple(first["loc"])
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    param = param_path(loc) or (first["type"] if first["type"] in ("tools", "tool_choice", "top_logprobs",
                                                                   "response_format") else None)
    if first["type"] == "missing":
        return RequestError(400, f"Missing required parameter: '{param}'.", param, code="missing_required_parameter")
    return RequestError(400, f"Invalid value for '{param}': {first['msg']}.", param, code="invalid_value")


class Endpoint(Enum):
    """The two generation endpoints, with their ids' prefix and the `object` of a response and a chunk."""
    COMPLETIONS = ("cmpl", "text_completion", "text_completion")
    CHAT = ("chatcmpl", "chat.completion", "chat.completion.chunk")

    def __init__(self, id_prefix: str, response_object: str, chunk_object: str) -> None:
        self.id_prefix, self.response_object, self.chunk_object = id_prefix, response_object, chunk_object


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Prompt tokens served from the head's prefix cache (prompt_tokens_details.cached_tokens)."""

    @classmethod
    def of(cls, usage: TokenUsage) -> Usage:
        return cls(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass(frozen=True, slots=True)
class ResponseHeader:
    """What every response and chunk of one request repeats."""
    endpoint: Endpoint
    id: str
    created: int
    model: str


def choice_body(endpoint: Endpoint, index: int, text: str | None, tool_calls: list[dict[str, Any]] | None,
                finish_reason: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    """One choice of a whole response; `finish_reason`: "stop", "length", "tool_calls" ("abort" is not
    OpenAI's, passed through as vLLM does)."""
    choice: dict[str, Any] = {"index": index}
    if endpoint is Endpoint.COMPLETIONS:
        choice["text"] = text or ""
    else:
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not tool_calls else None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        choice["message"] = message
    choice.update(logprobs=logprobs, finish_reason=finish_reason)
    return choice


def response_body(h: ResponseHeader, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
    return {"id": h.id, "object": h.endpoint.response_object, "created": h.created, "model": h.model,
            "choices": choices, "usage": usage.as_dict()}


def chunk_body(h: ResponseHeader, index: int, delta: dict[str, Any], finish_reason: str | None, is_first: bool,
               include_usage: bool, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    """One streamed chunk of choice `index`: a chat `delta` (its first carries the role; a finish chunk's is
    empty), or a completion's text."""
    if h.endpoint is Endpoint.COMPLETIONS:
        choice: dict[str, Any] = {"index": index, "text": delta.get("content", "")}
    else:
        choice = {"index": index, "delta": {"role": "assistant", **delta} if is_first else delta}
    choice.update(logprobs=logprobs, finish_reason=finish_reason)
    body = {"id": h.id, "object": h.endpoint.chunk_object, "created": h.created, "model": h.model,
            "choices": [choice]}
    if include_usage:
        body["usage"] = None
    return body


def _token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(entries: list[TokenLogprobs], tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}]} for these tokens."""
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_logprobs(entries: list[TokenLogprobs], tokenizer: PreTrainedTokenizerBase,
                        text_offset: int = 0) -> dict[str, Any]:
    """Completions `logprobs`: parallel lists of tokens, their logprobs, the top alternatives, text offsets."""
    tokens = [_token_text(tokenizer, e.token_id) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(text_offset)
        text_offset += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_token_text(tokenizer, t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets}


def usage_chunk_body(h: ResponseHeader, usage: Usage) -> dict[str, Any]:
    """The extra last chunk of stream_options.include_usage: no choices, the whole request's usage."""
    return {"id": h.id, "object": h.endpoint.chunk_object, "created": h.created, "model": h.model,
            "choices": [], "usage": usage.as_dict()}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# --- into the internal model, and errors --------------------------------------------------------------------

def generation_spec(req: GenerationRequest, defaults: SamplingDefaults) -> GenerationSpec:
    """The request in the internal model: a chat's messages and tools as a Conversation, a completion's
    prompt as sent; errors about the engine's fields name this request's."""
    prompt: Conversation | str | list[int]
    if isinstance(req, ChatCompletionRequest):
        prompt = Conversation(tuple(m.as_template_input() for m in req.messages), tuple(req.template_tools() or ()),
                              req.tool_choice_spec())
    else:
        assert isinstance(req, CompletionRequest)
        prompt = req.prompt
    fields = {"prompt": req.prompt_param, "max_tokens": req.max_tokens_request()[1]}
    response_format = req.response_format.spec() if req.response_format is not None else ResponseFormat()
    return GenerationSpec(prompt, req.sampling_params(defaults), req.n, fields, req.cache_salt, response_format)


_OPENAI_CODES = {ErrorCode.INVALID_REQUEST: ("invalid_request_error", "invalid_value"),
                 ErrorCode.CONTEXT_LENGTH_EXCEEDED: ("invalid_request_error", "context_length_exceeded"),
                 ErrorCode.UNAVAILABLE: ("service_unavailable", "service_unavailable"),
                 ErrorCode.INTERNAL: (SERVER_ERROR, "internal_error"),
                 ErrorCode.OVERLOADED: ("rate_limit_error", "server_overloaded"),
                 ErrorCode.RATE_LIMITED: ("requests", "rate_limit_exceeded"),
                 ErrorCode.CLIENT_TIMEOUT: ("invalid_request_error", "stream_idle_timeout")}
"""The engine's error codes as OpenAI's error `type` and `code`."""


def openai_error(e: EngineError, spec: GenerationSpec) -> RequestError:
    """An engine error in OpenAI's shape: its status from the code, the engine's field in the request's terms."""
    kind, code = _OPENAI_CODES[e.code]
    param = None if e.param is None else spec.request_field(e.param)
    error = RequestError(e.code.http_status, e.message, param, type=kind, code=code)
    if e.retry_after_s is not None:
        error.headers = {"Retry-After": str(math.ceil(e.retry_after_s))}
    return error


def template_error(e: ChatTemplateError) -> RequestError:
    return RequestError(400, e.message, e.param)


# --- out of the event stream --------------------------------------------------------------------------------

def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def finish_reason(finish: Finish) -> str:
    """"stop", "length", "tool_calls" (stopped after a complete call); "abort" is not OpenAI's, passed
    through as vLLM does."""
    if finish.reason is FinishReason.STOP and finish.has_tool_calls:
        return "tool_calls"
    return finish.reason.value


def delta(event: ToolCallEvent) -> dict[str, Any]:
    """A chat chunk's delta for one content event (a call's first delta carries its new id and name)."""
    if isinstance(event, TextDelta):
        return {"content": event.text}
    if isinstance(event, ToolCallStart):
        return {"tool_calls": [{"index": event.index, "id": new_call_id(), "type": "function",
                                "function": {"name": event.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.fragment}}]}


def tool_call_bodies(calls: list[ParsedToolCall]) -> list[dict[str, Any]]:
    return [{"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
            for c in calls]


@dataclass(frozen=True, slots=True)
class Reply:
    """How one request's events become its response: SSE chunks or one body."""
    header: ResponseHeader
    tokenizer: PreTrainedTokenizerBase
    """Token texts for logprobs."""
    has_logprobs: bool
    include_usage: bool
    spec: GenerationSpec
    """For errors in the request's terms."""

    @classmethod
    def of(cls, endpoint: Endpoint, model: str, req: GenerationRequest, spec: GenerationSpec,
           tokenizer: PreTrainedTokenizerBase, created: int) -> Reply:
        header = ResponseHeader(endpoint, f"{endpoint.id_prefix}-{uuid.uuid4().hex}", created, model)
        return cls(header, tokenizer, req.num_logprobs is not None, req.include_usage, spec)

    def logprobs(self, entries: list[TokenLogprobs] | tuple[TokenLogprobs, ...],
                 text_offset: int = 0) -> dict[str, Any] | None:
        """The logprobs body for these tokens; `text_offset`: characters of the choice's text before them."""
        if not self.has_logprobs:
            return None
        if self.header.endpoint is Endpoint.CHAT:
            return chat_logprobs(list(entries), self.tokenizer)
        return completion_logprobs(list(entries), self.tokenizer, text_offset)

    def choice(self, result: ChoiceResult) -> dict[str, Any]:
        logprobs, reason = self.logprobs(result.logprobs), finish_reason(result.finish)
        if result.parsed is None:
            return choice_body(self.header.endpoint, result.index, result.text, None, reason, logprobs)
        calls = tool_call_bodies(result.parsed.tool_calls)
        return choice_body(self.header.endpoint, result.index, result.parsed.content, calls, reason, logprobs)

    def body(self, completed: Completed) -> dict[str, Any]:
        return response_body(self.header, [self.choice(c) for c in completed.choices], Usage.of(completed.usage))

    def update_chunks(self, update: ChoiceUpdate) -> list[dict[str, Any]]:
        """A choice's chunks for one update: its deltas (the first update has at least one, carrying the role;
        logprobs ride on the last), then a finish chunk on its last."""
        h, logprobs = self.header, self.logprobs(update.logprobs, update.text_offset)
        deltas = [delta(e) for e in update.events] or ([{"content": ""}] if update.is_first or logprobs else [])
        chunks = [chunk_body(h, update.index, d, None, update.is_first and k == 0, self.include_usage,
                             logprobs if k == len(deltas) - 1 else None) for k, d in enumerate(deltas)]
        if update.finish is not None:
            chunks.append(chunk_body(h, update.index, {}, finish_reason(update.finish), False, self.include_usage,
                                     None))
        return chunks

    async def chunks(self, events: AsyncIterator[Event]) -> AsyncIterator[str]:
        """The SSE text: chunks per update, then usage (stream_options.include_usage) and [DONE]; a failure
        after the stream began is an error event in OpenAI's shape, then [DONE]."""
        try:
            async with aclosing(events) as stream:  # type: ignore[type-var]  # an async generator
                async for event in stream:
                    if isinstance(event, ChoiceUpdate):
                        for chunk in self.update_chunks(event):
                            yield sse(chunk)
                    elif isinstance(event, Completed) and self.include_usage:
                        yield sse(usage_chunk_body(self.header, Usage.of(event.usage)))
        except EngineError as e:
            yield sse(openai_error(e, self.spec).body())
        except Exception:
            log.exception("request %s failed while streaming", self.header.id)
            yield sse(error_body("the server failed while generating this response; it was logged, retry it",
                                 SERVER_ERROR))
        yield SSE_DONE
