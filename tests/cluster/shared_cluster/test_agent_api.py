"""What coding agents need, through `nextserve up` (the shared cluster: it serves the tiny checkpoint that
has memorised a few agent turns, tests/agent_checkpoint.py) with the official openai and anthropic SDKs:
tool calls typed by their schema, plain and streamed; text before a call; a turn after a tool result
(arguments sent as a JSON string); parallel calls; tool_choice none / named / required; a code value
holding `</parameter>`; a call cut at max_tokens; a multi-turn agent loop; logprobs and n. The Responses API
(`client.responses`): the same text and calls as chat completions for the same messages, streamed deltas
adding up to them, a forced call, a Codex-style replayed history; and the real Codex CLI completing a
`codex exec` turn."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from agent_checkpoint import (AGENT_TURNS, CODE, END_OF_TURN, ROME_QUESTION, SYSTEM, TOOLS, WEATHER_QUESTION,
                              WEATHER_RESULT, AgentTurn, cache_root)
from cluster_harness import UpProcess
from codex_cli import ensure_codex, run_codex_exec
from openai_replies import tool_calls
from gateway_local_engine import scrape

pytestmark = pytest.mark.cluster

TURNS = {t.name: t for t in AGENT_TURNS}
ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]
PARIS = {"city": "Paris", "days": 3, "metric": True}
RESPONSES_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]
RESPONSES_SERVED = 'nextserve_requests_total{"endpoint": "/v1/responses", "status": "200"}'


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


def _together(*requests: Callable[[], Any]) -> list[Any]:
    """Independent requests sent at once, their results in order: the head decodes them as one batch (the
    shared cluster runs MAX_NUM_SEQS = 4 and queues 8 more), which on these CPUs costs little more than one
    of them alone. Greedy decoding gives the same tokens in any batch."""
    with ThreadPoolExecutor(len(requests)) as pool:
        return [f.result() for f in [pool.submit(request) for request in requests]]


def test_call_with_text_before_it_typed_by_schema(oai: openai.OpenAI) -> None:
    reply, (content, calls, finish) = _together(partial(_chat, oai, TURNS["weather_call"]),
                                                partial(_streamed_chat, oai, TURNS["weather_call"].messages))
    choice = reply.choices[0]
    assert "<tool_call>" not in choice.message.content
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check.\n"
    assert tool_calls(choice.message) == [("get_weather", PARIS)]
    assert choice.message.tool_calls[0].id.startswith("call_")
    assert (content, finish) == ("Let me check.\n", "tool_calls")  # no markup reached the streamed content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", PARIS)]


def test_parallel_calls_and_parallel_tool_calls_false(oai: openai.OpenAI) -> None:
    turn = TURNS["parallel_calls"]
    want = [("get_weather", {"city": "Tokyo", "days": 1, "metric": True}),
            ("get_weather", {"city": "Oslo", "days": 1, "metric": True})]
    reply, (_, calls, _), single = _together(partial(_chat, oai, turn), partial(_streamed_chat, oai, turn.messages),
                                             partial(_chat, oai, turn, parallel_tool_calls=False))
    message = reply.choices[0].message
    assert message.content is None and tool_calls(message) == want
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == want and calls[0]["id"] != calls[1]["id"]
    assert tool_calls(single.choices[0].message) == want[:1]


def test_code_value_with_closing_tag_and_array_and_null(oai: openai.OpenAI) -> None:
    code, (_, calls, _), search = _together(partial(_chat, oai, TURNS["code_value"]),
                                            partial(_streamed_chat, oai, TURNS["code_value"].messages),
                                            partial(_chat, oai, TURNS["search_call"]))
    assert tool_calls(code.choices[0].message) == [("run_python", {"code": CODE})]
    assert json.loads(calls[0]["arguments"]) == {"code": CODE}
    want = [("search_files", {"pattern": "TODO", "paths": ["src", "tests"], "max_results": None})]
    assert tool_calls(search.choices[0].message) == want


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
    rome = TURNS["rome_without_tool"]  # [SYSTEM, ROME_QUESTION]: unforced, a plain answer
    want = [("get_weather", {"city": "Rome", "days": 7, "metric": True})]
    named = {"type": "function", "function": {"name": "get_weather"}}
    forced = [partial(f, oai, arg, tool_choice=choice) for choice in (named, "required")
              for f, arg in ((_chat, rome), (_streamed_chat, rome.messages))]
    plain, *replies, raw = _together(partial(_chat, oai, rome), *forced,
                                     partial(_chat, oai, TURNS["weather_call"], tool_choice="none"))
    assert plain.choices[0].message.content == rome.content  # unforced: no call
    for choice, reply, (_, calls, finish) in zip((named, "required"), replies[::2], replies[1::2]):
        assert tool_calls(reply.choices[0].message) == want, choice
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == want and finish == "tool_calls", choice
    raw = raw.choices[0]
    assert raw.message.tool_calls is None and raw.message.content == TURNS["weather_call"].content


def test_call_cut_at_max_tokens(oai: openai.OpenAI) -> None:
    """12 tokens end inside the call's opening: the unclosed block is plain content, streamed or not."""
    weather = TURNS["weather_call"]
    cut, (content, calls, finish), longer, (_, longer_calls, longer_finish) = _together(
        partial(_chat, oai, weather, max_tokens=12), partial(_streamed_chat, oai, weather.messages, max_tokens=12),
        partial(_chat, oai, weather, max_tokens=30), partial(_streamed_chat, oai, weather.messages, max_tokens=30))
    cut = cut.choices[0]
    assert cut.finish_reason == "length" and not cut.message.tool_calls
    assert cut.message.content.startswith("Let me check.\n<tool_call>")
    assert (content, calls, finish) == (cut.message.content, [], "length")
    # Cut after the name: the streamed call is closed as valid JSON, the plain reply has it as content.
    longer = longer.choices[0]
    assert longer.finish_reason == "length" and "<function=get_weather>" in longer.message.content
    assert longer_finish == "length" and [c["name"] for c in longer_calls] == ["get_weather"]
    assert json.loads(longer_calls[0]["arguments"])["city"] == "Paris"


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
    request = dict(model="tiny", max_tokens=32000, system=SYSTEM["content"], messages=[WEATHER_QUESTION],
                   tools=ANTHROPIC_TOOLS, extra_body={"temperature": 0})

    def streamed() -> anthropic.types.Message:
        with claude.messages.stream(**request) as stream:
            return stream.get_final_message()

    reply, final = _together(partial(claude.messages.create, **request), streamed)
    assert reply.stop_reason == "tool_use"
    assert [b.type for b in reply.content] == ["text", "tool_use"] and reply.content[0].text == "Let me check.\n"
    use = reply.content[1]
    assert use.id.startswith("toolu_") and (use.name, use.input) == ("get_weather", PARIS)
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
    choices = ({"type": "any"}, {"type": "tool", "name": "get_weather"})
    replies = _together(*[partial(claude.messages.create, **rome, tool_choice=choice) for choice in choices])
    for choice, reply in zip(choices, replies):
        assert [(b.name, b.input) for b in reply.content if b.type == "tool_use"] == [
            ("get_weather", {"city": "Rome", "days": 7, "metric": True})], choice
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(**{**rome, "max_tokens": 0})
    assert e.value.body["type"] == "error" and "max_tokens" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(**{**rome, "model": "some-other-model"})


# --- the Responses API and Codex ------------------------------------------------------------------------------

def _responses_input(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """(instructions, input items) for chat messages, as Codex sends a conversation: the system prompt as
    instructions, a call as a function_call item after its message, a tool result as function_call_output."""
    instructions, items = "", []
    for m in messages:
        if m["role"] == "system":
            instructions = m["content"]
        elif m["role"] == "tool":
            items.append({"type": "function_call_output", "call_id": m["tool_call_id"], "output": m["content"]})
        else:
            kind = "output_text" if m["role"] == "assistant" else "input_text"
            items.append({"type": "message", "role": m["role"], "content": [{"type": kind, "text": m["content"]}]})
            items += [{"type": "function_call", "call_id": c["id"], "name": c["function"]["name"],
                       "arguments": json.dumps(c["function"]["arguments"])} for c in m.get("tool_calls", [])]
    return instructions, items


def _function_calls(response: Any) -> list[tuple[str, dict]]:
    return [(o.name, json.loads(o.arguments)) for o in response.output if o.type == "function_call"]


@pytest.mark.parametrize("name", ["weather_call", "after_tool_result", "parallel_calls", "rome_without_tool"])
def test_responses_text_and_calls_equal_chat_completions_and_the_stream_adds_up(oai: openai.OpenAI,
                                                                                 name: str) -> None:
    turn = TURNS[name]
    instructions, items = _responses_input(turn.messages)
    request = dict(model="tiny", instructions=instructions, input=items, tools=RESPONSES_TOOLS, temperature=0,
                   max_output_tokens=200)
    chat, plain, events = _together(partial(_chat, oai, turn), partial(oai.responses.create, **request),
                                    lambda: list(oai.responses.create(**request, stream=True)))
    chat = chat.choices[0]
    assert plain.status == "completed" and plain.output_text == (chat.message.content or "")
    assert _function_calls(plain) == tool_calls(chat.message)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == plain.output_text
    arguments = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
    assert [json.loads(a) for a in arguments] == [args for _, args in tool_calls(chat.message)]
    final = events[-1].response
    assert final.output_text == plain.output_text and _function_calls(final) == _function_calls(plain)


def test_responses_forced_call_and_a_codex_style_replay(oai: openai.OpenAI) -> None:
    rome = dict(model="tiny", instructions=SYSTEM["content"], input=[ROME_QUESTION], tools=RESPONSES_TOOLS,
                temperature=0, max_output_tokens=200)
    forced, first = _together(
        partial(oai.responses.create, **rome, tool_choice={"type": "function", "name": "get_weather"}),
        partial(oai.responses.create, **{**rome, "input": [WEATHER_QUESTION]}))
    assert [o.type for o in forced.output] == ["function_call"]
    assert _function_calls(forced) == [("get_weather", {"city": "Rome", "days": 7, "metric": True})]
    # Codex's next turn: the whole history again, store false, a reasoning item, its extra fields
    call = next(o for o in first.output if o.type == "function_call")
    history = [{"type": "message", "role": "developer",
                "content": [{"type": "input_text", "text": SYSTEM["content"]}]},
               {"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": WEATHER_QUESTION["content"]}]},
               {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
               {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": WEATHER_RESULT}]
    answer = oai.responses.create(model="tiny", input=history, temperature=0, stream=False, store=False,
                                  tools=[*RESPONSES_TOOLS, {"type": "web_search"}], tool_choice="auto",
                                  extra_body={"prompt_cache_key": "session-1", "reasoning": {"summary": "auto"},
                                              "include": ["reasoning.encrypted_content"], "client_metadata": {}})
    assert answer.output_text == TURNS["after_tool_result"].content and answer.usage
    assert answer.usage.input_tokens_details.cached_tokens > 0  # the first turn's prefix, on the same head


CODEX_INSTRUCTIONS = "You are Codex, a coding agent. Use the tools when they help.\n"


def test_codex_exec_completes_a_turn(shared_cluster: UpProcess, tmp_path: Path) -> None:
    """The real Codex CLI (npm @openai/codex) with a custom model provider (wire_api "responses") runs one
    `codex exec` turn against the cluster, streamed: its tools, environment context and permissions, with one
    line of base instructions in place of Codex's own (CODEX_INSTRUCTIONS: ~16,000 prompt tokens with them,
    a minute of prefill on these CPUs, which tests nothing more of the API)."""
    codex = ensure_codex(cache_root())
    with httpx.Client(base_url=shared_cluster.base_url, timeout=30) as http:
        before = scrape(http).get(RESPONSES_SERVED, 0.0)
        result = run_codex_exec(codex, shared_cluster.base_url, tmp_path, "Say hello.",
                                instructions=CODEX_INSTRUCTIONS)
        assert result.returncode == 0, f"codex exec failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        assert scrape(http).get(RESPONSES_SERVED, 0.0) >= before + 1  # the turn went through /v1/responses
    output = result.stderr + result.stdout
    assert "tokens used" in output
    print(output[output.index("tokens used"):][:80])
