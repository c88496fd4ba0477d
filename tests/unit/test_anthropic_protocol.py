"""The Anthropic Messages API shapes, without a server: request validation and its errors, the chat-template
input, the reply and the SSE stream. Bodies are the ones Claude Code and the anthropic SDK send (captured
from the SDK through an httpx mock transport), and replies are read back by the SDK itself."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any

import anthropic
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from nextserve.cluster.engine.contract import FinishReason
from nextserve.cluster.gateway.chat_template import ToolChoice
from nextserve.model.sampling import SamplingDefaults
from nextserve.cluster.gateway.protocols.anthropic import (AnthropicError, MessagesStream, MessageUsage,
                                                           chat_messages, count_tokens_response, error_body,
                                                           message_response,
                                                           new_message_id, new_tool_use_id,
                                                           parse_count_tokens_request, parse_messages_request,
                                                           stop_reason_for, template_tools, tool_choice)
from nextserve.cluster.gateway.tool_calls import (ParsedOutput, ParsedToolCall, TextDelta, ToolArgumentsDelta,
                                                  ToolCallParser, ToolCallStart, parse_tool_calls, tool_schemas)

try:  # the HTTP client the SDK is built on: httpx2 in recent versions, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx  # type: ignore[no-redef]

EVENT = TypeAdapter(RawMessageStreamEvent)

BASH_SCHEMA = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "additionalProperties": False,
               "properties": {"command": {"type": "string", "description": "The command to execute"},
                              "timeout": {"type": "number", "description": "Optional timeout in milliseconds"}},
               "required": ["command"]}
READ_SCHEMA = {"type": "object", "properties": {"file_path": {"type": "string"}, "limit": {"type": "integer"}},
               "required": ["file_path"]}

CLAUDE_CODE_BODY: dict[str, Any] = {
    "model": "claude-sonnet-4-5-20250929",
    "max_tokens": 32000,
    "stream": True,
    "temperature": 1,
    "system": [
        {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
         "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "You are an interactive CLI tool that helps users with software engineering tasks.",
         "cache_control": {"type": "ephemeral", "ttl": "1h"}},
    ],
    "messages": [{"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>\nThe date is today.\n</system-reminder>"},
        {"type": "text", "text": "why does the build fail?", "cache_control": {"type": "ephemeral"}},
    ]}],
    "tools": [
        {"name": "Bash", "description": "Executes a given bash command", "input_schema": BASH_SCHEMA},
        {"name": "Read", "description": "Reads a file", "input_schema": READ_SCHEMA,
         "cache_control": {"type": "ephemeral"}},
        {"type": "custom", "name": "mcp__github__get_issue", "input_schema": {"type": "object", "properties": {}}},
    ],
    "metadata": {"user_id": "user_0123_account__session_4567"},
    "thinking": {"type": "adaptive"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "output_config": {"effort": "high"},
    "service_tier": "auto",
    "container": None,
    "mcp_servers": [],
    "some_future_field": {"x": 1},
}


def body(**changes: Any) -> bytes:
    data = copy.deepcopy(CLAUDE_CODE_BODY)
    data.update(changes)
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def refusal(raw: bytes, parse: Callable[[bytes], Any] = parse_messages_request) -> str:
    with pytest.raises(AnthropicError) as e:
        parse(raw)
    assert e.value.status == 400
    assert e.value.body == {"type": "error", "error": {"type": "invalid_request_error", "message": e.value.message}}
    return e.value.message


def parse_sse(text: str) -> list[dict[str, Any]]:
    """`event: NAME\\ndata: JSON\\n\\n`... -> the data objects; each event's name is its data's type."""
    assert text.endswith("\n\n") or not text
    out = []
    for chunk in text.split("\n\n")[:-1]:
        name_line, data_line = chunk.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line[len("data: "):])
        assert data["type"] == name_line[len("event: "):]
        out.append(data)
    return out


def shape(events: list[dict[str, Any]]) -> list[str]:
    """Each event as 'type', 'type:index' or 'type:index:delta type' for order checks."""
    out = []
    for e in events:
        s = e["type"]
        if "index" in e:
            s += f":{e['index']}"
        if e["type"] == "content_block_start":
            s += f":{e['content_block']['type']}"
        if e["type"] == "content_block_delta":
            s += f":{e['delta']['type']}"
        out.append(s)
    return out


# --- the SDK as a client, through a mock transport ----------------------------------------------------------

class Captured:
    """An anthropic client whose requests are kept and answered with `reply` (a dict, or SSE text)."""

    def __init__(self, reply: dict[str, Any] | str) -> None:
        self.reply, self.requests = reply, []

        def handle(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            if isinstance(self.reply, str):
                return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=self.reply.encode())
            return httpx.Response(200, json=self.reply)

        self.client = anthropic.Anthropic(api_key="sk-test", base_url="http://gateway.test", max_retries=0,
                                          http_client=httpx.Client(transport=httpx.MockTransport(handle)))

    @property
    def body(self) -> bytes:
        return self.requests[-1].content


def test_claude_code_request_parses_and_ignores_what_we_do_not_serve() -> None:
    req = parse_messages_request(body())
    assert (req.model, req.max_tokens, req.stream, req.temperature) == ("claude-sonnet-4-5-20250929", 32000, True, 1.0)
    assert [t.name for t in req.tools or ()] == ["Bash", "Read", "mcp__github__get_issue"]
    assert req.stop_sequences == [] and req.max_tokens_request() == (32000, "max_tokens")
    params = req.sampling_params(SamplingDefaults(1.0, 0.95, 40))  # what the body leaves unset: the model's
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (32000, 1.0, 0.95, 40)
    assert tool_choice(req) == ToolChoice("auto", None, True)
    messages = chat_messages(req)
    assert messages == [
        {"role": "system", "content": "You are Claude Code, Anthropic's official CLI for Claude.\nYou are an "
                                      "interactive CLI tool that helps users with software engineering tasks."},
        {"role": "user", "content": "<system-reminder>\nThe date is today.\n</system-reminder>\nwhy does the build "
                                    "fail?"}]
    assert template_tools(req) == [
        {"type": "function", "function": {"name": "Bash", "description": "Executes a given bash command",
                                          "parameters": BASH_SCHEMA}},
        {"type": "function", "function": {"name": "Read", "description": "Reads a file", "parameters": READ_SCHEMA}},
        {"type": "function", "function": {"name": "mcp__github__get_issue",
                                          "parameters": {"type": "object", "properties": {}}}}]


def test_thinking_enabled_sampling_and_stop_sequences_are_read() -> None:
    req = parse_messages_request(body(thinking={"type": "enabled", "budget_tokens": 2048}, temperature=0,
                                      top_p=0.9, top_k=40, stop_sequences=["\n\nHuman:", "END"], stream=False))
    assert req.stop_sequences == ["\n\nHuman:", "END"] and not req.stream
    params = req.sampling_params(SamplingDefaults(1.0, 0.95, 20))
    assert (params.temperature, params.top_p, params.top_k) == (0.0, 0.9, 40)
    raw = b'{"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}'
    minimal = parse_messages_request(raw)
    assert minimal.system is None and minimal.tools is None and not minimal.stream
    assert chat_messages(minimal) == [{"role": "user", "content": "hi"}]
    assert template_tools(minimal) is None and tool_choice(minimal) == ToolChoice("none")


def test_the_sdk_request_parses_and_the_sdk_reads_our_reply() -> None:
    call = ParsedToolCall("Bash", {"command": "make test", "timeout": 60000},
                          '{"command": "make test", "timeout": 60000}')
    reply = message_response(new_message_id(), "qwen3-coder-next", ParsedOutput("Running the tests.", [call]),
                             "tool_use", MessageUsage.from_prompt(120, 30, cached_tokens=64))
    sdk = Captured(reply)
    message = sdk.client.messages.create(
        model="qwen3-coder-next", max_tokens=1024,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "run the tests"}],
        tools=[{"name": "Bash", "description": "Run a command", "input_schema": BASH_SCHEMA}],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        metadata={"user_id": "u1"}, stop_sequences=["STOP"], thinking={"type": "adaptive"},
        output_config={"effort": "medium"}, cache_control={"type": "ephemeral"}, service_tier="auto",
        # sampling fields are gone from recent SDKs' signatures, but older clients send them
        extra_body={"temperature": 0.2, "top_k": 20, "top_p": 0.95, "context_management": {"edits": []}})
    assert sdk.requests[-1].url.path == "/v1/messages"
    req = parse_messages_request(sdk.body)
    assert tool_choice(req) == ToolChoice("auto", None, parallel=False) and req.stop_sequences == ["STOP"]
    assert (req.temperature, req.top_k, req.top_p) == (0.2, 20, 0.95)
    assert chat_messages(req)[0] == {"role": "system", "content": "Be brief."}
    assert isinstance(message, Message) and message.stop_reason == "tool_use"
    text, tool_use = message.content
    assert text.type == "text" and text.text == "Running the tests."
    assert tool_use.type == "tool_use" and tool_use.name == "Bash"
    assert tool_use.input == {"command": "make test", "timeout": 60000} and tool_use.id.startswith("toolu_")
    usage = message.usage
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_input_tokens,
            usage.cache_creation_input_tokens) == (56, 30, 64, 0)


def test_the_sdk_count_tokens_request_parses() -> None:
    sdk = Captured(count_tokens_response(42))
    counted = sdk.client.messages.count_tokens(
        model="qwen3-coder-next", messages=[{"role": "user", "content": "hello"}], system="Be brief.",
        tools=[{"name": "Read", "input_schema": READ_SCHEMA}], tool_choice={"type": "any"},
        extra_body={"thinking": {"type": "adaptive"}})
    assert sdk.requests[-1].url.path == "/v1/messages/count_tokens" and counted.input_tokens == 42
    req = parse_count_tokens_request(sdk.body)
    assert chat_messages(req) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert tool_choice(req) == ToolChoice("required") and len(template_tools(req) or ()) == 1
    assert not hasattr(req, "max_tokens")  # count_tokens has no max_tokens; one sent anyway is ignored
    parse_count_tokens_request(body(max_tokens=..., stream=...))


# --- the conversation as chat-template input ----------------------------------------------------------------

CONVERSATION = [
    {"role": "user", "content": "list the files, then read the README"},
    {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "I should list first.", "signature": "EqQBCkYIBxgCKkA"},
        {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"},
        {"type": "text", "text": "Listing and reading."},
        {"type": "tool_use", "id": "toolu_01A", "name": "Bash", "input": {"command": "ls"}},
        {"type": "tool_use", "id": "toolu_01B", "name": "Read", "input": {"file_path": "README.md", "limit": 20},
         "cache_control": {"type": "ephemeral"}},
    ]},
    {"role": "user", "content": [
        {"type": "text", "text": "(also check the tests)"},
        {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "README.md\nsrc"},
        {"type": "tool_result", "tool_use_id": "toolu_01B", "is_error": True,
         "content": [{"type": "text", "text": "<tool_use_error>File does not exist.</tool_use_error>"}]},
    ]},
    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01C", "name": "Bash",
                                       "input": {"command": "ls tests"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01C",
                                  "content": [{"type": "text", "text": "test_a.py"},
                                              {"type": "text", "text": "test_b.py"}]},
                                 {"type": "tool_result", "tool_use_id": "toolu_01D"}]},
    {"role": "assistant", "content": "There are two tests."},
    {"role": "user", "content": [{"type": "text", "text": "thanks"}]},
]


def test_a_tool_conversation_becomes_openai_style_messages() -> None:
    req = parse_messages_request(body(system="Be brief.", messages=CONVERSATION))
    assert chat_messages(req) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "list the files, then read the README"},
        {"role": "assistant", "content": "Listing and reading.", "tool_calls": [
            {"id": "toolu_01A", "type": "function", "function": {"name": "Bash", "arguments": {"command": "ls"}}},
            {"id": "toolu_01B", "type": "function",
             "function": {"name": "Read", "arguments": {"file_path": "README.md", "limit": 20}}}]},
        {"role": "tool", "tool_call_id": "toolu_01A", "content": "README.md\nsrc"},
        {"role": "tool", "tool_call_id": "toolu_01B",
         "content": "Error: <tool_use_error>File does not exist.</tool_use_error>"},
        {"role": "user", "content": "(also check the tests)"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "toolu_01C", "type": "function",
             "function": {"name": "Bash", "arguments": {"command": "ls tests"}}}]},
        {"role": "tool", "tool_call_id": "toolu_01C", "content": "test_a.py\ntest_b.py"},
        {"role": "tool", "tool_call_id": "toolu_01D", "content": ""},
        {"role": "assistant", "content": "There are two tests."},
        {"role": "user", "content": "thanks"},
    ]


def test_a_trailing_assistant_message_is_kept_for_a_prefill() -> None:
    prefill = [{"role": "user", "content": "Sun in Greek? (A) Sol (B) Helios"},
               {"role": "assistant", "content": "The answer is ("}]
    req = parse_messages_request(body(system=..., messages=prefill))
    assert chat_messages(req)[-1] == {"role": "assistant", "content": "The answer is ("}


@pytest.mark.parametrize("choice, expected", [
    (..., ToolChoice("auto", None, True)),
    ({"type": "auto"}, ToolChoice("auto", None, True)),
    ({"type": "auto", "disable_parallel_tool_use": True}, ToolChoice("auto", None, False)),
    ({"type": "any"}, ToolChoice("required", None, True)),
    ({"type": "any", "disable_parallel_tool_use": True}, ToolChoice("required", None, False)),
    ({"type": "tool", "name": "Read"}, ToolChoice("named", "Read", True)),
    ({"type": "tool", "name": "Read", "disable_parallel_tool_use": True}, ToolChoice("named", "Read", False)),
    ({"type": "none"}, ToolChoice("none", None, True)),
])
def test_tool_choice_mapping(choice: Any, expected: ToolChoice) -> None:
    req = parse_messages_request(body(tool_choice=choice))
    assert tool_choice(req) == expected
    assert template_tools(req) is not None  # 'none' too: the tools are rendered, the output is not parsed


def test_tool_choice_without_tools() -> None:
    assert tool_choice(parse_messages_request(body(tools=..., tool_choice={"type": "auto"}))) == ToolChoice("none")
    assert tool_choice(parse_messages_request(body(tools=[], tool_choice={"type": "none"}))) == ToolChoice("none")
    assert "tool_choice.type" in refusal(body(tools=..., tool_choice={"type": "any"}))


# --- refusals -----------------------------------------------------------------------------------------------

USER_HI = {"role": "user", "content": "hi"}
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}

REFUSED: list[tuple[str, bytes, str]] = [
    ("missing max_tokens", body(max_tokens=...), r"^max_tokens: Field required"),
    ("max_tokens 0", body(max_tokens=0), r"^max_tokens: .*greater than or equal to 1"),
    ("max_tokens a string", body(max_tokens="100"), r"^max_tokens: "),
    ("missing model", body(model=...), r"^model: Field required"),
    ("missing messages", body(messages=...), r"^messages: Field required"),
    ("empty messages", body(messages=[]), r"^messages: .*at least 1"),
    ("a tool role", body(messages=[{"role": "tool", "content": "x"}]), r"^messages\.0\.role: 'tool' is not"),
    ("no role", body(messages=[{"content": "x"}]), r"^messages\.0\.role: Field required"),
    ("no content", body(messages=[USER_HI, {"role": "assistant"}]), r"^messages\.1\.content: Field required"),
    ("content a number", body(messages=[{"role": "user", "content": 5}]), r"^messages\.0\.content: expected a string"),
    ("unknown block type", body(messages=[USER_HI, USER_HI, {"role": "user", "content": [{"type": "audio"}]}]),
     r"^messages\.2\.content\.0\.type: unknown content block type 'audio'"),
    ("no block type", body(messages=[{"role": "user", "content": [{"text": "x"}]}]),
     r"^messages\.0\.content\.0\.type: Field required"),
    ("a text block without text", body(messages=[{"role": "user", "content": [{"type": "text"}]}]),
     r"^messages\.0\.content\.0\.text: Field required"),
    ("tool_use in a user message", body(messages=[{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "Bash", "input": {}}]}]),
     r"^messages\.0\.content\.0\.type: unknown content block type 'tool_use' here; "
     r"expected one of: text, tool_result$"),
    ("tool_use without input", body(messages=[USER_HI, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "Bash"}]}]), r"^messages\.1\.content\.0\.input: Field required"),
    ("an image block", body(messages=[{"role": "user", "content": [{"type": "text", "text": "what is this?"}, IMAGE]}]),
     r"^messages\.0\.content\.1\.type: 'image' content blocks are not supported"),
    ("a document block", body(messages=[{"role": "user", "content": [{"type": "document", "source": {}}]}]),
     r"^messages\.0\.content\.0\.type: 'document' content blocks are not supported"),
    ("an image in a tool result", body(messages=[USER_HI, {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "see"}, IMAGE]}]}]),
     r"^messages\.1\.content\.0\.content\.1\.type: 'image' content blocks are not supported"),
    ("a system block that is not text", body(system=[{"type": "image"}]), r"^system\.0\.type: "),
    ("a server tool", body(tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]),
     r"^tools\.0\.type: tool type 'web_search_20250305' \(a server tool\) is not supported"),
    ("a tool without input_schema", body(tools=[{"name": "Bash"}]), r"^tools\.0\.input_schema: Field required"),
    ("duplicate tool names", body(tools=[{"name": "Bash", "input_schema": {}}, {"name": "Bash", "input_schema": {}}]),
     r"^tools: tool names must be unique: 'Bash' is both tools\.0 and tools\.1"),
    ("a named tool_choice not in tools", body(tool_choice={"type": "tool", "name": "Write"}),
     r"^tool_choice\.name: the tool 'Write' is not among the request's tools \(Bash, Read, mcp__github__get_issue\)"),
    ("a named tool_choice without a name", body(tool_choice={"type": "tool"}), r"^tool_choice\.name: "),
    ("an unknown tool_choice type", body(tool_choice={"type": "required"}), r"^tool_choice\.type: "),
    ("temperature above 1", body(temperature=1.5), r"^temperature: .*less than or equal to 1"),
    ("top_p 0", body(top_p=0), r"^top_p: "),
    ("top_k negative", body(top_k=-1), r"^top_k: "),
    ("stream a string", body(stream="true"), r"^stream: "),
    ("an empty stop sequence", body(stop_sequences=["ok", ""]), r"^stop_sequences\.1: "),
    ("malformed JSON", b'{"model": "m", "max_tokens": 1,', r"^the request body is not valid JSON"),
    ("not UTF-8", b'\xff\xfe{}', r"^the request body is not valid JSON"),
    ("a JSON array", b"[]", r"^the request body must be a JSON object, got list"),
]


@pytest.mark.parametrize("raw, pattern", [(raw, p) for _, raw, p in REFUSED], ids=[name for name, _, _ in REFUSED])
def test_malformed_requests_are_400_naming_the_field(raw: bytes, pattern: str) -> None:
    assert re.search(pattern, refusal(raw))


def test_count_tokens_refusals_name_the_field() -> None:
    assert refusal(body(messages=[]), parse_count_tokens_request).startswith("messages: ")
    assert refusal(body(tool_choice={"type": "tool", "name": "Nope"}),
                   parse_count_tokens_request).startswith("tool_choice.name: ")


@pytest.mark.parametrize("status, kind", [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"),
    (503, "overloaded_error"), (529, "overloaded_error"), (422, "invalid_request_error"), (502, "api_error"),
])
def test_error_bodies_follow_the_status(status: int, kind: str) -> None:
    assert error_body(status, "why") == {"type": "error", "error": {"type": kind, "message": "why"}}
    e = AnthropicError(status, "why")
    assert (e.status, e.message, str(e), e.body) == (status, "why", "why", error_body(status, "why"))
    overridden = AnthropicError(404, "no such model", "invalid_request_error")
    assert overridden.body["error"]["type"] == "invalid_request_error"


# --- the non-streaming reply --------------------------------------------------------------------------------

def test_ids_look_like_anthropics() -> None:
    assert re.fullmatch(r"msg_[0-9A-Za-z]{24}", new_message_id())
    assert re.fullmatch(r"toolu_[0-9A-Za-z]{24}", new_tool_use_id())
    assert new_message_id() != new_message_id()


@pytest.mark.parametrize("parsed, blocks", [
    (ParsedOutput("Hello!", []), ["text"]),
    (ParsedOutput(None, []), []),
    (ParsedOutput(None, [ParsedToolCall("Read", {"file_path": "a"}, '{"file_path": "a"}')]), ["tool_use"]),
    (ParsedOutput("\n\n", [ParsedToolCall("Read", {}, "{}")]), ["tool_use"]),
    (ParsedOutput("Two calls:", [ParsedToolCall("Read", {"file_path": "a"}, "{}"),
                                 ParsedToolCall("Bash", {"command": "ls"}, "{}")]), ["text", "tool_use", "tool_use"]),
])
def test_message_response_validates_as_an_sdk_message(parsed: ParsedOutput, blocks: list[str]) -> None:
    stop = "tool_use" if parsed.tool_calls else "end_turn"
    reply = message_response("msg_abc", "qwen3-coder-next", parsed, stop, MessageUsage(10, 5))
    message = Message.model_validate(reply)
    assert [b.type for b in message.content] == blocks
    assert message.stop_reason == stop and message.stop_sequence is None and message.model == "qwen3-coder-next"
    assert reply["usage"] == {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 0,
                              "cache_read_input_tokens": 0}
    for block, call in zip([b for b in message.content if b.type == "tool_use"], parsed.tool_calls):
        assert block.name == call.name and block.input == call.arguments
    ids = [b.id for b in message.content if b.type == "tool_use"]
    assert len(set(ids)) == len(ids)
    stopped = message_response("msg_abc", "m", parsed, "stop_sequence", MessageUsage(1, 1), stop_sequence="END")
    assert Message.model_validate(stopped).stop_sequence == "END"


@pytest.mark.parametrize("finish, has_calls, stop_sequence, expected", [
    ("stop", False, None, "end_turn"), (FinishReason.STOP, False, None, "end_turn"),
    ("stop", True, None, "tool_use"), ("length", False, None, "max_tokens"), (FinishReason.LENGTH, True, None,
                                                                               "max_tokens"),
    ("stop", False, "END", "stop_sequence"), ("stop", True, "END", "stop_sequence"),
])
def test_stop_reasons(finish: Any, has_calls: bool, stop_sequence: str | None, expected: str) -> None:
    assert stop_reason_for(finish, has_calls, stop_sequence) == expected


def test_an_aborted_request_has_no_stop_reason() -> None:
    with pytest.raises(ValueError, match="abort"):
        stop_reason_for(FinishReason.ABORT, False)


def test_system_messages_claude_code_sends_join_the_system_prompt() -> None:
    req = parse_messages_request(body(system="Be brief.", messages=[
        {"role": "user", "content": "hi"}, {"role": "system", "content": [{"type": "text", "text": "Reminder."}]},
        {"role": "assistant", "content": "hello"}]))
    assert chat_messages(req) == [{"role": "system", "content": "Be brief.\n\nReminder."},
                                  {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_count_tokens_response() -> None:
    assert count_tokens_response(17) == {"input_tokens": 17}


# --- streaming ----------------------------------------------------------------------------------------------

def test_text_then_two_tool_calls_stream_in_anthropics_order() -> None:
    stream = MessagesStream()
    text = stream.start("msg_1", "qwen3-coder-next", 250)
    text += stream.events([TextDelta("Let me "), TextDelta("look.")])
    text += stream.ping()
    text += stream.events([ToolCallStart(0, "Read"), ToolArgumentsDelta(0, '{"file_path": "'),
                           ToolArgumentsDelta(0, 'src/a.py"'), ToolArgumentsDelta(0, ', "limit": 5}')])
    text += stream.events([ToolCallStart(1, "Bash"), ToolArgumentsDelta(1, '{"command": "ls -la"}')])
    text += stream.finish(stop_reason_for("stop", stream.has_tool_calls), None, 42)
    events = parse_sse(text)
    assert shape(events) == [
        "message_start",
        "content_block_start:0:text", "content_block_delta:0:text_delta", "content_block_delta:0:text_delta",
        "ping",
        "content_block_stop:0",
        "content_block_start:1:tool_use", "content_block_delta:1:input_json_delta",
        "content_block_delta:1:input_json_delta", "content_block_delta:1:input_json_delta",
        "content_block_stop:1",
        "content_block_start:2:tool_use", "content_block_delta:2:input_json_delta", "content_block_stop:2",
        "message_delta", "message_stop"]
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["stop_sequence"] is None
    assert start["usage"]["input_tokens"] == 250 and start["usage"]["output_tokens"] == 1
    assert events[1]["content_block"] == {"type": "text", "text": ""}
    assert "".join(e["delta"]["text"] for e in events if e.get("index") == 0 and "delta" in e) == "Let me look."
    blocks = [e["content_block"] for e in events if e["type"] == "content_block_start"][1:]
    assert [(b["name"], b["input"]) for b in blocks] == [("Read", {}), ("Bash", {})]
    assert [b["id"] for b in blocks] == stream.tool_use_ids and len(set(stream.tool_use_ids)) == 2
    for index, expected in ((1, {"file_path": "src/a.py", "limit": 5}), (2, {"command": "ls -la"})):
        partial = "".join(e["delta"]["partial_json"] for e in events
                          if e["type"] == "content_block_delta" and e["index"] == index)
        assert json.loads(partial) == expected
    assert events[-2] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                          "usage": {"output_tokens": 42}}
    for e in events:
        if e["type"] != "ping":
            EVENT.validate_python(e)


def test_the_sdk_assembles_our_stream_into_the_message() -> None:
    stream = MessagesStream()
    text = stream.start("msg_2", "qwen3-coder-next", 9, cache_read_input_tokens=4)
    text += stream.events([TextDelta("Checking. "), ToolCallStart(0, "Bash"), ToolArgumentsDelta(0, '{"command": '),
                           ToolArgumentsDelta(0, '"git status"}')])
    text += stream.finish("tool_use", None, 12)
    sdk = Captured(text)
    with sdk.client.messages.stream(model="qwen3-coder-next", max_tokens=64,
                                    messages=[{"role": "user", "content": "status?"}]) as s:
        message = s.get_final_message()
    assert parse_messages_request(sdk.body).stream
    assert message.id == "msg_2" and message.stop_reason == "tool_use" and message.usage.output_tokens == 12
    assert message.usage.input_tokens == 9 and message.usage.cache_read_input_tokens == 4
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "Checking. " and message.content[1].input == {"command": "git status"}
    assert message.content[1].id == stream.tool_use_ids[0]


def test_whitespace_before_a_tool_call_opens_no_text_block() -> None:
    stream = MessagesStream()
    stream.start("msg_3", "m", 1)
    text = stream.events([TextDelta("\n"), TextDelta(" \n")])
    assert text == ""
    text += stream.events([ToolCallStart(0, "Read"), ToolArgumentsDelta(0, "{}")])
    text += stream.events([TextDelta("\n\n")])  # between calls: held, then dropped
    text += stream.events([ToolCallStart(1, "Read"), ToolArgumentsDelta(1, "{}")])
    text += stream.events([TextDelta("\n")])  # after the last call: dropped at the end
    text += stream.finish("tool_use", None, 3)
    assert shape(parse_sse(text)) == [
        "content_block_start:0:tool_use", "content_block_delta:0:input_json_delta", "content_block_stop:0",
        "content_block_start:1:tool_use", "content_block_delta:1:input_json_delta", "content_block_stop:1",
        "message_delta", "message_stop"]


def test_held_whitespace_joins_the_text_that_follows() -> None:
    stream = MessagesStream()
    stream.start("msg_4", "m", 1)
    text = stream.events([TextDelta("\n  "), TextDelta("x"), TextDelta(" ")])
    text += stream.finish("end_turn", None, 2)
    events = parse_sse(text)
    assert shape(events) == ["content_block_start:0:text", "content_block_delta:0:text_delta",
                             "content_block_delta:0:text_delta", "content_block_stop:0", "message_delta",
                             "message_stop"]
    assert [e["delta"]["text"] for e in events[1:3]] == ["\n  x", " "]


def test_text_after_a_tool_call_opens_a_new_block() -> None:
    stream = MessagesStream()
    stream.start("msg_5", "m", 1)
    text = stream.events([ToolCallStart(0, "Read"), ToolArgumentsDelta(0, "{}"), TextDelta("\n"), TextDelta("done")])
    text += stream.finish("end_turn", None, 2)
    events = parse_sse(text)
    assert shape(events) == ["content_block_start:0:tool_use", "content_block_delta:0:input_json_delta",
                             "content_block_stop:0", "content_block_start:1:text",
                             "content_block_delta:1:text_delta", "content_block_stop:1", "message_delta",
                             "message_stop"]
    assert events[4]["delta"]["text"] == "\ndone"


def test_a_whitespace_only_reply_is_still_sent_and_an_empty_one_has_no_block() -> None:
    stream = MessagesStream()
    stream.start("msg_6", "m", 1)
    text = stream.events([TextDelta(" \n")]) + stream.finish("end_turn", None, 1)
    assert shape(parse_sse(text))[:3] == ["content_block_start:0:text", "content_block_delta:0:text_delta",
                                          "content_block_stop:0"]
    empty = MessagesStream()
    empty.start("msg_7", "m", 1)
    assert shape(parse_sse(empty.finish("max_tokens", None, 0))) == ["message_delta", "message_stop"]


def test_stream_error_ping_and_misuse() -> None:
    stream = MessagesStream()
    with pytest.raises(RuntimeError, match="start"):
        stream.events([TextDelta("x")])
    stream.start("msg_8", "m", 1)
    with pytest.raises(RuntimeError, match="already"):
        stream.start("msg_8", "m", 1)
    assert stream.ping() == 'event: ping\ndata: {"type": "ping"}\n\n'
    with pytest.raises(ValueError, match="tool call 3"):
        stream.events([ToolArgumentsDelta(3, "{}")])
    stream.events([TextDelta("partial")])
    assert parse_sse(stream.error(529, "the engine is overloaded")) == [
        {"type": "error", "error": {"type": "overloaded_error", "message": "the engine is overloaded"}}]
    with pytest.raises(RuntimeError, match="ended"):
        stream.finish("end_turn", None, 1)


def test_the_real_parser_streamed_and_whole_give_the_same_message() -> None:
    """Model output -> ToolCallParser chunk by chunk -> MessagesStream -> the SDK's assembled message equals
    message_response of parse_tool_calls on the whole output (ids aside)."""
    req = parse_messages_request(body(stream=True))
    tools = tool_schemas(template_tools(req) or [])
    output = ("I'll check the file.\n\n<tool_call>\n<function=Read>\n<parameter=file_path>\nsrc/main.py\n"
              "</parameter>\n<parameter=limit>\n40\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n"
              "<function=Bash>\n<parameter=command>\ngrep -n \"def \" src/main.py\n</parameter>\n</function>\n"
              "</tool_call>")
    parser, stream = ToolCallParser(tools), MessagesStream()
    text = stream.start("msg_9", "qwen3-coder-next", 300)
    for i in range(0, len(output), 7):
        text += stream.events(parser.feed(output[i:i + 7]))
    text += stream.events(parser.finish())
    text += stream.finish(stop_reason_for("stop", stream.has_tool_calls), None, 60)
    sdk = Captured(text)
    with sdk.client.messages.stream(model="qwen3-coder-next", max_tokens=64,
                                    messages=[{"role": "user", "content": "go"}]) as s:
        streamed = s.get_final_message()
    parsed = parse_tool_calls(output, tools)
    whole = Message.model_validate(message_response("msg_9", "qwen3-coder-next", parsed,
                                                    stop_reason_for("stop", bool(parsed.tool_calls)),
                                                    MessageUsage(300, 60)))

    def without_ids(m: Message) -> list[dict[str, Any]]:
        return [{k: v for k, v in b.model_dump(exclude_none=True).items() if k != "id"} for b in m.content]

    assert without_ids(streamed) == without_ids(whole)
    assert [b.type for b in whole.content] == ["text", "tool_use", "tool_use"]
    # the parser's own values are its tests' business; here: the calls are carried over as parsed
    assert [(b.name, b.input) for b in whole.content[1:]] == [(c.name, c.arguments) for c in parsed.tool_calls]
    assert [b.name for b in streamed.content[1:]] == ["Read", "Bash"]
    assert streamed.stop_reason == whole.stop_reason == "tool_use"
