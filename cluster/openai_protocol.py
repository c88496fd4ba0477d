"""The OpenAI HTTP API's shapes: request models (validated with pydantic), response and chunk bodies, errors.

Pure: no I/O, no engine. The gateway (cluster/gateway_app.py) parses a body with `parse_request`, which
turns every client mistake into a `RequestError` carrying the OpenAI error body: malformed JSON, a wrong
type, a missing field, a value out of range, a feature we don't serve (n > 1, logprobs, echo, best_of,
suffix, non-text content). Unknown extra fields are accepted and ignored, as OpenAI clients send many.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (BaseModel, ConfigDict, Field, PlainValidator, ValidationError, ValidationInfo,
                      field_validator)
from pydantic_core import PydanticCustomError

from nextserve.model.sampling import SamplingParams

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class RequestError(Exception):
    """A request the gateway refuses; `body()` is the OpenAI error body sent with `status_code`."""

    def __init__(self, status_code: int, message: str, param: str | None = None,
                 type: str = INVALID_REQUEST, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code, self.message, self.param, self.type, self.code = status_code, message, param, type, code

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
    return items


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


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields common to both endpoints; strict, so "5" is not an int and 1 is not a bool."""
    model_config = ConfigDict(strict=True, extra="ignore")
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
    n: int | None = 1
    user: str | None = None
    ignore_eos: bool = False
    """vLLM extension: keep generating past end-of-sequence (load generators want fixed lengths)."""

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise PydanticCustomError("unsupported", "only n=1 is supported; send {n} requests instead", {"n": n})
        return n

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def max_tokens_request(self) -> tuple[int | None, str, bool]:
        """(max tokens asked for, None for the rest of the context; its field; whether the client set it)."""
        return self.max_tokens, "max_tokens", "max_tokens" in self.model_fields_set

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p, top_k=max(self.top_k or 0, 0),
                              seed=self.seed, ignore_eos=self.ignore_eos)


class CompletionRequest(GenerationRequest):
    prompt_param = "prompt"
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1)
    """OpenAI's default for completions; None means the rest of the context."""
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("logprobs", "echo", "suffix", "best_of")
    @classmethod
    def _refuse(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and value is not False and not (info.field_name == "best_of" and value == 1):
            raise _unsupported(str(info.field_name))
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content or ""}


class ChatCompletionRequest(GenerationRequest):
    prompt_param = "messages"
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """Wins over max_tokens (OpenAI's newer name); neither means the rest of the context."""
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _refuse(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            raise _unsupported(str(info.field_name))
        return value

    def max_tokens_request(self) -> tuple[int | None, str, bool]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens", True
        return self.max_tokens, "max_tokens", True


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
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(data).__name__}")
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
    param = param_path(loc) or None
    if first["type"] == "missing":
        return RequestError(400, f"Missing required parameter: '{param}'.", param, code="missing_required_parameter")
    return RequestError(400, f"Invalid value for '{param}': {first['msg']}.", param, code="invalid_value")


class Endpoint(Enum):
    """The two generation endpoints, with their ids' prefix and the `object` of a response and a chunk."""
    COMPLETIONS = ("cmpl", "text_completion", "text_completion")
    CHAT = ("chatcmpl", "chat.completion", "chat.completion.chunk")

    def __init__(self, id_prefix: str, response_object: str, chunk_object: str) -> None:
        self.id_prefix, self.response_object, self.chunk_object = id_prefix, response_object, chunk_object


FinishReason = str | Enum | None
"""None until the end; "stop" | "length" | "abort" (not OpenAI's: passed through as vLLM does), or an Enum
with those values."""


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass(frozen=True, slots=True)
class ResponseHeader:
    """What every response and chunk of one request repeats."""
    endpoint: Endpoint
    id: str
    created: int
    model: str


def _choice(endpoint: Endpoint, text: str, finish_reason: FinishReason, delta: dict[str, str] | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0}
    finish_reason = finish_reason.value if isinstance(finish_reason, Enum) else finish_reason
    if endpoint is Endpoint.COMPLETIONS:
        choice["text"] = text
    elif delta is not None:
        choice["delta"] = delta
    else:
        choice["message"] = {"role": "assistant", "content": text}
    choice.update(logprobs=None, finish_reason=finish_reason)
    return choice


def response_body(h: ResponseHeader, text: str, finish_reason: FinishReason, usage: Usage) -> dict[str, Any]:
    return {"id": h.id, "object": h.endpoint.response_object, "created": h.created, "model": h.model,
            "choices": [_choice(h.endpoint, text, finish_reason, None)], "usage": usage.as_dict()}


def chunk_body(h: ResponseHeader, text: str, finish_reason: FinishReason, is_first: bool,
               include_usage: bool) -> dict[str, Any]:
    """One streamed chunk; a chat stream's first delta carries the role, its last an empty delta."""
    delta: dict[str, str] = {"role": "assistant", "content": text} if is_first else {"content": text}
    if finish_reason is not None and not text and not is_first:
        delta = {}
    body = {"id": h.id, "object": h.endpoint.chunk_object, "created": h.created, "model": h.model,
            "choices": [_choice(h.endpoint, text, finish_reason, delta)]}
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk_body(h: ResponseHeader, usage: Usage) -> dict[str, Any]:
    """The extra last chunk of stream_options.include_usage: no choices, the whole request's usage."""
    return {"id": h.id, "object": h.endpoint.chunk_object, "created": h.created, "model": h.model,
            "choices": [], "usage": usage.as_dict()}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
