"""The Responses API translator (cluster/gateway/protocols/responses.py) without a server: what Codex and the
openai SDK send parses into the one conversation model, refusals are 400s naming the field, and the one
event stream renders as the documented SSE event sequence with sequence numbers."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from nextserve.cluster.engine.contract import EngineError, ErrorCode, FinishReason, SamplingDefaults
from nextserve.cluster.gateway.chat_template import ToolChoice
from nextserve.cluster.gateway.conversation import ResponseFormat
from nextserve.cluster.gateway.events import (ChoiceResult, ChoiceUpdate, Completed, Event, Finish, Started,
                                              TextDelta, TokenUsage, ToolArgumentsDelta, ToolCallStart)
from nextserve.cluster.gateway.protocols.openai import RequestError
from nextserve.cluster.gateway.protocols.responses import (ResponseReply, conversation, generation_spec,
                                                           parse_responses_request)
from nextserve.cluster.gateway.tool_calls import ParsedOutput, parse_tool_calls

SCHEMA = {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}
EXEC = {"type": "function", "name": "exec_command", "description": "Run a command.", "strict": False,
        "parameters": SCHEMA}
CLOSE = {"type": "function", "name": "close_agent", "description": "Close an agent.", "strict": False,
         "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}


def parse(**body: Any) -> Any:
    return parse_responses_request(json.dumps({"model": "tiny", **body}).encode())


def codex_body() -> dict[str, Any]:
    """A second Codex turn as Codex 0.171 sends it (shapes recorded from `codex exec` against a stub)."""
    return {
        "model": "tiny", "stream": True, "store": False, "tool_choice": "auto", "parallel_tool_calls": True,
        "reasoning": {"summary": "auto"}, "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "01a24651-57c1-7611-98d4-b3052965e6b8",
        "client_metadata": {"session_id": "01a24651", "x-codex-window-id": "01a24651:0"},
        "input": [
            {"type": "message", "id": "msg_1", "role": "developer",
             "content": [{"type": "input_text", "text": "You are Codex."}]},
            {"type": "message", "id": "msg_2", "role": "developer",
             "content": [{"type": "input_text", "text": "<skills_instructions>none</skills_instructions>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<env>cwd</env>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List the files."}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Listing."}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "exec_command",
             "arguments": "{\"cmd\": \"ls\"}"},
            {"type": "function_call", "call_id": "call_2", "name": "close_agent", "namespace": "multi_agent_v1",
             "arguments": "{\"id\": \"a1\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "README.md\n"},
            {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "ok"}]},
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<update/>"}]},
        ],
        "tools": [EXEC, {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.",
                         "tools": [CLOSE]},
                  {"type": "web_search", "external_web_access": False}],
    }


def test_a_codex_turn_becomes_the_chat_the_template_reads() -> None:
    req = parse_responses_request(json.dumps(codex_body()).encode())
    spec = generation_spec(req, SamplingDefaults())
    assert spec.prompt_cache_key == "01a24651-57c1-7611-98d4-b3052965e6b8" and spec.n == 1
    assert spec.request_field("prompt") == "input" and spec.request_field("max_tokens") == "max_output_tokens"
    conv = spec.prompt
    assert list(conv.messages) == [
        {"role": "system", "content": "You are Codex.\n\n<skills_instructions>none</skills_instructions>"},
        {"role": "user", "content": "<env>cwd</env>"},
        {"role": "user", "content": "List the files."},
        {"role": "assistant", "content": "Listing.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "exec_command", "arguments": {"cmd": "ls"}}},
            {"id": "call_2", "type": "function", "function": {"name": "close_agent", "arguments": {"id": "a1"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "README.md\n"},
        {"role": "tool", "tool_call_id": "call_2", "content": "ok"},
        {"role": "developer", "content": "<update/>"},  # a later one stays in place: the prefix never changes
    ]
    # the namespace's function is flattened, web_search is left out of the prompt
    assert [t["function"]["name"] for t in conv.tools] == ["exec_command", "close_agent"]
    assert conv.tools[1]["function"]["parameters"] == CLOSE["parameters"]
    assert conv.tool_choice == ToolChoice("auto", None, True)


def test_instructions_string_input_and_a_call_without_text_before_it() -> None:
    conv = conversation(parse(instructions="Be brief.", input="hi"))
    assert list(conv.messages) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert conv.tools == () and conv.tool_choice == ToolChoice("none")
    conv = conversation(parse(input=[{"role": "user", "content": "go"},
                                     {"type": "function_call", "call_id": "c", "name": "exec_command",
                                      "arguments": ""}], tools=[EXEC]))
    assert conv.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "exec_command", "arguments": {}}}]}


def test_namespace_functions_sharing_a_name_are_qualified_and_mapped_back() -> None:
    other = {"type": "namespace", "name": "ns2", "tools": [CLOSE]}
    req = parse(input="x", tools=[{"type": "namespace", "name": "ns1", "tools": [CLOSE]}, other, EXEC],
                tool_choice={"type": "function", "name": "exec_command"})
    names = ResponseReply.of("tiny", req, generation_spec(req, SamplingDefaults()), 0).names
    assert [t["function"]["name"] for t in names.tools] == ["ns1.close_agent", "ns2.close_agent", "exec_command"]
    assert names.output_name("ns2.close_agent") == ("close_agent", "ns2")
    assert names.output_name("exec_command") == ("exec_command", None)
    assert conversation(req).tool_choice == ToolChoice("named", "exec_command", True)
    with pytest.raises(RequestError, match="among several namespaces"):
        parse(input="x", tools=[{"type": "namespace", "name": "ns1", "tools": [CLOSE]}, other],
              tool_choice={"type": "function", "name": "close_agent"})
    only = parse(input="x", tools=[{"type": "namespace", "name": "ns1", "tools": [CLOSE]}],
                 tool_choice={"type": "function", "name": "close_agent"}, parallel_tool_calls=False)
    assert conversation(only).tool_choice == ToolChoice("named", "close_agent", False)


@pytest.mark.parametrize("fmt, expected", [
    (None, ResponseFormat()), ({"type": "text"}, ResponseFormat()),
    ({"type": "json_object"}, ResponseFormat("json_object")),
    ({"type": "json_schema", "name": "cmd", "schema": SCHEMA, "strict": True},
     ResponseFormat("json_schema", SCHEMA, "cmd", True)),
])
def test_text_format_parses_into_the_response_format(fmt: Any, expected: ResponseFormat) -> None:
    text = {"format": fmt, "verbosity": "low"} if fmt is not None else None
    assert generation_spec(parse(input="x", text=text), SamplingDefaults()).response_format == expected


def test_sampling_fields_and_defaults() -> None:
    defaults = SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20)
    params = generation_spec(parse(input="x"), defaults).params
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (None, 0.7, 0.8, 20)
    params = generation_spec(parse(input="x", max_output_tokens=5, temperature=0, top_p=0.5, top_k=-1, seed=3),
                             defaults).params
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed) == (5, 0, 0.5, 0, 3)


@pytest.mark.parametrize("body, param, pattern", [
    ({"input": []}, "input", "at least 1"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type", "text-only model"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role", "user"),
    ({"input": [{"type": "computer_call_output", "call_id": "c"}]}, "input[0].type", "computer_call_output"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "stores none"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{nope"}]},
     "input[0].arguments", "not valid JSON"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]},
     "input[0].arguments", "JSON object"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id", "Missing"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id", "store: false"),
    ({"input": "x", "conversation": "conv_1"}, "conversation", "stores no responses"),
    ({"input": "x", "background": True}, "background", "stores none"),
    ({"input": "x", "truncation": "auto"}, "truncation", "never drops input"),
    ({"input": "x", "top_logprobs": 3}, "top_logprobs", "chat/completions"),
    ({"input": "x", "tools": [{"type": "custom", "name": "apply_patch"}]}, "tools[0].type", "function tool"),
    ({"input": "x", "tools": [{"type": "function", "name": "a>b"}]}, "tools[0].name", "pattern"),
    ({"input": "x", "tools": [EXEC, EXEC]}, "tools", "appears twice"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice", "needs function tools"),
    ({"input": "x", "tools": [{"type": "web_search"}], "tool_choice": "required"}, "tool_choice", "needs function"),
    ({"input": "x", "tools": [EXEC], "tool_choice": {"type": "function", "name": "rm"}}, "tool_choice",
     "not among the function tools"),
    ({"input": "x", "tool_choice": {"type": "web_search_preview"}}, "tool_choice", "not supported"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format", "needs its 'schema'"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
    ({"input": "x", "temperature": "0"}, "temperature", "valid number"),
    ({}, "input", "Missing"),
])
def test_refusals_are_400s_naming_the_field(body: dict[str, Any], param: str, pattern: str) -> None:
    with pytest.raises(RequestError) as e:
        parse(**body)
    assert e.value.status_code == 400 and e.value.param == param, e.value.message
    assert re.search(pattern, e.value.message), e.value.message
    assert e.value.body()["error"]["param"] == param


def test_bodies_that_are_not_json_objects_are_400s() -> None:
    for raw in (b"{", b"[]", b'"x"'):
        with pytest.raises(RequestError) as e:
            parse_responses_request(raw)
        assert e.value.status_code == 400


# --- out ----------------------------------------------------------------------------------------------------

CALL_TEXT = "<tool_call>\n<function=exec_command>\n<parameter=cmd>\nls\n</parameter>\n</function>\n</tool_call>"


def reply(**body: Any) -> ResponseReply:
    req = parse(**{"input": "x", "tools": [EXEC], **body})
    return ResponseReply.of("tiny", req, generation_spec(req, SamplingDefaults()), 123)


def result(text: str, reason: FinishReason = FinishReason.STOP) -> ChoiceResult:
    parsed = parse_tool_calls(text, {"exec_command": SCHEMA})
    return ChoiceResult(0, text, parsed, (), Finish(reason, bool(parsed.tool_calls), None, 9))


def test_the_body_has_a_message_then_a_function_call_and_validates_as_an_sdk_response() -> None:
    out = reply(instructions="I", max_output_tokens=50)
    body = out.body(Completed((result("Let me look.\n" + CALL_TEXT),), TokenUsage(30, 9, 16)))
    assert [i["type"] for i in body["output"]] == ["message", "function_call"]
    assert body["output"][0]["content"][0]["text"] == "Let me look.\n"
    call = body["output"][1]
    assert call["name"] == "exec_command" and json.loads(call["arguments"]) == {"cmd": "ls"}
    assert call["call_id"].startswith("call_") and call["id"].startswith("fc_") and "namespace" not in call
    assert body["usage"] == {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 16, "cache_write_tokens": 0},
                             "output_tokens": 9,
                             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 39}
    assert (body["status"], body["store"], body["instructions"], body["max_output_tokens"]) == \
        ("completed", False, "I", 50)
    sdk = Response.model_validate(body)
    assert sdk.output_text == "Let me look.\n" and sdk.id == out.response_id and sdk.id.startswith("resp_")


def test_whitespace_before_a_call_is_no_message_and_length_is_incomplete() -> None:
    body = reply().body(Completed((result("\n" + CALL_TEXT),), TokenUsage(3, 9)))
    assert [i["type"] for i in body["output"]] == ["function_call"]
    cut = reply().body(Completed((result("Let me", FinishReason.LENGTH),), TokenUsage(3, 9)))
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut["output"][0]["status"] == "incomplete"
    with pytest.raises(RequestError) as e:
        reply().body(Completed((result("x", FinishReason.ABORT),), TokenUsage(3, 1)))
    assert e.value.status_code == 503


SDK_EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def _sse(out: ResponseReply, events: list[Event | Exception]) -> list[dict[str, Any]]:
    async def source() -> AsyncIterator[Event]:
        for e in events:
            if isinstance(e, Exception):
                raise e
            yield e

    async def collect() -> list[str]:
        return [chunk async for chunk in out.sse(source())]

    text = "".join(asyncio.run(collect()))
    frames = [f for f in text.split("\n\n") if f]
    parsed = []
    for frame in frames:
        name, data = frame.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert name == f"event: {payload['type']}"
        SDK_EVENT.validate_python(payload)  # every event validates as the openai SDK's own type
        parsed.append(payload)
    return parsed


def _update(*events: Any, finish: Finish | None = None, first: bool = False) -> ChoiceUpdate:
    return ChoiceUpdate(0, tuple(events), (), 0, first, finish)


def test_text_then_a_call_stream_in_the_documented_order() -> None:
    finish = Finish(FinishReason.STOP, True, None, 9)
    events: list[Event | Exception] = [
        Started(30, 16, 1), _update(TextDelta(" "), first=True), _update(TextDelta("\n"), TextDelta("Let me")),
        _update(TextDelta(" look."), ToolCallStart(0, "exec_command"), ToolArgumentsDelta(0, '{"cmd": "'),
                ToolArgumentsDelta(0, 'ls"}')),
        _update(finish=finish), Completed((result("x"),), TokenUsage(30, 9, 16))]
    frames = _sse(reply(), events)
    assert [f["sequence_number"] for f in frames] == list(range(len(frames)))
    assert [f["type"] for f in frames] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    text = "".join(f["delta"] for f in frames if f["type"] == "response.output_text.delta")
    assert text == " \nLet me look." == frames[6]["text"]  # held whitespace joins the text after it
    assert frames[0]["response"]["status"] == "in_progress" and frames[0]["response"]["output"] == []
    args = "".join(f["delta"] for f in frames if f["type"] == "response.function_call_arguments.delta")
    assert args == '{"cmd": "ls"}' == frames[12]["arguments"] and frames[12]["name"] == "exec_command"
    assert [f["output_index"] for f in frames[2:14]] == [0] * 7 + [1] * 5
    final = Response.model_validate(frames[-1]["response"])
    assert final.status == "completed" and final.output_text == " \nLet me look."
    assert [o.type for o in final.output] == ["message", "function_call"]
    assert final.output[1].arguments == '{"cmd": "ls"}' and final.usage and final.usage.total_tokens == 39
    assert frames[13]["item"] == frames[-1]["response"]["output"][1]


def test_whitespace_before_a_call_opens_no_message_and_length_ends_incomplete() -> None:
    cut = Finish(FinishReason.LENGTH, False, None, 4)
    frames = _sse(reply(), [Started(3, 0, 1), _update(TextDelta("\n\n"), ToolCallStart(0, "exec_command"),
                                                      ToolArgumentsDelta(0, "{"), first=True),
                            _update(finish=cut), Completed((result("x"),), TokenUsage(3, 4))])
    assert [f["type"] for f in frames][2:] == [
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.incomplete"]
    assert frames[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_a_failure_after_the_stream_began_is_response_failed() -> None:
    error = EngineError("the experts are unavailable", code=ErrorCode.UNAVAILABLE)
    frames = _sse(reply(), [Started(3, 0, 1), _update(TextDelta("Hi"), first=True), error])
    assert [f["type"] for f in frames][-1] == "response.failed"
    failed = frames[-1]["response"]
    assert failed["status"] == "failed" and failed["error"] == {
        "code": "server_error", "type": "service_unavailable", "message": "the experts are unavailable", "param": None}
    assert failed["output"][0]["content"] == [] and failed["output"][0]["status"] == "in_progress"
    limited = _sse(reply(), [Started(3, 0, 1), EngineError("over your limit", code=ErrorCode.RATE_LIMITED)])
    assert limited[-1]["response"]["error"]["code"] == "rate_limit_exceeded"
    aborted = _sse(reply(), [Started(3, 0, 1), _update(TextDelta("Hi"), first=True,
                                                       finish=Finish(FinishReason.ABORT, False, None, 1))])
    assert aborted[-1]["type"] == "response.failed" and "retry" in aborted[-1]["response"]["error"]["message"]
    crashed = _sse(reply(), [Started(3, 0, 1), RuntimeError("/work/secret path")])
    assert crashed[-1]["type"] == "response.failed" and "/work" not in json.dumps(crashed)


def test_the_parsed_output_keeps_whole_replies_as_text() -> None:
    """A reply with no tools parsed (tool_choice none) is its text as one message."""
    out = reply(tool_choice="none")
    plain = ChoiceResult(0, CALL_TEXT, None, (), Finish(FinishReason.STOP, False, None, 3))
    assert out.body(Completed((plain,), TokenUsage(1, 3)))["output"][0]["content"][0]["text"] == CALL_TEXT
    assert ParsedOutput(None, []).content is None
