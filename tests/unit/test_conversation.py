"""The internal conversation model and the one event stream, without a server: an OpenAI chat body and an
Anthropic Messages body holding the same conversation become the same prompt ids; engine outputs become
events once (tool calls, the forced opening, the finish); one event stream renders as both APIs' SSE and
bodies, which their own SDKs read back to the same message."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import pytest
from anthropic.types import Message
from transformers import PreTrainedTokenizerBase

from nextserve.cluster.engine.contract import (EngineUnavailableError, FinishReason, SamplingDefaults, StepOutput,
                                               TokenLogprobs)
from nextserve.cluster.gateway.chat_template import CALL_OPEN, ChatPrompt, ToolChoice
from nextserve.cluster.gateway.conversation import Conversation, GenerationSpec, prompt_of
from nextserve.cluster.gateway.events import (ChoiceEvents, Completed, Event, Started, TextDelta, TokenUsage,
                                              ToolArgumentsDelta, ToolCallStart)
from nextserve.cluster.gateway.protocols import anthropic as anthropic_api
from nextserve.cluster.gateway.protocols import openai as openai_api

try:  # the HTTP client the SDK is built on: httpx2 in recent versions, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx  # type: ignore[no-redef]

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                  "required": ["city"]}
OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast.",
                                                  "parameters": WEATHER_SCHEMA}}]
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Forecast.", "input_schema": WEATHER_SCHEMA}]

OPENAI_CHAT: dict[str, Any] = {"model": "m", "tools": OPENAI_TOOLS, "messages": [
    {"role": "system", "content": "You are an agent."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "days": 2}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "user", "content": "And Rome?"}]}
ANTHROPIC_MESSAGES: dict[str, Any] = {"model": "m", "max_tokens": 64, "system": "You are an agent.",
                                      "tools": ANTHROPIC_TOOLS, "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                      {"type": "tool_use", "id": "call_1", "name": "get_weather",
                                       "input": {"city": "Paris", "days": 2}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                                 {"type": "text", "text": "And Rome?"}]}]}
TOOL_CHOICES = [  # (OpenAI tool_choice, parallel_tool_calls; Anthropic tool_choice)
    ((None, True), None),
    (("none", True), {"type": "none"}),
    (("required", True), {"type": "any"}),
    (({"type": "function", "function": {"name": "get_weather"}}, False),
     {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}),
]


@pytest.fixture(scope="module")
def tok(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tiny tokenizer (train_tiny_tokenizer's default vocabulary): the session's, trained once."""
    return tokenizer


def openai_spec(**fields: Any) -> GenerationSpec:
    req = openai_api.parse_request(json.dumps({**OPENAI_CHAT, **fields}).encode(), openai_api.ChatCompletionRequest)
    return openai_api.generation_spec(req, SamplingDefaults())


def anthropic_spec(**fields: Any) -> GenerationSpec:
    req = anthropic_api.parse_messages_request(json.dumps({**ANTHROPIC_MESSAGES, **fields}).encode())
    return anthropic_api.generation_spec(req, SamplingDefaults())


@pytest.mark.parametrize("openai_choice, anthropic_choice", TOOL_CHOICES, ids=["auto", "none", "required", "named"])
def test_the_same_conversation_from_both_apis_is_the_same_prompt(tok: PreTrainedTokenizerBase, openai_choice: Any,
                                                                 anthropic_choice: Any) -> None:
    choice, parallel = openai_choice
    from_openai = openai_spec(**({"tool_choice": choice} if choice else {}), parallel_tool_calls=parallel)
    from_anthropic = anthropic_spec(**({"tool_choice": anthropic_choice} if anthropic_choice else {}))
    assert isinstance(from_openai.prompt, Conversation) and isinstance(from_anthropic.prompt, Conversation)
    assert from_openai.prompt.tool_choice == from_anthropic.prompt.tool_choice
    a, b = prompt_of(from_openai.prompt, tok), prompt_of(from_anthropic.prompt, tok)
    assert a == b  # ids, the schemas the output is parsed with, the tool choice, the forced names' ids
    text = tok.decode(a.prompt_ids)
    assert "Paris" in text and "sunny" in text and text.endswith(a.choice.forced_prefix)
    assert bool(a.tool_schemas) == (a.choice.kind != "none")
    assert bool(a.name_token_ids) == (a.choice.kind == "required")


def test_specs_carry_sampling_n_and_the_request_field_names() -> None:
    o = openai_spec(max_completion_tokens=9, stop=["x"], n=3, temperature=0)
    assert (o.n, o.params.max_tokens, o.params.stop, o.params.temperature) == (3, 9, ("x",), 0.0)
    assert (o.request_field("prompt"), o.request_field("max_tokens"), o.request_field("stop")) == \
        ("messages", "max_completion_tokens", "stop")
    a = anthropic_spec(stop_sequences=["END"], temperature=0)
    assert (a.n, a.params.max_tokens, a.params.stop) == (1, 64, ("END",))
    assert (a.request_field("prompt"), a.request_field("max_tokens"), a.request_field("stop")) == \
        ("messages", "max_tokens", "stop_sequences")


def test_a_completion_prompt_is_raw_text_or_ids(tok: PreTrainedTokenizerBase) -> None:
    for prompt in ("def main(", [5, 6, 7]):
        req = openai_api.parse_request(json.dumps({"model": "m", "prompt": prompt}).encode(),
                                       openai_api.CompletionRequest)
        spec = openai_api.generation_spec(req, SamplingDefaults())
        assert spec.prompt == prompt and spec.request_field("prompt") == "prompt"
        rendered = prompt_of(spec.prompt, tok)
        ids = prompt if isinstance(prompt, list) else tok.encode(prompt, add_special_tokens=False)
        assert rendered == ChatPrompt(ids) and not rendered.tool_schemas  # plain text out: nothing parsed


# --- engine outputs -> events -------------------------------------------------------------------------------

CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"


def out(text: str, tokens: int, finish: FinishReason | None = None, stop: str | None = None,
        logprobs: list[TokenLogprobs] | None = None) -> StepOutput:
    return StepOutput("r", [1] * len(logprobs or [1]), text, finish, 20, tokens, logprobs, stop, 8)


def tool_prompt(choice: ToolChoice) -> ChatPrompt:
    return ChatPrompt([1, 2, 3], {"get_weather": WEATHER_SCHEMA}, choice)


def test_outputs_become_text_and_tool_call_events_once() -> None:
    choice = ChoiceEvents(0, tool_prompt(ToolChoice("auto")))
    updates = [choice.on_output(o) for o in (out("Let me check.\n", 3), out(CALL[:30], 9),
                                             out(CALL[30:], 20, FinishReason.STOP))]
    assert [u.is_first for u in updates] == [True, False, False] and [u.text_offset for u in updates] == [0, 14, 44]
    events = [e for u in updates for e in u.events]
    assert events[0] == TextDelta("Let me check.\n") and ToolCallStart(0, "get_weather") in events
    arguments = "".join(e.fragment for e in events if isinstance(e, ToolArgumentsDelta))
    assert json.loads(arguments) == {"city": "Rome"}
    finish = updates[-1].finish
    assert finish is not None and finish.has_tool_calls and finish.completion_tokens == 20
    assert all(u.finish is None for u in updates[:-1])
    result = choice.result()
    assert result.text == "Let me check.\n" + CALL and result.finish == finish
    assert result.parsed is not None and result.parsed.content == "Let me check.\n"
    assert [(c.name, c.arguments) for c in result.parsed.tool_calls] == [("get_weather", {"city": "Rome"})]


def test_a_forced_opening_streams_first_and_parses_with_the_output() -> None:
    choice = ChoiceEvents(0, tool_prompt(ToolChoice("named", "get_weather")))
    rest = CALL[len(CALL_OPEN) + len("get_weather>\n"):]
    first = choice.on_output(out("", 0))
    assert first.events[0] == ToolCallStart(0, "get_weather")  # before any token: the forced opening
    choice.on_output(out(rest, 7, FinishReason.STOP))
    result = choice.result()
    assert result.text == rest and result.parsed is not None
    assert [c.arguments for c in result.parsed.tool_calls] == [{"city": "Rome"}] and result.finish.has_tool_calls


def test_unparsed_output_is_plain_text_and_a_stop_string_is_kept() -> None:
    choice = ChoiceEvents(1, ChatPrompt([1]))
    updates = [choice.on_output(out(CALL[:12], 2)), choice.on_output(out("", 2, FinishReason.STOP, stop="END"))]
    assert updates[0].events == (TextDelta(CALL[:12]),) and updates[1].events == ()
    result = choice.result()
    assert result.parsed is None and result.text == CALL[:12] and result.index == 1
    assert result.finish.stop_string == "END" and not result.finish.has_tool_calls


# --- one event stream, both APIs ----------------------------------------------------------------------------

def events_of(prompt: ChatPrompt, outputs: list[StepOutput]) -> list[Event]:
    choice = ChoiceEvents(0, prompt)
    updates = [choice.on_output(o) for o in outputs]
    usage = TokenUsage(outputs[0].prompt_tokens, outputs[-1].completion_tokens, outputs[0].cached_tokens)
    return [Started(outputs[0].prompt_tokens, outputs[0].cached_tokens, 1), *updates,
            Completed((choice.result(),), usage)]


async def stream_of(events: list[Event], error: Exception | None = None) -> AsyncIterator[Event]:
    for event in events:
        yield event
    if error is not None:
        raise error


def rendered(stream: AsyncIterator[str]) -> str:
    async def join() -> str:
        return "".join([s async for s in stream])
    return asyncio.run(join())


OUTPUTS = [out("Let me check.\n", 3), out(CALL[:41], 12), out(CALL[41:], 20, FinishReason.STOP)]


def openai_reply(tok: PreTrainedTokenizerBase, spec: GenerationSpec) -> openai_api.Reply:
    header = openai_api.ResponseHeader(openai_api.Endpoint.CHAT, "chatcmpl-1", 1, "m")
    return openai_api.Reply(header, tok, has_logprobs=False, include_usage=True, spec=spec)


def test_one_event_stream_renders_as_both_apis(tok: PreTrainedTokenizerBase) -> None:
    events = events_of(tool_prompt(ToolChoice("auto")), OUTPUTS)
    spec = openai_spec()
    chunks = [json.loads(line.removeprefix("data: ")) for line in
              rendered(openai_reply(tok, spec).chunks(stream_of(events))).split("\n\n")[:-2]]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    calls = [d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert content == "Let me check.\n" and calls[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(d["function"]["arguments"] for d in calls)) == {"city": "Rome"}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert chunks[-1]["usage"] == {"prompt_tokens": 20, "completion_tokens": 20, "total_tokens": 40,
                                   "prompt_tokens_details": {"cached_tokens": 8}}

    message = sdk_message(rendered(anthropic_api.MessageReply("msg_1", "m", anthropic_spec()).sse(
        stream_of(events))))
    assert message.stop_reason == "tool_use" and [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "Let me check.\n" and message.content[1].input == {"city": "Rome"}
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == \
        (12, 8, 20)

    completed = events[-1]
    assert isinstance(completed, Completed)
    body = openai_reply(tok, spec).body(completed)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me check.\n"
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Rome"}
    whole = Message.model_validate(anthropic_api.MessageReply("msg_1", "m", anthropic_spec()).body(completed))
    assert [(b.type, getattr(b, "input", None)) for b in whole.content] == \
        [(b.type, getattr(b, "input", None)) for b in message.content]


def sdk_message(sse_text: str) -> Message:
    """The anthropic SDK's own assembly of our SSE text into a Message (served by a mock transport)."""
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=sse_text.encode())

    client = anthropic.Anthropic(api_key="sk-test", base_url="http://gateway.test", max_retries=0,
                                 http_client=httpx.Client(transport=httpx.MockTransport(handle)))
    with client.messages.stream(model="m", max_tokens=8, messages=[{"role": "user", "content": "x"}]) as s:
        return s.get_final_message()


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Anthropic's `event: NAME\ndata: JSON\n\n`... -> the data objects."""
    return [json.loads(chunk.split("\n")[1].removeprefix("data: ")) for chunk in text.split("\n\n")[:-1]]


def test_finish_reasons_in_each_apis_terms(tok: PreTrainedTokenizerBase) -> None:
    stopped = events_of(ChatPrompt([1]), [out("a", 1), out("b", 2, FinishReason.STOP, stop="END")])
    completed = stopped[-1]
    assert isinstance(completed, Completed)
    assert openai_reply(tok, openai_spec()).body(completed)["choices"][0]["finish_reason"] == "stop"
    body = anthropic_api.MessageReply("msg_2", "m", anthropic_spec()).body(completed)
    assert (body["stop_reason"], body["stop_sequence"], body["content"]) == \
        ("stop_sequence", "END", [{"type": "text", "text": "ab"}])
    cut = events_of(tool_prompt(ToolChoice("auto")), [out(CALL[:50], 16, FinishReason.LENGTH)])[-1]
    assert isinstance(cut, Completed)
    choice = openai_reply(tok, openai_spec()).body(cut)["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == CALL[:50]  # open: content
    assert anthropic_api.MessageReply("msg_3", "m", anthropic_spec()).body(cut)["stop_reason"] == "max_tokens"
    aborted = events_of(ChatPrompt([1]), [out("a", 1, FinishReason.ABORT)])
    assert isinstance(aborted[-1], Completed)
    assert openai_reply(tok, openai_spec()).body(aborted[-1])["choices"][0]["finish_reason"] == "abort"
    with pytest.raises(anthropic_api.AnthropicError) as e:
        anthropic_api.MessageReply("msg_4", "m", anthropic_spec()).body(aborted[-1])
    assert e.value.status == 529
    sse = parse_sse(rendered(anthropic_api.MessageReply("msg_4", "m", anthropic_spec()).sse(stream_of(aborted))))
    assert sse[-1]["type"] == "error" and sse[-1]["error"]["type"] == "overloaded_error"


def test_a_failure_mid_stream_is_each_apis_error_event(tok: PreTrainedTokenizerBase) -> None:
    started = events_of(ChatPrompt([1]), [out("a", 1), out("b", 2, FinishReason.STOP)])[:2]
    failure = EngineUnavailableError("no live replica for layer 1 expert 7")
    text = rendered(openai_reply(tok, openai_spec()).chunks(stream_of(started, failure)))
    *chunks, error, done = text.split("\n\n")[:-1]
    assert done == "data: [DONE]" and json.loads(chunks[-1].removeprefix("data: "))["choices"][0]["delta"] == \
        {"role": "assistant", "content": "a"}
    assert json.loads(error.removeprefix("data: "))["error"]["type"] == "service_unavailable"
    sse = parse_sse(rendered(anthropic_api.MessageReply("msg_5", "m", anthropic_spec()).sse(
        stream_of(started, failure))))
    assert [e["type"] for e in sse][:2] == ["message_start", "ping"]
    assert sse[-1] == {"type": "error", "error": {"type": "overloaded_error",
                                                  "message": "no live replica for layer 1 expert 7"}}
    broken = parse_sse(rendered(anthropic_api.MessageReply("msg_6", "m", anthropic_spec()).sse(
        stream_of(started, RuntimeError("bug")))))
    assert broken[-1]["error"]["type"] == "api_error" and "bug" not in broken[-1]["error"]["message"]


def test_logprobs_ride_on_the_update_in_each_endpoints_shape(tok: PreTrainedTokenizerBase) -> None:
    entries = [TokenLogprobs(5, -0.5, ((5, -0.5), (6, -1.0))), TokenLogprobs(7, -0.25, ((7, -0.25), (8, -2.0)))]
    events = events_of(ChatPrompt([1]), [out("ab", 1, logprobs=entries[:1]),
                                         out("cd", 2, FinishReason.LENGTH, logprobs=entries[1:])])
    header = openai_api.ResponseHeader(openai_api.Endpoint.COMPLETIONS, "cmpl-1", 1, "m")
    reply = openai_api.Reply(header, tok, has_logprobs=True, include_usage=False, spec=openai_spec())
    chunks = [json.loads(line.removeprefix("data: ")) for line in
              rendered(reply.chunks(stream_of(events))).split("\n\n")[:-2]]
    offsets = [c["choices"][0]["logprobs"]["text_offset"] for c in chunks if c["choices"][0]["logprobs"]]
    assert offsets == [[0], [2]]  # the second update's token starts after the first's two characters
    completed = events[-1]
    assert isinstance(completed, Completed)
    whole = reply.body(completed)["choices"][0]["logprobs"]
    assert whole["text_offset"] == [0, len(tok.decode([5]))] and whole["token_logprobs"] == [-0.5, -0.25]
