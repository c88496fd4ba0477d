"""The OpenAI request models and bodies, without a server: validation, error bodies, chunk shapes."""

from __future__ import annotations

import enum
import json
from typing import Any

import pytest

from nextserve.cluster.openai_protocol import (SSE_DONE, ChatCompletionRequest, CompletionRequest, Endpoint, RequestError,
                                     ResponseHeader, Usage, chunk_body, error_body, param_path, parse_request,
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
    params = req.sampling_params(7)
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed) == (7, 0.0, 0.5, 40, 3)


def test_defaults_follow_openai() -> None:
    req = parse_completion()
    assert req.max_tokens_request() == (16, "max_tokens", False)  # the default 16 is clamped, not refused
    assert req.stop == [] and not req.stream and not req.include_usage
    params = req.sampling_params(16)
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.top_k == 0 and params.seed is None
    assert parse_completion(top_k=-1, temperature=None, top_p=None).sampling_params(1).top_k == 0
    assert parse_completion(max_tokens=None).max_tokens_request() == (None, "max_tokens", True)
    assert not parse_completion(stream_options={"include_usage": True}).include_usage  # only when streaming


def test_chat_max_completion_tokens_wins() -> None:
    assert parse_chat().max_tokens_request() == (None, "max_tokens", True)
    assert parse_chat(max_tokens=5).max_tokens_request() == (5, "max_tokens", True)
    assert parse_chat(max_tokens=5, max_completion_tokens=9).max_tokens_request() == (9, "max_completion_tokens", True)


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
    (parse_completion, "n", 2), (parse_chat, "n", 4), (parse_completion, "logprobs", 0),
    (parse_completion, "logprobs", 5), (parse_completion, "echo", True), (parse_completion, "best_of", 3),
    (parse_completion, "suffix", "}"), (parse_chat, "logprobs", True), (parse_chat, "top_logprobs", 2),
])
def test_unsupported_features_are_refused_clearly(parse: Any, field: str, value: Any) -> None:
    e = refusal(parse, **{field: value})
    assert e.param == field and ("not supported" in e.message or "only n=1" in e.message)


def test_supported_values_of_unsupported_features_pass() -> None:
    parse_completion(n=1, echo=False, best_of=1, logprobs=None, suffix=None)
    parse_completion(n=None)
    parse_chat(logprobs=False, top_logprobs=0)


def test_chat_content_parts() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = parse_chat(messages=[{"role": "system", "content": None, "name": "s"}, {"role": "user", "content": parts}])
    assert [m.as_template_input() for m in req.messages] == [{"role": "system", "content": ""},
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


class Reason(enum.Enum):
    LENGTH = "length"


def test_response_bodies() -> None:
    usage = Usage(3, 4)
    assert usage.as_dict() == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    h = ResponseHeader(Endpoint.COMPLETIONS, "cmpl-1", 100, "m")
    body = response_body(h, "out", Reason.LENGTH, usage)
    assert body == {"id": "cmpl-1", "object": "text_completion", "created": 100, "model": "m",
                    "choices": [{"index": 0, "text": "out", "logprobs": None, "finish_reason": "length"}],
                    "usage": usage.as_dict()}
    chat = response_body(ResponseHeader(Endpoint.CHAT, "chatcmpl-1", 100, "m"), "hi", "stop", usage)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hi"}


def test_chunk_bodies() -> None:
    chat = ResponseHeader(Endpoint.CHAT, "chatcmpl-1", 100, "m")
    first = chunk_body(chat, "He", None, True, False)
    assert first["object"] == "chat.completion.chunk" and "usage" not in first
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": "He"}, "logprobs": None,
                                 "finish_reason": None}]
    assert chunk_body(chat, "llo", None, False, True)["choices"][0]["delta"] == {"content": "llo"}
    last = chunk_body(chat, "", Reason.LENGTH, False, True)
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "length"
    assert last["usage"] is None
    completion = chunk_body(ResponseHeader(Endpoint.COMPLETIONS, "cmpl-1", 1, "m"), "x", None, True, False)
    assert completion["object"] == "text_completion" and completion["choices"][0]["text"] == "x"
    usage = usage_chunk_body(chat, Usage(1, 2))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3


def test_sse_framing() -> None:
    event = sse({"text": "a\nb", "é": 1})
    assert event.startswith("data: ") and event.endswith("\n\n") and event.count("\n") == 2
    assert json.loads(event.removeprefix("data: ")) == {"text": "a\nb", "é": 1}
    assert SSE_DONE == "data: [DONE]\n\n"
