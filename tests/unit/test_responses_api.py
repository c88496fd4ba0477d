"""`POST /v1/responses` through the real gateway in this process, with the official openai SDK: on the shared
tiny gateway (random weights: shapes, streams, errors, what Codex sends) and on the agent checkpoint (a model
that calls tools: function tools, a forced call, a replayed history with store false, namespace tools)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from agent_checkpoint import (  # noqa: F401  (agent_checkpoint_dir is the session fixture)
    AGENT_TURNS, ROME_QUESTION, SYSTEM, TOOLS, WEATHER_QUESTION, WEATHER_RESULT, agent_checkpoint_dir)
from gateway_local_engine import Server, TinyEngine

MODEL = "tiny"
AGENT_CONTEXT = 4096
"""The agent checkpoint's gateway: room for its ~1,000-token tool prompts."""
TURNS = {t.name: t for t in AGENT_TURNS}
RESPONSES_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]
"""The agent checkpoint's tools in the Responses shape (name, description, parameters at the top level)."""
PARIS = {"city": "Paris", "days": 3, "metric": True}
ROME = {"city": "Rome", "days": 7, "metric": True}
CODEX_EXTRAS: dict[str, Any] = {
    "store": False, "prompt_cache_key": "01a24651-57c1-7611-98d4-b3052965e6b8",
    "client_metadata": {"session_id": "01a24651", "x-codex-window-id": "01a24651:0"},
    "include": ["reasoning.encrypted_content"], "reasoning": {"summary": "auto"}}
"""What Codex adds to every request beyond the conversation (recorded from codex exec 0.171)."""


@pytest.fixture(scope="module")
def oai(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def agent(agent_checkpoint_dir: Path) -> Iterator[openai.OpenAI]:
    with Server(TinyEngine(agent_checkpoint_dir, AGENT_CONTEXT), MODEL) as s:
        yield openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)


def _streamed(client: openai.OpenAI, **request: Any) -> tuple[list[Any], Any]:
    """(every event, the response the last one carries); the SDK's stream helper checks that each delta has
    its item and part (its get_final_response() takes response.completed only, not response.incomplete)."""
    with client.responses.stream(**request) as stream:
        events = list(stream)
    if events[-1].type == "response.completed":
        assert stream.get_final_response().output_text == events[-1].response.output_text
    return events, events[-1].response


def test_plain_text_equals_chat_completions_and_the_stream_adds_up_to_it(oai: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "write a loop"}]
    chat = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    request = dict(model=MODEL, instructions="be brief", input="write a loop", max_output_tokens=8, temperature=0)
    plain = oai.responses.create(**request)
    assert plain.output_text == chat.choices[0].message.content
    assert plain.usage and chat.usage and plain.usage.input_tokens == chat.usage.prompt_tokens
    assert plain.usage.output_tokens == chat.usage.completion_tokens
    assert plain.status == {"length": "incomplete", "stop": "completed"}[chat.choices[0].finish_reason]
    assert plain.id.startswith("resp_") and plain.model == MODEL and plain.store is False
    events, final = _streamed(oai, **request)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type == f"response.{plain.status}" and final.status == plain.status
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == plain.output_text
    if plain.status == "incomplete":
        assert final.incomplete_details and final.incomplete_details.reason == "max_output_tokens"


def test_max_output_tokens_ends_incomplete_with_its_event_sequence(oai: openai.OpenAI) -> None:
    events, final = _streamed(oai, model=MODEL, input="hello", max_output_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert final.status == "incomplete" and final.usage and final.usage.output_tokens == 3
    assert final.usage.input_tokens_details.cached_tokens >= 0


def test_errors_are_openai_shaped_400s_naming_the_field(oai: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model=MODEL, input="x", previous_response_id="resp_123")
    assert isinstance(e.value.body, dict) and e.value.body["param"] == "previous_response_id"
    assert "store: false" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="gpt-5", input="x")
    r = http.post("/v1/responses", json={"model": MODEL, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:,"}]}]}, headers={"x-request-id": "codex-turn-1"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "codex-turn-1"
    assert r.json()["error"]["param"] == "input[0].content[0].type" and set(r.json()["error"]) == {
        "message", "type", "param", "code"}
    r = http.post("/v1/responses", json={"model": MODEL, "input": "x" * 600})  # past the 128-token context
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "input"
    assert http.get("/v1/responses/resp_123").status_code == 404  # nothing is stored to retrieve


# --- on the agent checkpoint: a model that calls tools ---------------------------------------------------


def _calls(response: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(o.name, json.loads(o.arguments)) for o in response.output if o.type == "function_call"]


def test_a_codex_style_request_is_served(agent: openai.OpenAI) -> None:
    """Message items with developer / user roles and input_text parts, a reasoning item, a web_search tool the
    server cannot run, a namespace tool, and Codex's extra fields: accepted, served (stateless)."""
    oai = agent
    items = [{"type": "message", "id": "msg_a", "role": "developer",
              "content": [{"type": "input_text", "text": "You are a coding agent."}]},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello."}]},
             {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"}]
    tools = [*RESPONSES_TOOLS[:1], {"type": "web_search", "external_web_access": False},
             {"type": "namespace", "name": "agents", "description": "Sub-agents.", "tools": RESPONSES_TOOLS[1:]}]
    r = oai.responses.create(model=MODEL, input=items, tools=tools, tool_choice="auto", parallel_tool_calls=True,
                             max_output_tokens=4, temperature=0, extra_body=CODEX_EXTRAS)
    assert r.status in ("completed", "incomplete") and r.store is False and r.usage and r.usage.output_tokens <= 4
    events, final = _streamed(oai, model=MODEL, input=items, tools=tools, max_output_tokens=4, temperature=0,
                              extra_body=CODEX_EXTRAS)
    assert final.output_text == r.output_text and events[-1].sequence_number == len(events) - 1


WEATHER_REQUEST: dict[str, Any] = dict(model=MODEL, instructions=SYSTEM["content"], input=[WEATHER_QUESTION],
                                       tools=RESPONSES_TOOLS, temperature=0)
"""Codex's first turn on the agent checkpoint: the Paris question with the function tools."""


@pytest.fixture(scope="module")
def weather_call(agent: openai.OpenAI) -> Any:
    """WEATHER_REQUEST's response (greedy: one request serves the tests that read it)."""
    return agent.responses.create(**WEATHER_REQUEST)


def test_function_tools_give_a_message_then_a_function_call_item(agent: openai.OpenAI, weather_call: Any) -> None:
    request, r = WEATHER_REQUEST, weather_call
    assert [o.type for o in r.output] == ["message", "function_call"] and r.status == "completed"
    assert r.output_text == TURNS["weather_call"].content.split("<tool_call>")[0] == "Let me check.\n"
    assert _calls(r) == [("get_weather", PARIS)] and r.output[1].call_id.startswith("call_")
    events, final = _streamed(agent, **request)
    assert _calls(final) == [("get_weather", PARIS)] and final.output_text == "Let me check.\n"
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(arguments) == PARIS
    assert [e.type for e in events if e.type.startswith("response.output_item")] == [
        "response.output_item.added", "response.output_item.done"] * 2


def test_a_forced_call_is_a_function_call_item(agent: openai.OpenAI) -> None:
    rome = dict(model=MODEL, instructions=SYSTEM["content"], input=[ROME_QUESTION], tools=RESPONSES_TOOLS,
                temperature=0)
    assert agent.responses.create(**rome).output_text == TURNS["rome_without_tool"].content  # unforced: no call
    for choice in ({"type": "function", "name": "get_weather"}, "required"):
        r = agent.responses.create(**rome, tool_choice=choice)
        assert [o.type for o in r.output] == ["function_call"] and _calls(r) == [("get_weather", ROME)], choice
        _, final = _streamed(agent, **rome, tool_choice=choice)
        assert _calls(final) == [("get_weather", ROME)], choice
    none = agent.responses.create(**{**rome, "input": [WEATHER_QUESTION]}, tool_choice="none")
    assert none.output_text == TURNS["weather_call"].content and not _calls(none)  # markup left as text


def test_a_replayed_codex_history_with_store_false_is_served(agent: openai.OpenAI, weather_call: Any) -> None:
    """Codex's second turn: the whole history again (developer message, the call it got, the call's output,
    a reasoning item), store false, its extra fields; the model answers from the tool's result."""
    call = next(o for o in weather_call.output if o.type == "function_call")
    history = [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": SYSTEM["content"]}]},
               {"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": WEATHER_QUESTION["content"]}]},
               {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
               {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
               {"type": "function_call", "id": call.id, "call_id": call.call_id, "name": call.name,
                "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": WEATHER_RESULT}]
    tools = [*RESPONSES_TOOLS, {"type": "web_search", "external_web_access": False}]
    answer = agent.responses.create(model=MODEL, input=history, tools=tools, temperature=0, extra_body=CODEX_EXTRAS)
    assert answer.status == "completed" and not _calls(answer)
    assert answer.output_text == TURNS["after_tool_result"].content
    assert answer.usage and answer.usage.input_tokens_details.cached_tokens > 0  # the first turn's prefix
    _, streamed = _streamed(agent, model=MODEL, input=history, tools=tools, temperature=0, extra_body=CODEX_EXTRAS)
    assert streamed.output_text == answer.output_text


def test_a_namespace_function_is_flattened_and_called_with_its_namespace(agent: openai.OpenAI) -> None:
    """The model sees get_weather among the tools whichever group it came in; the call names its namespace."""
    tools = [{"type": "namespace", "name": "weather", "description": "Forecasts.", "tools": RESPONSES_TOOLS[:1]},
             *RESPONSES_TOOLS[1:]]
    r = agent.responses.create(model=MODEL, instructions=SYSTEM["content"], input=[WEATHER_QUESTION], tools=tools,
                               temperature=0)
    call = next(o for o in r.output if o.type == "function_call")
    assert (call.name, call.namespace, json.loads(call.arguments)) == ("get_weather", "weather", PARIS)
