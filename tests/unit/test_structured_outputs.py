"""Structured outputs and forced tool calls through the official openai SDK (and Anthropic's tool_choice)
against the in-process gateway on the tiny random-weight checkpoint: every answer validates against its
schema (jsonschema), a schema feature the server cannot enforce is a 400 naming it, a constrained output
cut by max_tokens is finish_reason "length"."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from gateway_local_engine import Server, TinyEngine
from nextserve.cluster.engine.contract import Grammar, GrammarKind, SamplingDefaults
from nextserve.cluster.gateway.chat_template import ChatPrompt, ToolChoice
from nextserve.cluster.gateway.conversation import ResponseFormat
from nextserve.cluster.gateway.output_grammar import output_grammar
from nextserve.cluster.gateway.protocols import openai as openai_api
from openai_replies import tool_calls

CONTEXT = 2048
"""Room for the tools' system prompt (~400 tokens on the tiny tokenizer) and a JSON answer."""

PERSON = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "role", "tags", "address", "nickname"],
          "properties": {
              "name": {"type": "string", "maxLength": 8},
              "age": {"type": "integer", "minimum": 0, "maximum": 120},
              "role": {"enum": ["admin", "user", "guest"]},
              "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
              "address": {"type": "object", "required": ["city", "zip"],
                          "properties": {"city": {"type": "string", "maxLength": 10},
                                         "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}}},
              "nickname": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "null"}]}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "required": ["city", "days"], "properties": {
        "city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "maxItems": 3}}}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "required": ["query", "limit"], "properties": {
        "query": {"type": "string", "maxLength": 20}, "limit": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 5},
                                                         {"type": "null"}]},
        "filters": {"type": "object", "properties": {"lang": {"enum": ["en", "fr"]}}, "required": ["lang"]}}}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, SEARCH)}


@pytest.fixture(scope="module")
def gateway(tiny_dir: Path) -> Iterator[Server]:
    with Server(TinyEngine(tiny_dir, CONTEXT), "tiny") as s:
        yield s


@pytest.fixture(scope="module")
def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)


def schema_format(schema: dict[str, Any], name: str = "answer") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _chat_json_schema(client: openai.OpenAI, seed: int | None) -> Any:
    extra = {} if seed is None else {"seed": seed, "temperature": 1.0}
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": f"Describe a person as JSON ({seed})."}],
        response_format=schema_format(PERSON), max_tokens=300, **extra)  # type: ignore[arg-type]


def _streamed_json_schema(client: openai.OpenAI, _: None) -> list[Any]:
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "A person, streamed."}],
        response_format=schema_format(PERSON), max_tokens=300, stream=True)  # type: ignore[arg-type]
    return list(stream)


def _completions_json_schema(client: openai.OpenAI, _: None) -> Any:
    return client.completions.create(model="tiny", prompt="A person:", max_tokens=300, n=2, seed=3, temperature=1.0,
                                     extra_body={"response_format": schema_format(PERSON)})


def _completions_json_object(client: openai.OpenAI, _: None) -> Any:
    return client.completions.create(model="tiny", prompt="Some JSON:", max_tokens=120, n=6, seed=1,
                                     temperature=1.0, extra_body={"response_format": {"type": "json_object"}})


def _tool_choice_required(client: openai.OpenAI, seed: int | None) -> Any:
    """Greedy: one call (parallel_tool_calls false). Seeded: parallel calls allowed."""
    extra = {"parallel_tool_calls": False} if seed is None else {"seed": seed, "temperature": 1.0}
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, SEARCH],
        tool_choice="required", max_tokens=400, **extra)  # type: ignore[arg-type]


def _named_tool_choice(client: openai.OpenAI, name: str) -> Any:
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Use the tool."}], tools=[WEATHER, SEARCH],
        tool_choice={"type": "function", "function": {"name": name}}, parallel_tool_calls=False, seed=11,
        temperature=1.0, max_tokens=400)


def _anthropic_tool_choice_any(client: openai.OpenAI, _: None) -> Any:
    tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in (WEATHER, SEARCH)]
    body = {"model": "tiny", "max_tokens": 400, "messages": [{"role": "user", "content": "Go."}], "tools": tools,
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}
    return httpx.post(f"{client.base_url}messages", json=body, timeout=120).json()


Request = tuple[Callable[[openai.OpenAI, Any], Any], Any]
"""(a function sending one request with the module's client, its argument)."""
GENERATING: list[Request] = [
    (_chat_json_schema, None), (_chat_json_schema, 1), (_streamed_json_schema, None),
    (_completions_json_schema, None), (_completions_json_object, None), (_tool_choice_required, None),
    (_tool_choice_required, 7), (_named_tool_choice, "get_weather"), (_named_tool_choice, "search"),
    (_anthropic_tool_choice_any, None)]
"""Every request of this module that decodes a constrained answer of up to hundreds of tokens."""


@pytest.fixture(scope="module")
def answers(client: openai.OpenAI) -> Iterator[dict[Request, Future[Any]]]:
    """GENERATING's requests, all sent at once when the module starts: the engine decodes them as one batch
    (continuous batching; each answer is checked by its own test below, which waits for its future) instead
    of one after another, each a few hundred steps of the tiny."""
    with ThreadPoolExecutor(len(GENERATING)) as pool:
        yield {request: pool.submit(request[0], client, request[1]) for request in GENERATING}


@pytest.mark.parametrize("seed", [None, 1])
def test_chat_json_schema_answers_validate(answers: dict[Request, Future[Any]], seed: int | None) -> None:
    choice = answers[_chat_json_schema, seed].result().choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content or ""), PERSON)


def test_streamed_json_schema_answer_validates(answers: dict[Request, Future[Any]]) -> None:
    chunks = answers[_streamed_json_schema, None].result()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_completions_json_schema_and_json_object(answers: dict[Request, Future[Any]]) -> None:
    reply = answers[_completions_json_schema, None].result()
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), PERSON)
    objects = answers[_completions_json_object, None].result()
    finished = [c for c in objects.choices if c.finish_reason == "stop"]
    assert len(finished) >= 3  # a random model may stay in a string value until max_tokens ("length")
    for choice in finished:
        assert isinstance(json.loads(choice.text), dict)


def _calls(reply: Any) -> list[tuple[str, dict[str, Any]]]:
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    return tool_calls(choice.message)


def test_tool_choice_required_one_call_validates(answers: dict[Request, Future[Any]]) -> None:
    """One call: the grammar ends the output after it, well within max_tokens (every value is bounded)."""
    calls = _calls(answers[_tool_choice_required, None].result())
    assert len(calls) == 1
    jsonschema.validate(calls[0][1], SCHEMAS[calls[0][0]])


def test_tool_choice_required_parallel_calls_validate(answers: dict[Request, Future[Any]]) -> None:
    """Parallel calls allowed: a random model may go on adding calls until max_tokens ("length"); the calls
    it completed are the message's tool_calls, and each validates."""
    choice = answers[_tool_choice_required, 7].result().choices[0]
    assert choice.finish_reason in ("tool_calls", "length"), choice
    calls = tool_calls(choice.message)
    assert calls, choice
    for name, arguments in calls:
        jsonschema.validate(arguments, SCHEMAS[name])


@pytest.mark.parametrize("name", ["get_weather", "search"])
def test_named_tool_choice_one_call_validates(answers: dict[Request, Future[Any]], name: str) -> None:
    calls = _calls(answers[_named_tool_choice, name].result())
    assert [n for n, _ in calls] == [name]
    jsonschema.validate(calls[0][1], SCHEMAS[name])


def test_anthropic_tool_choice_any_validates(answers: dict[Request, Future[Any]]) -> None:
    reply = answers[_anthropic_tool_choice_any, None].result()
    uses = [b for b in reply["content"] if b["type"] == "tool_use"]
    assert reply["stop_reason"] == "tool_use" and len(uses) == 1, reply
    jsonschema.validate(uses[0]["input"], SCHEMAS[uses[0]["name"]])


@pytest.mark.parametrize("schema,keyword", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}}, "oneOf"),
])
def test_a_schema_feature_the_server_cannot_enforce_is_a_400_naming_it(client: openai.OpenAI, schema: dict[str, Any],
                                                                       keyword: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       response_format=schema_format(schema), max_tokens=10)  # type: ignore[arg-type]
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == "response_format" and repr(keyword) in error["message"]


def test_an_unenforceable_tool_schema_is_a_400_naming_tools(client: openai.OpenAI) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], tools=[tool],
                                       tool_choice="required", max_tokens=10)  # type: ignore[list-item]
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "tools"


def test_malformed_response_format_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema"}, max_tokens=10)  # type: ignore[arg-type]
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "response_format"


def test_a_constrained_output_cut_by_max_tokens_is_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON"}],
                                           response_format=schema_format(PERSON), max_tokens=4)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason == "length" and reply.usage and reply.usage.completion_tokens == 4


def test_response_format_parses_into_the_spec_and_the_grammar() -> None:
    """Pure: OpenAI's response_format -> GenerationSpec.response_format -> the engine's Grammar; a forced
    tool choice wins and names its tools, `parallel_tool_calls` false -> one call."""
    defaults = SamplingDefaults()
    chat = openai_api.ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": schema_format(PERSON)})
    spec = openai_api.generation_spec(chat, defaults)
    assert spec.response_format == ResponseFormat("json_schema", PERSON, "answer", True)
    grammar = output_grammar(spec.response_format, ChatPrompt([1]))
    assert grammar == Grammar(GrammarKind.JSON_SCHEMA, json.dumps(PERSON), "response_format")
    completion = openai_api.CompletionRequest.model_validate(
        {"model": "m", "prompt": "x", "response_format": {"type": "json_object"}})
    assert output_grammar(openai_api.generation_spec(completion, defaults).response_format, ChatPrompt([1])) == \
        Grammar(GrammarKind.JSON_OBJECT)
    assert output_grammar(ResponseFormat("text"), ChatPrompt([1])) is None
    forced = ChatPrompt([1], {"get_weather": SCHEMAS["get_weather"]}, ToolChoice("named", "get_weather", False))
    tools = output_grammar(ResponseFormat("json_object"), forced)
    assert tools is not None and tools.kind is GrammarKind.TOOL_CALLS and tools.param == "tools"
    assert json.loads(tools.spec) == {"tools": [{"type": "function", "function": {
        "name": "get_weather", "parameters": SCHEMAS["get_weather"]}}], "name": "get_weather", "parallel": False}
