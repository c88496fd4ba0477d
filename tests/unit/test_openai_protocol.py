"""The OpenAI request models and bodies, without a server: validation, error bodies, chunk shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nextserve.cluster.gateway.chat_template import ToolChoice
from nextserve.model.sampling import SamplingDefaults
from nextserve.cluster.gateway.protocols.openai import (SSE_DONE, ChatCompletionRequest, CompletionRequest, Endpoint, RequestError,
                                     ResponseHeader, Usage, choice_body, chunk_body, error_body, param_path, parse_request,
                                     response_body, sse, usage_chunk_body, validation_error)


def parse_completion(**fields: Any) -> CompletionRequest:
    return parse_request(json.dumps({"model": "m", "prompt": "hi", **fields}).encode(), CompletionRequest)


def parse_chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_request(json.dumps(body).encode(), ChatCompletionRequest)


def refusal(parse: Any, **fields: Any) -> RequestError:
    with pytest.raises(RequestError) as e:
        parse(**fields)
    assert e.value.status_code == 400 and e.value.type == "invalid_request_error"
    return e.value


def test_common_fields_are_read_and_unknown_ones_ignored() -> None:
    req = parse_completion(max_tokens=7, temperature=0, top_p=0.5, top_k=40, seed=3, stop="\n", stream=True,
                           stream_options={"include_usage": True}, n=1, user="u", frequency_penalty=0.0,
                           logit_bias={}, metadata={"x": [1]})
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k, req.seed) == (7, 0.0, 0.5, 40, 3)
    assert req.stop == ["\n"] and req.include_usage
    params = req.sampling_params(SamplingDefaults())
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed) == (7, 0.0, 0.5, 40, 3)


def test_defaults_follow_openai() -> None:
    req = parse_completion()
    assert req.max_tokens_request() == (16, "max_tokens")  # the default 16 is clamped, not refused
    assert req.stop == [] and not req.stream and not req.include_usage
    params = req.sampling_params(SamplingDefaults())
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.top_k == 0 and params.seed is None
    assert parse_completion(top_k=-1, temperature=None, top_p=None).sampling_params(SamplingDefaults()).top_k == 0
    assert parse_completion(max_tokens=None).max_tokens_request() == (None, "max_tokens")
    assert not parse_completion(stream_options={"include_usage": True}).include_usage  # only when streaming


def test_chat_max_completion_tokens_wins() -> None:
    assert parse_chat().max_tokens_request() == (None, "max_tokens")
    assert parse_chat(max_tokens=5).max_tokens_request() == (5, "max_tokens")
    assert parse_chat(max_tokens=5, max_completion_tokens=9).max_tokens_request() == (9, "max_completion_tokens")


@pytest.mark.parametrize("prompt, expected", [
    ("text", "text"), ([1, 2, 3], [1, 2, 3]), (["one"], "one"), ([[4, 5]], [4, 5]), ([], []),
])
def test_prompt_forms(prompt: Any, expected: Any) -> None:
    assert parse_completion(prompt=prompt).prompt == expected


@pytest.mark.parametrize("prompt", [["a", "b"], [[1], [2]], [1, "a"], 5, [True, 1], None, {"text": "x"}])
def test_bad_prompts_name_the_field(prompt: Any) -> None:
    e = refusal(parse_completion, prompt=prompt)
    assert e.param == "prompt" and e.code == "invalid_value"


WRONG_TYPES = [
    ("max_tokens", "5"), ("max_tokens", 1.5), ("max_tokens", True), ("temperature", "hot"), ("top_p", [1]),
    ("top_k", 2.5), ("seed", "1"), ("stream", 1), ("stream", "true"), ("stop", 5), ("stop", ["a", 1]), ("stop", [""]),
    ("model", 3), ("n", "1"), ("user", 5), ("stream_options", True),
]


@pytest.mark.parametrize("field, value", WRONG_TYPES)
def test_wrong_types_are_400_naming_the_field(field: str, value: Any) -> None:
    e = refusal(parse_completion, **{field: value})
    assert e.param == field and field in e.message


def test_nested_wrong_type_names_the_path() -> None:
    assert refusal(parse_completion, stream_options={"include_usage": "yes"}).param == "stream_options.include_usage"
    e = refusal(parse_chat, messages=[{"role": "user", "content": "ok"}, {"role": "user", "content": 5}])
    assert e.param == "messages[1].content"
    assert refusal(parse_chat, messages=[{"role": "wizard", "content": "x"}]).param == "messages[0].role"
    assert refusal(parse_chat, messages=[{"content": "x"}]).param == "messages[0].role"
    assert refusal(parse_chat, messages="hi").param == "messages"


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", -3), ("temperature", -0.1), ("temperature", 2.5), ("top_p", 0),
    ("top_p", 1.01), ("top_k", -2), ("seed", 2**64),
])
def test_out_of_range_values(field: str, value: Any) -> None:
    assert refusal(parse_completion, **{field: value}).param == field


def test_missing_fields() -> None:
    with pytest.raises(RequestError) as e:
        parse_request(b'{"prompt": "x"}', CompletionRequest)
    assert e.value.param == "model" and e.value.message == "Missing required parameter: 'model'."
    assert e.value.code == "missing_required_parameter"
    with pytest.raises(RequestError) as e:
        parse_request(b'{"model": "m"}', ChatCompletionRequest)
    assert e.value.param == "messages"
    assert refusal(parse_chat, messages=[]).param == "messages"


@pytest.mark.parametrize("parse, field, value", [
    (parse_completion, "echo", True), (parse_completion, "best_of", 3), (parse_completion, "suffix", "}"),
])
def test_unsupported_features_are_refused_clearly(parse: Any, field: str, value: Any) -> None:
    e = refusal(parse, **{field: value})
    assert e.param == field and "not supported" in e.message


@pytest.mark.parametrize("parse, fields, param", [
    (parse_completion, {"n": 17}, "n"), (parse_chat, {"n": 0}, "n"), (parse_completion, {"logprobs": 21}, "logprobs"),
    (parse_completion, {"logprobs": -1}, "logprobs"), (parse_chat, {"top_logprobs": 2}, "top_logprobs"),
    (parse_chat, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (parse_chat, {"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    (parse_chat, {"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    (parse_chat, {"tool_choice": "sometimes"}, "tool_choice"),
    (parse_chat, {"tool_choice": "required"}, "tool_choice"),
    (parse_chat, {"tools": [{"type": "function", "function": {"name": "a"}}],
                  "tool_choice": {"type": "function", "function": {"name": "b"}}}, "tool_choice"),
    (parse_chat, {"tools": [{"type": "function", "function": {"name": "a"}}] * 2}, "tools"),
])
def test_bad_n_logprobs_and_tools_name_the_field(parse: Any, fields: dict, param: str) -> None:
    assert refusal(parse, **fields).param == param


def test_supported_values_pass() -> None:
    parse_completion(n=1, echo=False, best_of=1, logprobs=None, suffix=None)
    assert parse_completion(n=None).n == 1 and parse_completion(n=16, logprobs=20).sampling_params(
        SamplingDefaults()).logprobs == 20
    assert parse_chat(logprobs=False).sampling_params(SamplingDefaults()).logprobs is None
    assert parse_chat(logprobs=True, top_logprobs=3).sampling_params(SamplingDefaults()).logprobs == 3


def test_tools_and_tool_choice() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "d",
                                               "parameters": {"type": "object", "properties": {}}}}]
    req = parse_chat(tools=tools)
    assert req.template_tools() == tools and req.tool_choice_spec() == ToolChoice("auto", None, True)
    assert parse_chat().tool_choice_spec().kind == "none"
    named = parse_chat(tools=tools, parallel_tool_calls=False,
                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.tool_choice_spec() == ToolChoice("named", "get_weather", False)
    assert parse_chat(tools=tools, tool_choice="required").tool_choice_spec().kind == "required"
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    req = parse_chat(messages=[{"role": "user", "content": "w?"},
                               {"role": "assistant", "content": None, "tool_calls": [call]},
                               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    assert [m.as_template_input() for m in req.messages][1:] == [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]


def test_chat_content_parts() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = parse_chat(messages=[{"role": "system", "content": None, "name": "s"}, {"role": "user", "content": parts}])
    assert [m.as_template_input() for m in req.messages] == [{"role": "system", "content": "", "name": "s"},
                                                             {"role": "user", "content": "a\nb"}]
    e = refusal(parse_chat, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert e.param == "messages[0].content" and "not supported" in e.message
    e = refusal(parse_chat, messages=[{"role": "user", "content": [{"type": "text"}]}])
    assert e.param == "messages[0].content"


@pytest.mark.parametrize("body", [b"", b"{", b'{"model": "m",}', b"\xff\xfe", b"nul"])
def test_malformed_json_is_400(body: bytes) -> None:
    with pytest.raises(RequestError) as e:
        parse_request(body, CompletionRequest)
    assert e.value.status_code == 400 and e.value.param is None and "not valid JSON" in e.value.message


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"3", b"null"])
def test_non_object_body_is_400(body: bytes) -> None:
    with pytest.raises(RequestError) as e:
        parse_request(body, ChatCompletionRequest)
    assert e.value.status_code == 400 and "JSON object" in e.value.message


def test_param_path_and_framework_locations() -> None:
    assert param_path(("messages", 0, "content")) == "messages[0].content"
    assert param_path(("stop", 1)) == "stop[1]"
    assert param_path(()) == ""
    e = validation_error([{"loc": ("body", "max_tokens"), "type": "int_type", "msg": "Input should be an integer"}])
    assert e.param == "max_tokens" and e.status_code == 400
    assert validation_error([{"loc": ("query", "q"), "type": "missing", "msg": "x"}]).param == "q"


def test_error_body_shape() -> None:
    assert error_body("bad", param="n") == {"error": {"message": "bad", "type": "invalid_request_error",
                                                      "param": "n", "code": None}}
    e = RequestError(404, "no such model", "model", code="model_not_found")
    assert e.body()["error"] == {"message": "no such model", "type": "invalid_request_error", "param": "model",
                                 "code": "model_not_found"}


def test_response_bodies() -> None:
    usage = Usage(3, 4)
    assert usage.as_dict() == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                               "prompt_tokens_details": {"cached_tokens": 0}}
    assert Usage(40, 4, 32).as_dict()["prompt_tokens_details"] == {"cached_tokens": 32}
    h = ResponseHeader(Endpoint.COMPLETIONS, "cmpl-1", 100, "m")
    body = response_body(h, [choice_body(h.endpoint, 0, "out", None, "length", None)], usage)
    assert body == {"id": "cmpl-1", "object": "text_completion", "created": 100, "model": "m",
                    "choices": [{"index": 0, "text": "out", "logprobs": None, "finish_reason": "length"}],
                    "usage": usage.as_dict()}
    chat = ResponseHeader(Endpoint.CHAT, "chatcmpl-1", 100, "m")
    one = response_body(chat, [choice_body(Endpoint.CHAT, 0, "hi", None, "stop", None)], usage)
    assert one["object"] == "chat.completion"
    assert one["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    with_calls = choice_body(Endpoint.CHAT, 1, None, calls, "tool_calls", None)
    assert with_calls["index"] == 1 and with_calls["message"] == {"role": "assistant", "content": None,
                                                                   "tool_calls": calls}


def test_chunk_bodies() -> None:
    chat = ResponseHeader(Endpoint.CHAT, "chatcmpl-1", 100, "m")
    first = chunk_body(chat, 0, {"content": "He"}, None, True, False, None)
    assert first["object"] == "chat.completion.chunk" and "usage" not in first
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": "He"}, "logprobs": None,
                                 "finish_reason": None}]
    assert chunk_body(chat, 2, {"content": "llo"}, None, False, True, None)["choices"][0]["delta"] == {"content": "llo"}
    last = chunk_body(chat, 0, {}, "length", False, True, None)
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "length"
    assert last["usage"] is None
    completion = chunk_body(ResponseHeader(Endpoint.COMPLETIONS, "cmpl-1", 1, "m"), 0, {"content": "x"}, None, True,
                            False, None)
    assert completion["object"] == "text_completion" and completion["choices"][0]["text"] == "x"
    usage = usage_chunk_body(chat, Usage(1, 2))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3


def test_sse_framing() -> None:
    event = sse({"text": "a\nb", "é": 1})
    assert event.startswith("data: ") and event.endswith("\n\n") and event.count("\n") == 2
    assert json.loads(event.removeprefix("data: ")) == {"text": "a\nb", "é": 1}
    assert SSE_DONE == "data: [DONE]\n\n"
