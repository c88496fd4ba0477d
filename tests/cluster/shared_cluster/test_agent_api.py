"""What coding agents need, through `nextserve up` (the shared cluster: it serves the tiny checkpoint that
has memorised a few agent turns, tests/agent_checkpoint.py) with the official openai and anthropic SDKs:
tool calls typed by their schema, plain and streamed; text before a call; a turn after a tool result
(arguments sent as a JSON string); parallel calls; tool_choice none / named / required; a code value
holding `</parameter>`; a call cut at max_tokens; a multi-turn agent loop; logprobs and n."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest

from agent_checkpoint import (AGENT_TURNS, CODE, END_OF_TURN, ROME_QUESTION, SYSTEM, TOOLS, WEATHER_QUESTION,
                              WEATHER_RESULT, AgentTurn)
from cluster_harness import UpProcess

pytestmark = pytest.mark.cluster

TURNS = {t.name: t for t in AGENT_TURNS}
ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]
PARIS = {"city": "Paris", "days": 3, "metric": True}


@pytest.fixture(scope="module")
def oai(shared_cluster: UpProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{shared_cluster.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def claude(shared_cluster: UpProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=shared_cluster.base_url, api_key="unused", max_retries=0, timeout=300)


def _chat(oai: openai.OpenAI, turn: AgentTurn, **kwargs: Any) -> Any:
    return oai.chat.completions.create(model="tiny", messages=turn.messages, tools=TOOLS, temperature=0,
                                       **{"max_tokens": 200, **kwargs})


def _streamed_chat(oai: openai.OpenAI, messages: list[dict], **kwargs: Any) -> tuple[str, list[dict], str]:
    """(content, calls as {id, name, arguments}, finish_reason) assembled from the stream's deltas."""
    content, calls, finish = "", {}, ""
    for chunk in oai.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0,
                                             max_tokens=kwargs.pop("max_tokens", 200), stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                assert call["id"] is None and d.function.name  # the first delta of a call names it
                call["id"], call["name"] = d.id, d.function.name
            call["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def _calls(message: Any) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def test_call_with_text_before_it_typed_by_schema(oai: openai.OpenAI) -> None:
    choice = _chat(oai, TURNS["weather_call"]).choices[0]
    assert "<tool_call>" not in choice.message.content
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check.\n"
    assert _calls(choice.message) == [("get_weather", PARIS)]
    assert choice.message.tool_calls[0].id.startswith("call_")
    content, calls, finish = _streamed_chat(oai, TURNS["weather_call"].messages)
    assert (content, finish) == ("Let me check.\n", "tool_calls")  # no markup reached the streamed content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", PARIS)]


def test_parallel_calls_and_parallel_tool_calls_false(oai: openai.OpenAI) -> None:
    turn = TURNS["parallel_calls"]
    want = [("get_weather", {"city": "Tokyo", "days": 1, "metric": True}),
            ("get_weather", {"city": "Oslo", "days": 1, "metric": True})]
    message = _chat(oai, turn).choices[0].message
    assert message.content is None and _calls(message) == want
    _, calls, _ = _streamed_chat(oai, turn.messages)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == want and calls[0]["id"] != calls[1]["id"]
    assert _calls(_chat(oai, turn, parallel_tool_calls=False).choices[0].message) == want[:1]


def test_code_value_with_closing_tag_and_array_and_null(oai: openai.OpenAI) -> None:
    assert _calls(_chat(oai, TURNS["code_value"]).choices[0].message) == [("run_python", {"code": CODE})]
    _, calls, _ = _streamed_chat(oai, TURNS["code_value"].messages)
    assert json.loads(calls[0]["arguments"]) == {"code": CODE}
    want = [("search_files", {"pattern": "TODO", "paths": ["src", "tests"], "max_results": None})]
    assert _calls(_chat(oai, TURNS["search_call"]).choices[0].message) == want


def test_agent_loop_tool_result_with_arguments_as_a_json_string(oai: openai.OpenAI) -> None:
    """The client sends the call back as OpenAI clients do (arguments a JSON string), then the result."""
    first = _chat(oai, TURNS["weather_call"]).choices[0].message
    messages = [SYSTEM, WEATHER_QUESTION,
                {"role": "assistant", "content": "Let me check.", "tool_calls": [
                    {"id": first.tool_calls[0].id, "type": "function",
                     "function": {"name": "get_weather", "arguments": first.tool_calls[0].function.arguments}}]},
                {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": WEATHER_RESULT}]
    assert isinstance(messages[2]["tool_calls"][0]["function"]["arguments"], str)
    answer = oai.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0,
                                         max_tokens=200).choices[0]
    assert answer.finish_reason == "stop" and answer.message.content == TURNS["after_tool_result"].content
    assert not answer.message.tool_calls


def test_tool_choice_none_named_required(oai: openai.OpenAI) -> None:
    rome = [SYSTEM, ROME_QUESTION]
    plain = oai.chat.completions.create(model="tiny", messages=rome, tools=TOOLS, temperature=0, max_tokens=200)
    assert plain.choices[0].message.content == TURNS["rome_without_tool"].content  # unforced: no call
    want = [("get_weather", {"city": "Rome", "days": 7, "metric": True})]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (named, "required"):
        message = oai.chat.completions.create(model="tiny", messages=rome, tools=TOOLS, temperature=0,
                                              max_tokens=200, tool_choice=choice).choices[0].message
        assert _calls(message) == want, choice
        _, calls, finish = _streamed_chat(oai, rome, tool_choice=choice)
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == want and finish == "tool_calls"
    raw = _chat(oai, TURNS["weather_call"], tool_choice="none").choices[0]
    assert raw.message.tool_calls is None and raw.message.content == TURNS["weather_call"].content


def test_call_cut_at_max_tokens(oai: openai.OpenAI) -> None:
    """12 tokens end inside the call's opening: the unclosed block is plain content, streamed or not."""
    cut = _chat(oai, TURNS["weather_call"], max_tokens=12).choices[0]
    assert cut.finish_reason == "length" and not cut.message.tool_calls
    assert cut.message.content.startswith("Let me check.\n<tool_call>")
    content, calls, finish = _streamed_chat(oai, TURNS["weather_call"].messages, max_tokens=12)
    assert (content, calls, finish) == (cut.message.content, [], "length")
    # Cut after the name: the streamed call is closed as valid JSON, the plain reply has it as content.
    longer = _chat(oai, TURNS["weather_call"], max_tokens=30).choices[0]
    assert longer.finish_reason == "length" and "<function=get_weather>" in longer.message.content
    _, calls, finish = _streamed_chat(oai, TURNS["weather_call"].messages, max_tokens=30)
    assert finish == "length" and [c["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["arguments"])["city"] == "Paris"


def test_logprobs_and_n(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model="tiny", messages=TURNS["after_tool_result"].messages, tools=TOOLS,
                                        temperature=0, max_tokens=200, logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert "".join(e.token for e in entries).startswith("It will be sunny")
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)
    many = oai.completions.create(model="tiny", prompt="def fib(n):", max_tokens=5, temperature=1.0, seed=3, n=3)
    again = oai.completions.create(model="tiny", prompt="def fib(n):", max_tokens=5, temperature=1.0, seed=3, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2] and many.usage.completion_tokens == 15
    assert [c.text for c in many.choices] == [c.text for c in again.choices]  # seed is reproducible per choice


def test_anthropic_tool_use_plain_and_streamed(claude: anthropic.Anthropic) -> None:
    turn = TURNS["weather_call"]
    reply = claude.messages.create(model="tiny", max_tokens=32000, system=SYSTEM["content"],
                                   messages=[WEATHER_QUESTION], tools=ANTHROPIC_TOOLS,
                                   extra_body={"temperature": 0})
    assert reply.stop_reason == "tool_use"
    assert [b.type for b in reply.content] == ["text", "tool_use"] and reply.content[0].text == "Let me check.\n"
    use = reply.content[1]
    assert use.id.startswith("toolu_") and (use.name, use.input) == ("get_weather", PARIS)
    with claude.messages.stream(model="tiny", max_tokens=32000, system=SYSTEM["content"],
                                messages=[WEATHER_QUESTION], tools=ANTHROPIC_TOOLS,
                                extra_body={"temperature": 0}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[1].input == PARIS
    # The loop: the tool result goes back as a tool_result block, the model answers.
    answer = claude.messages.create(
        model="tiny", max_tokens=32000, system=SYSTEM["content"], tools=ANTHROPIC_TOOLS,
        extra_body={"temperature": 0},
        messages=[WEATHER_QUESTION,
                  {"role": "assistant", "content": [{"type": "text", "text": "Let me check."},
                                                    {"type": "tool_use", "id": use.id, "name": use.name,
                                                     "input": use.input}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                "content": WEATHER_RESULT}]}])
    assert answer.stop_reason == "end_turn" and answer.content[0].text == TURNS["after_tool_result"].content
    count = claude.messages.count_tokens(model="tiny", system=SYSTEM["content"], messages=[WEATHER_QUESTION],
                                        tools=ANTHROPIC_TOOLS)
    # Anthropic's input_tokens leaves out what was read from the cache (the earlier turns' prefix)
    assert count.input_tokens == reply.usage.input_tokens + reply.usage.cache_read_input_tokens
    assert turn.completion.endswith(END_OF_TURN)


def test_anthropic_tool_choice_and_errors(claude: anthropic.Anthropic) -> None:
    rome = dict(model="tiny", max_tokens=200, system=SYSTEM["content"], messages=[ROME_QUESTION],
                tools=ANTHROPIC_TOOLS, extra_body={"temperature": 0})
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
        reply = claude.messages.create(**rome, tool_choice=choice)
        assert [(b.name, b.input) for b in reply.content if b.type == "tool_use"] == [
            ("get_weather", {"city": "Rome", "days": 7, "metric": True})], choice
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(**{**rome, "max_tokens": 0})
    assert e.value.body["type"] == "error" and "max_tokens" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(**{**rome, "model": "some-other-model"})
