"""OpenAI's Responses API (`POST /v1/responses`) as a translator: its request shapes into the internal model,
the one event stream out as its `response` object and its SSE events, its errors. What Codex CLI speaks.

    parse_responses_request(body) -> ResponsesRequest          (every client mistake: RequestError 400)
      -> generation_spec(req, defaults): GenerationSpec whose prompt is conversation(req)   (conversation.py)
           instructions + the leading system/developer messages -> one system message
           message items -> chat messages; function_call items -> the assistant's tool_calls;
           function_call_output -> tool messages; reasoning items dropped
           function tools + the functions of `namespace` tools (flattened) -> OpenAI function tools
           text.format -> ResponseFormat; prompt_cache_key -> the head-routing key
      ... the gateway's one pipeline (generation.py) -> events (events.py) ...
      -> ResponseReply: body(completed) -> one `response` object, or sse(events) -> ResponseStream:
           response.created, response.in_progress, per output item: response.output_item.added,
           (message) response.content_part.added, response.output_text.delta..., response.output_text.done,
           response.content_part.done | (function_call) response.function_call_arguments.delta...,
           response.function_call_arguments.done; response.output_item.done; then response.completed,
           response.incomplete (max_output_tokens) or response.failed; every event with its sequence_number
      errors: openai.py's RequestError / openai_error (the same `{"error": {...}}` body as chat completions)

Stateless: nothing is stored. `store` is accepted either way and the response says `"store": false`;
`previous_response_id`, `conversation`, `background` and `item_reference` items (which need a stored
response) are a 400 saying to send the whole history in `input`, as Codex does (`store: false`).

Accepted and ignored on purpose (what Codex and the SDK send and a server of this model cannot use):
`reasoning`, `include`, `client_metadata`, `metadata`, `user`, `safety_identifier`, `service_tier`,
`stream_options`, `max_tool_calls`, `text.verbosity`, message item `id` / `status`, `reasoning` items in
the history. Built-in tools the server cannot run (`web_search`, `file_search`, `code_interpreter`, `mcp`,
`image_generation`, ... any tool type but `function`, `namespace`, `custom`) are accepted and left out of
the prompt. Refused with a 400 naming the field: image / file / audio parts, `custom` (free-form) tools,
`truncation: "auto"`, `top_logprobs`, a tool_choice other than auto / none / required / a function.

Pure apart from logging: no HTTP, no engine.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (BeforeValidator, Discriminator, Field, PlainValidator, Tag, ValidationError, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from nextserve.cluster.engine.contract import EngineError, ErrorCode, FinishReason, SamplingDefaults, SamplingParams
from nextserve.cluster.gateway.chat_template import ToolChoice
from nextserve.cluster.gateway.conversation import Conversation, GenerationSpec, ResponseFormat
from nextserve.cluster.gateway.events import (ChoiceResult, ChoiceUpdate, Completed, Event, Finish, Started,
                                              TextDelta, TokenUsage, ToolArgumentsDelta, ToolCallEvent,
                                              ToolCallStart)
from nextserve.cluster.gateway.protocols.json_body import BodyError, StrictModel, json_object
from nextserve.cluster.gateway.protocols.openai import NamedFunction, RequestError, openai_error
from nextserve.cluster.gateway.tool_calls import MAX_NAME, ParsedToolCall

log = logging.getLogger(__name__)

MAX_PROMPT_CACHE_KEY_CHARS = 1024
"""Longest `prompt_cache_key` taken (Codex sends a 36-character session id); it is only hashed."""

# --- request models -----------------------------------------------------------------------------------------


def _unsupported(message: str, **ctx: Any) -> PydanticCustomError:
    return PydanticCustomError("unsupported", message, ctx)


class TextPart(StrictModel):
    """input_text (user, system, developer), output_text (assistant history), or plain text."""
    type: Literal["input_text", "output_text", "text"]
    text: str


class RefusalPart(StrictModel):
    """An assistant's refusal in the history: its text is what it said."""
    type: Literal["refusal"]
    refusal: str


class _RefusedPart(StrictModel):
    type: Literal["input_image", "input_file", "input_audio"]

    @field_validator("type")
    @classmethod
    def _refuse(cls, value: str) -> str:
        raise _unsupported("'{type}' parts are not supported by this server (it serves a text-only model); send "
                           "the content as input_text", type=value)


Part = Annotated[Union[TextPart, RefusalPart, _RefusedPart], Field(discriminator="type")]


def _parts(value: Any) -> Any:
    """Content is a string (one text part) or a list of parts."""
    if isinstance(value, str):
        return [{"type": "input_text", "text": value}]
    if isinstance(value, list):
        return value
    raise PydanticCustomError("content_type", "expected a string or a list of content parts")


def _text_of(parts: Iterable[TextPart | RefusalPart | _RefusedPart]) -> str:
    return "\n".join(p.text if isinstance(p, TextPart) else p.refusal for p in parts
                     if isinstance(p, (TextPart, RefusalPart)))


class MessageItem(StrictModel):
    """A message: `{"role", "content"}` (the easy form, no type) or `{"type": "message", ...}`."""
    type: Literal["message"]
    role: Literal["user", "assistant", "system", "developer"]
    content: Annotated[list[Part], BeforeValidator(_parts)]


class FunctionCallItem(StrictModel):
    """A call the model made earlier (replayed history): arguments are a JSON string, as the API returns them."""
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    namespace: str | None = None
    """Set when the function belongs to a `namespace` tool."""

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            decoded = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise PydanticCustomError("arguments", "not valid JSON ({error}); send the arguments as the "
                                      "function_call item returned them", {"error": str(e)}) from None
        if not isinstance(decoded, dict):
            raise PydanticCustomError("arguments", "must encode a JSON object, got {kind}",
                                      {"kind": type(decoded).__name__})
        return value

    @property
    def arguments_object(self) -> dict[str, Any]:
        return json.loads(self.arguments) if self.arguments.strip() else {}


class FunctionCallOutputItem(StrictModel):
    """What the client's function returned."""
    type: Literal["function_call_output"]
    call_id: str
    output: Annotated[list[Part], BeforeValidator(_parts)]


class ReasoningItem(StrictModel):
    """A reasoning item of an earlier response (Codex replays them): accepted and dropped."""
    type: Literal["reasoning"]


class _ItemReference(StrictModel):
    type: Literal["item_reference"]

    @field_validator("type")
    @classmethod
    def _refuse(cls, value: str) -> str:
        raise _unsupported("item_reference needs a stored response and this server stores none; send the item "
                           "itself")


def _item(value: Any) -> Any:
    """The easy message form has no `type`: it is a message."""
    if isinstance(value, dict) and "type" not in value and "role" in value:
        return {**value, "type": "message"}
    return value


InputItem = Annotated[Union[MessageItem, FunctionCallItem, FunctionCallOutputItem, ReasoningItem, _ItemReference],
                      Field(discriminator="type"), BeforeValidator(_item)]


def _input(value: Any) -> Any:
    """`input` as a string is one user message."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return value


_NAME_PATTERN = rf"^[^>\n]{{1,{MAX_NAME}}}$"
"""What the tool-call parser can read back as a function name (no `>` or newline)."""


class FunctionTool(StrictModel):
    type: Literal["function"]
    name: str = Field(pattern=_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """The arguments' JSON schema; the parser types each value by its `properties`."""
    strict: bool | None = None


class NamespaceTool(StrictModel):
    """A group of functions (Codex sends its sub-agent tools as one); flattened into the prompt's tools."""
    type: Literal["namespace"]
    name: str = Field(min_length=1)
    description: str | None = None
    tools: list[FunctionTool]


class CustomTool(StrictModel):
    type: Literal["custom"]

    @field_validator("type")
    @classmethod
    def _refuse(cls, value: str) -> str:
        raise _unsupported("'custom' (free-form input) tools are not supported by this server; declare the tool as "
                           "a function tool with a JSON schema")


class BuiltinTool(StrictModel):
    """A tool the API's own servers run (web_search, file_search, ...): this server cannot; left out of the
    prompt."""
    type: str


def _tool_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else None
    return kind if kind in ("function", "namespace", "custom") else "builtin"


Tool = Annotated[Union[Annotated[FunctionTool, Tag("function")], Annotated[NamespaceTool, Tag("namespace")],
                       Annotated[CustomTool, Tag("custom")], Annotated[BuiltinTool, Tag("builtin")]],
                 Discriminator(_tool_kind)]


def _tool_choice(value: Any) -> str | NamedFunction | None:
    if value is None or value in ("auto", "none", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        if not isinstance(value.get("name"), str) or not value["name"]:
            raise PydanticCustomError("tool_choice", "a tool_choice of type 'function' needs the 'name' of the "
                                      "function to call")
        return NamedFunction(name=value["name"])
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        raise _unsupported("tool_choice of type '{type}' is not supported by this server; use 'auto', 'none', "
                           "'required' or {{'type': 'function', 'name': ...}}", type=value["type"])
    raise PydanticCustomError("tool_choice", "expected 'auto', 'none', 'required' or {'type': 'function', "
                              "'name': ...}")


class TextFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str = ""
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError("json_schema", "a text.format of type 'json_schema' needs its 'schema'")
        return self


class TextConfig(StrictModel):
    format: TextFormat | None = None


class ResponsesRequest(StrictModel):
    """`POST /v1/responses`."""
    prompt_param: ClassVar[str] = "input"
    model: str
    input: Annotated[list[InputItem], BeforeValidator(_input)] = Field(min_length=1)
    instructions: str | None = None
    tools: list[Tool] = Field(default_factory=list)
    tool_choice: Annotated[str | NamedFunction | None, PlainValidator(_tool_choice)] = None
    """Default: "auto" with function tools, "none" without."""
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(None, ge=1)
    """None: the rest of the context."""
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    """vLLM extension; None, 0 or -1 disable it."""
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    """Extension (chat completions' seed)."""
    text: TextConfig | None = None
    stream: bool = False
    store: bool | None = None
    """Accepted either way: nothing is stored (the response says `"store": false`)."""
    prompt_cache_key: str = Field("", max_length=MAX_PROMPT_CACHE_KEY_CHARS)
    """Joins the key that routes the request to a head replica: a session's turns land where its cache is."""
    top_logprobs: int | None = None
    truncation: Literal["auto", "disabled"] | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None

    @field_validator("top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value:
            raise _unsupported("top_logprobs is not supported on /v1/responses; /v1/chat/completions has logprobs")
        return value

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, value: str | None) -> str | None:
        if value == "auto":
            raise _unsupported("truncation 'auto' is not supported: this server never drops input; a prompt past "
                               "the context is refused (context_length_exceeded)")
        return value

    @field_validator("previous_response_id", "conversation", "prompt")
    @classmethod
    def _stateless(cls, value: Any) -> Any:
        if value is not None:
            raise _unsupported("this server stores no responses (a stateless gateway); send the whole "
                               "conversation in `input` with store: false, as Codex does")
        return value

    @field_validator("background")
    @classmethod
    def _foreground(cls, value: bool | None) -> bool | None:
        if value:
            raise _unsupported("background responses need a stored response and this server stores none; "
                               "use stream: true")
        return value


# --- parsing and its errors ---------------------------------------------------------------------------------

_TAGS = frozenset({"message", "function_call", "function_call_output", "reasoning", "item_reference", "input_text",
                   "output_text", "text", "refusal", "input_image", "input_file", "input_audio", "function",
                   "namespace", "custom", "builtin"})
"""Tags pydantic puts into an error's loc after the list index of a tagged union's item."""


def param_path(loc: Sequence[int | str]) -> str:
    """('input', 2, 'message', 'content', 0, 'input_text', 'text') -> 'input[2].content[0].text'."""
    out = ""
    for i, part in enumerate(loc):
        if i and isinstance(loc[i - 1], int) and part in _TAGS and i + 1 < len(loc):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(errors: list[Any]) -> RequestError:
    """The first of pydantic's errors as a 400 naming the field's path."""
    first = errors[0]
    loc = list(first["loc"])
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc.append("type")
    param = param_path(loc) or None
    if first["type"] == "missing" or first["type"] == "union_tag_not_found":
        return RequestError(400, f"Missing required parameter: '{param}'.", param, code="missing_required_parameter")
    if first["type"] == "union_tag_invalid":
        tag = (first.get("ctx") or {}).get("tag")
        return RequestError(400, f"Invalid value for '{param}': {tag!r} is not a type this server takes here "
                                 f"({(first.get('ctx') or {}).get('expected_tags')}).", param, code="invalid_value")
    return RequestError(400, f"Invalid value for '{param}': {first['msg']}.", param, code="invalid_value")


def parse_responses_request(body: bytes) -> ResponsesRequest:
    """Decode and validate a `/v1/responses` body; any problem is a 400 RequestError naming the field."""
    try:
        data = json_object(body)
    except BodyError as e:
        raise RequestError(400, str(e)) from None
    try:
        req = ResponsesRequest.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None
    FunctionNames.of(req.tools).check_choice(req.tool_choice)
    return req


# --- into the internal model --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FunctionNames:
    """The request's functions as the prompt names them: a namespace's function keeps its own name unless
    another function has it too, then it is `NAMESPACE.NAME`; and back, for the output's function_call items."""
    tools: tuple[dict[str, Any], ...] = ()
    """OpenAI function tools for the chat template, in the request's order (built-in tools left out)."""
    to_prompt: Mapping[tuple[str | None, str], str] = field(default_factory=dict)
    """(namespace or None, name) -> the name in the prompt."""
    from_prompt: Mapping[str, tuple[str | None, str]] = field(default_factory=dict)

    @classmethod
    def of(cls, tools: Sequence[FunctionTool | NamespaceTool | CustomTool | BuiltinTool]) -> FunctionNames:
        functions: list[tuple[str | None, FunctionTool]] = []
        for tool in tools:
            if isinstance(tool, FunctionTool):
                functions.append((None, tool))
            elif isinstance(tool, NamespaceTool):
                functions += [(tool.name, f) for f in tool.tools]
        counts: dict[str, int] = {}
        for _, f in functions:
            counts[f.name] = counts.get(f.name, 0) + 1
        to_prompt: dict[tuple[str | None, str], str] = {}
        out = []
        for namespace, f in functions:
            name = f.name if counts[f.name] == 1 or namespace is None else f"{namespace}.{f.name}"
            if (namespace, f.name) in to_prompt or name in to_prompt.values():
                where = f"namespace '{namespace}'" if namespace else "the top-level tools"
                raise RequestError(400, f"Invalid value for 'tools': the function '{f.name}' appears twice in {where}; "
                                   "function names must be unique", "tools", code="invalid_value")
            to_prompt[(namespace, f.name)] = name
            function: dict[str, Any] = {"name": name}
            if f.description is not None:
                function["description"] = f.description
            function["parameters"] = f.parameters or {"type": "object", "properties": {}}
            out.append({"type": "function", "function": function})
        return cls(tuple(out), to_prompt, {v: k for k, v in to_prompt.items()})

    def prompt_name(self, name: str, namespace: str | None = None) -> str:
        """A function as the prompt names it (one no longer offered keeps its name)."""
        return self.to_prompt.get((namespace, name), name)

    def resolve_choice(self, name: str) -> str:
        """A named tool_choice's function: a top-level function, else the one namespaced function of that name."""
        if (None, name) in self.to_prompt:
            return self.to_prompt[(None, name)]
        matches = [p for (ns, n), p in self.to_prompt.items() if n == name or p == name]
        if len(matches) != 1:
            offered = ", ".join(self.from_prompt) or "none"
            why = "is among several namespaces' functions" if matches else "is not among the function tools"
            raise RequestError(400, f"Invalid value for 'tool_choice': the function '{name}' {why} ({offered}); "
                               "name one of them", "tool_choice", code="invalid_value")
        return matches[0]

    def check_choice(self, choice: str | NamedFunction | None) -> None:
        if choice == "required" and not self.tools:
            raise RequestError(400, "Invalid value for 'tool_choice': 'required' needs function tools; send "
                               "`tools`", "tool_choice", code="invalid_value")
        if isinstance(choice, NamedFunction):
            self.resolve_choice(choice.name)

    def output_name(self, prompt_name: str) -> tuple[str, str | None]:
        """(name, namespace) of a function the model called by its prompt name."""
        namespace, name = self.from_prompt.get(prompt_name, (None, prompt_name))
        return name, namespace


def chat_messages(req: ResponsesRequest, names: FunctionNames) -> list[dict[str, Any]]:
    """OpenAI chat-shaped messages for the chat template.

    `instructions` and the leading system/developer messages make the one system message (later ones stay
    where they are, so a conversation's earlier turns, and their cached prefix, never change); function_call
    items join the assistant message before them (or open one) as tool_calls with their arguments as objects;
    function_call_output items are tool messages; reasoning items are dropped."""
    items = [i for i in req.input if not isinstance(i, ReasoningItem)]
    leading: list[str] = [req.instructions] if req.instructions else []
    start = 0
    for item in items:
        if not (isinstance(item, MessageItem) and item.role in ("system", "developer")):
            break
        leading.append(_text_of(item.content))
        start += 1
    out: list[dict[str, Any]] = [{"role": "system", "content": "\n\n".join(leading)}] if leading else []
    for item in items[start:]:
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": _text_of(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": names.prompt_name(item.name, item.namespace),
                                 "arguments": item.arguments_object}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text_of(item.output)})
    return out


def tool_choice(req: ResponsesRequest, names: FunctionNames) -> ToolChoice:
    choice = req.tool_choice
    if not names.tools:
        return ToolChoice("none")
    if isinstance(choice, NamedFunction):
        return ToolChoice("named", names.resolve_choice(choice.name), req.parallel_tool_calls)
    return ToolChoice(choice or "auto", None, req.parallel_tool_calls)  # type: ignore[arg-type]


def response_format(req: ResponsesRequest) -> ResponseFormat:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return ResponseFormat()
    if fmt.type == "json_object":
        return ResponseFormat("json_object")
    return ResponseFormat("json_schema", fmt.json_schema, fmt.name, bool(fmt.strict))


def conversation(req: ResponsesRequest, names: FunctionNames | None = None) -> Conversation:
    names = names or FunctionNames.of(req.tools)
    return Conversation(tuple(chat_messages(req, names)), names.tools, tool_choice(req, names))


_RESPONSES_FIELDS = {"prompt": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}
"""The engine's field names as this API's request names them."""


def sampling_params(req: ResponsesRequest, defaults: SamplingDefaults) -> SamplingParams:
    """Unset sampling fields take the checkpoint's defaults; the engine clamps max_output_tokens to the room
    the prompt leaves in the context."""
    return SamplingParams(max_tokens=req.max_output_tokens,
                          temperature=defaults.temperature if req.temperature is None else req.temperature,
                          top_p=defaults.top_p if req.top_p is None else req.top_p,
                          top_k=defaults.top_k if req.top_k is None else max(req.top_k, 0), seed=req.seed)


def generation_spec(req: ResponsesRequest, defaults: SamplingDefaults) -> GenerationSpec:
    """The request in the internal model: one choice over its conversation."""
    return GenerationSpec(conversation(req), sampling_params(req, defaults), 1, _RESPONSES_FIELDS,
                          response_format=response_format(req), prompt_cache_key=req.prompt_cache_key)


# --- out of the event stream --------------------------------------------------------------------------------

def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage_body(usage: TokenUsage) -> dict[str, Any]:
    """Responses' usage: input_tokens counts the whole prompt, cached_tokens the part the prefix cache served
    (cache_write_tokens is 0: writing the prefix cache costs a request nothing)."""
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [output_text(text)] if status != "in_progress" else []}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(item_id: str, call_id: str, name: str, namespace: str | None, arguments: str,
                       status: str) -> dict[str, Any]:
    item = {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}
    if namespace is not None:
        item["namespace"] = namespace
    return item


def _status(finish: Finish) -> tuple[str, dict[str, str] | None]:
    """(the response's status, its incomplete_details): "length" is max_output_tokens (or the context's end)."""
    if finish.reason is FinishReason.LENGTH:
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


class _Aborted(Exception):
    """The engine stopped the request before it finished (shutting down)."""


ABORTED_MESSAGE = "the server stopped this request before it finished (shutting down); retry it"


@dataclass(frozen=True, slots=True)
class ResponseReply:
    """How one request's events become its reply: a `response` object, or its SSE events."""
    response_id: str
    model: str
    created_at: int
    req: ResponsesRequest
    spec: GenerationSpec
    """For errors in the request's terms."""
    names: FunctionNames

    @classmethod
    def of(cls, model: str, req: ResponsesRequest, spec: GenerationSpec, created_at: int) -> ResponseReply:
        return cls(_new_id("resp"), model, created_at, req, spec, FunctionNames.of(req.tools))

    def response(self, status: str, output: list[dict[str, Any]], usage: TokenUsage | None = None,
                 incomplete: dict[str, str] | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The `response` object, echoing the request's settings."""
        req, params = self.req, self.spec.params
        choice = req.tool_choice
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else \
            {"type": "text"}
        return {"id": self.response_id, "object": "response", "created_at": self.created_at, "status": status,
                "background": False, "error": error, "incomplete_details": incomplete,
                "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": self.model,
                "output": output, "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None}, "store": False, "temperature": params.temperature,
                "text": {"format": fmt},
                "tool_choice": {"type": "function", "name": choice.name} if isinstance(choice, NamedFunction)
                else (choice or ("auto" if self.names.tools else "none")),
                "tools": [t.model_dump(by_alias=True, exclude_none=True) for t in req.tools], "top_p": params.top_p,
                "truncation": "disabled", "usage": usage_body(usage) if usage is not None else None,
                "user": None, "metadata": {}}

    def output(self, result: ChoiceResult) -> list[dict[str, Any]]:
        """A finished choice's output items: its text as one message (none for whitespace before calls), then
        one function_call item per complete call."""
        content = result.parsed.content if result.parsed is not None else result.text
        calls: list[ParsedToolCall] = result.parsed.tool_calls if result.parsed is not None else []
        status = _status(result.finish)[0]
        items = []
        if content and not (calls and content.isspace()):
            items.append(message_item(_new_id("msg"), content, status))
        for call in calls:
            name, namespace = self.names.output_name(call.name)
            items.append(function_call_item(_new_id("fc"), _new_id("call"), name, namespace, call.arguments_json,
                                            "completed"))
        return items

    def body(self, completed: Completed) -> dict[str, Any]:
        """The non-streaming reply (raises a 503 RequestError for a request the engine aborted)."""
        (result,) = completed.choices
        if result.finish.reason is FinishReason.ABORT:
            raise RequestError(503, ABORTED_MESSAGE, type="service_unavailable", code="service_unavailable")
        status, incomplete = _status(result.finish)
        return self.response(status, self.output(result), completed.usage, incomplete)

    async def sse(self, events: AsyncIterator[Event]) -> AsyncIterator[str]:
        """response.created and response.in_progress, the output items as the events come, then
        response.completed / response.incomplete; a failure after the stream began is response.failed."""
        stream = ResponseStream(self)
        try:
            async with aclosing(events) as it:  # type: ignore[type-var]  # an async generator
                async for event in it:
                    if isinstance(event, Started):
                        yield stream.start()
                    elif isinstance(event, ChoiceUpdate):
                        if event.events:
                            yield stream.events(event.events)
                        if event.finish is not None:
                            if event.finish.reason is FinishReason.ABORT:
                                raise _Aborted()
                            stream.finish_reason = event.finish
                    elif isinstance(event, Completed):
                        yield stream.finish(event.usage)
        except EngineError as e:
            error = openai_error(e, self.spec)
            code = "rate_limit_exceeded" if e.code in (ErrorCode.OVERLOADED, ErrorCode.RATE_LIMITED) else "server_error"
            yield stream.failed({"code": code, "message": error.message, "type": error.type, "param": error.param})
        except _Aborted:
            yield stream.failed({"code": "server_error", "message": ABORTED_MESSAGE, "type": "service_unavailable"})
        except Exception:
            log.exception("response %s failed while streaming", self.response_id)
            yield stream.failed({"code": "server_error", "type": "server_error",
                                 "message": "the server failed while generating this response; it was logged, "
                                            "retry it"})


def sse_event(data: dict[str, Any]) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class ResponseStream:
    """One reply's SSE events, with their sequence_number from 0.

    Text opens a message item (output_item.added, content_part.added) and streams as output_text.delta; a
    tool call closes it (output_text.done, content_part.done, output_item.done) and opens a function_call item
    whose arguments stream as function_call_arguments.delta (then .done and output_item.done). Text that is only
    whitespace is held until non-whitespace follows and dropped at a tool call (as chat's content is), so calls
    are not preceded by an empty-looking message. The events are the tool-call parser's (tool_calls.py)."""

    def __init__(self, reply: ResponseReply) -> None:
        self.reply = reply
        self.sequence_number = 0
        self.output: list[dict[str, Any]] = []
        """Every output item so far, as its output_item.done sent it (the open one last, still growing)."""
        self.open: dict[str, Any] | None = None
        self.text = ""
        """The open message's text, or the open call's arguments."""
        self.held = ""
        self.finish_reason: Finish | None = None

    def _event(self, type: str, **fields: Any) -> str:
        data = {"type": type, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return sse_event(data)

    def start(self) -> str:
        response = self.reply.response("in_progress", [])
        return self._event("response.created", response=response) + \
            self._event("response.in_progress", response=response)

    def events(self, evs: Iterable[ToolCallEvent]) -> str:
        out = []
        for ev in evs:
            if isinstance(ev, TextDelta):
                out.append(self._text(ev.text))
            elif isinstance(ev, ToolCallStart):
                self.held = ""
                out.append(self._close("completed") + self._open_call(ev.name))
            elif isinstance(ev, ToolArgumentsDelta):
                out.append(self._arguments(ev.fragment))
        return "".join(out)

    def finish(self, usage: TokenUsage) -> str:
        """Close the open item, then response.completed or response.incomplete with the whole response."""
        assert self.finish_reason is not None, "finish() before the choice finished"
        status, incomplete = _status(self.finish_reason)
        out = self._open_message() if self.held and not self.output else ""
        out += self._close(status if self.open is not None and self.open["type"] == "message" else "completed")
        response = self.reply.response(status, self.output, usage, incomplete)
        return out + self._event(f"response.{status}", response=response)

    def failed(self, error: dict[str, Any]) -> str:
        """response.failed: `error` is Responses' {code ("server_error", "rate_limit_exceeded"), message, type,
        param}, type and param as chat completions' error body names them."""
        return self._event("response.failed", response=self.reply.response("failed", self.output, error=error))

    def _text(self, text: str) -> str:
        if self.open is not None and self.open["type"] == "message":
            self.text += text
            return self._event("response.output_text.delta", item_id=self.open["id"], output_index=len(self.output) - 1,
                               content_index=0, delta=text, logprobs=[]) if text else ""
        self.held += text
        if not self.held.strip():
            return ""
        return self._close("completed") + self._open_message()

    def _open_message(self) -> str:
        held, self.held = self.held, ""
        item = message_item(_new_id("msg"), "", "in_progress")
        out = self._add(item) + self._event("response.content_part.added", item_id=item["id"],
                                            output_index=len(self.output) - 1, content_index=0,
                                            part=output_text(""))
        return out + self._text(held)

    def _open_call(self, prompt_name: str) -> str:
        name, namespace = self.reply.names.output_name(prompt_name)
        return self._add(function_call_item(_new_id("fc"), _new_id("call"), name, namespace, "", "in_progress"))

    def _arguments(self, fragment: str) -> str:
        if self.open is None or self.open["type"] != "function_call" or not fragment:
            return ""
        self.text += fragment
        return self._event("response.function_call_arguments.delta", item_id=self.open["id"],
                           output_index=len(self.output) - 1, delta=fragment)

    def _add(self, item: dict[str, Any]) -> str:
        self.open, self.text = item, ""
        self.output.append(item)
        return self._event("response.output_item.added", output_index=len(self.output) - 1, item=item)

    def _close(self, status: str) -> str:
        item, index = self.open, len(self.output) - 1
        if item is None:
            return ""
        self.open = None
        if item["type"] == "message":
            done = message_item(item["id"], self.text, status)
            out = self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                              text=self.text, logprobs=[])
            out += self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                               part=output_text(self.text))
        else:
            done = {**item, "arguments": self.text, "status": "completed"}
            out = self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                              name=item["name"], arguments=self.text)
        self.output[index] = done
        return out + self._event("response.output_item.done", output_index=index, item=done)
