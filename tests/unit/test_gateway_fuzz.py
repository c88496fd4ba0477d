"""Property-based: requests generated from every endpoint's request model (its fields, filled with plausible,
edge and arbitrary JSON values) are never answered 5xx, always carry x-request-id, and serving goes on.

Bounded for speed: a few hundred examples in all on the tiny model, max_tokens kept small.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pydantic import BaseModel

from nextserve.cluster.gateway.protocols import anthropic, openai, responses

MODEL = "tiny"
CONTEXT = 128
EXAMPLES = 60
"""Per endpoint (5 endpoints)."""

ENDPOINTS: dict[str, tuple[type[BaseModel], dict[str, Any]]] = {
    "/v1/completions": (openai.CompletionRequest, {"model": MODEL, "prompt": "def main(", "max_tokens": 2}),
    "/v1/chat/completions": (openai.ChatCompletionRequest,
                             {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    "/v1/messages": (anthropic.MessagesRequest,
                     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    "/v1/messages/count_tokens": (anthropic.MessagesCountTokensRequest,
                                  {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
    "/v1/responses": (responses.ResponsesRequest, {"model": MODEL, "input": "hi", "max_output_tokens": 2}),
}

SCALARS = st.one_of(st.none(), st.booleans(), st.text(max_size=12),
                    st.sampled_from([0, 1, -1, 2, 16, 17, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1,
                                     10**30, 0.0, 1e-300, -0.0, 1e300, 0.5, 2.0000001, float("nan"), float("inf"),
                                     float("-inf"), "", "tiny", "user", "assistant", "system", "tool", "text"]),
                    st.integers(), st.floats())
ANY_JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) |
                        st.dictionaries(st.sampled_from(["type", "text", "role", "content", "name", "id", "input",
                                                         "function", "arguments", "parameters", "tool_use_id",
                                                         "source", "x"]), inner, max_size=3), max_leaves=10)
CONTENT_BLOCK = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking", "image_url", "nope", "input_text",
                              "output_text", "input_image", "refusal"])},
    optional={"text": ANY_JSON, "id": ANY_JSON, "name": ANY_JSON, "input": ANY_JSON, "content": ANY_JSON,
              "tool_use_id": ANY_JSON, "source": ANY_JSON, "refusal": ANY_JSON})
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "developer", "robot"]) | ANY_JSON},
    optional={"content": st.text(max_size=20) | st.lists(CONTENT_BLOCK, max_size=2) | ANY_JSON,
              "tool_calls": ANY_JSON, "tool_call_id": ANY_JSON, "name": ANY_JSON})
ITEM = st.fixed_dictionaries(
    {"type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "item_reference",
                              "web_search_call"]) | ANY_JSON},
    optional={"role": st.sampled_from(["user", "assistant", "developer", "system"]) | ANY_JSON,
              "content": st.text(max_size=20) | st.lists(CONTENT_BLOCK, max_size=2) | ANY_JSON,
              "call_id": ANY_JSON, "name": ANY_JSON, "arguments": st.sampled_from(["{}", "{", "[]", '{"a": 1}']) | ANY_JSON,
              "output": ANY_JSON, "namespace": ANY_JSON})
"""A Responses input item."""
TOOL = st.fixed_dictionaries({"type": st.sampled_from(["function", "namespace", "web_search", "custom"]) | ANY_JSON},
                             optional={"function": st.fixed_dictionaries({"name": st.text(max_size=8)},
                                                                         optional={"parameters": ANY_JSON}),
                                       "name": st.text(max_size=8), "input_schema": ANY_JSON,
                                       "parameters": ANY_JSON, "tools": ANY_JSON})
SMALL_MAX_TOKENS = st.integers(-1, 3) | st.sampled_from([None, "2", 2.0, 10**30])
"""max_tokens stays small (fast) or is wrong; a huge one is clamped to the tiny context."""
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "messages": st.lists(MESSAGE, max_size=3) | ANY_JSON,
    "tools": st.lists(TOOL, max_size=2) | ANY_JSON,
    "max_tokens": SMALL_MAX_TOKENS, "max_completion_tokens": SMALL_MAX_TOKENS, "max_output_tokens": SMALL_MAX_TOKENS,
    "input": st.text(max_size=20) | st.lists(MESSAGE | ITEM, max_size=3) | ANY_JSON,
    "prompt": st.text(max_size=30) | st.lists(st.integers(-2, 200_000), max_size=6) | ANY_JSON,
    "n": st.integers(-1, 4) | ANY_JSON, "stream": st.booleans() | ANY_JSON,
    "temperature": st.floats(0, 2) | ANY_JSON, "top_p": st.floats(0, 1) | ANY_JSON,
    "top_k": st.integers(-2, 10**12) | ANY_JSON, "seed": st.integers(-(2**63) - 1, 2**64) | ANY_JSON,
    "logprobs": st.integers(-1, 21) | st.booleans(), "top_logprobs": st.integers(-1, 21) | ANY_JSON,
    "stop": st.lists(st.text(max_size=4), max_size=5) | ANY_JSON,
    "stop_sequences": st.lists(st.text(max_size=4), max_size=5) | ANY_JSON,
}


def request_bodies(model: type[BaseModel], base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """The base body with some of the model's fields (and an unknown one) set to generated values."""
    fields = sorted(model.model_fields) + ["unknown_field"]
    return st.dictionaries(st.sampled_from(fields), st.deferred(lambda: ANY_JSON), max_size=5).flatmap(
        lambda chosen: st.fixed_dictionaries({k: FIELD_VALUES.get(k, ANY_JSON) for k in chosen}).map(
            lambda values: {**base, **values}))


def _check(http: httpx.Client, path: str, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()  # NaN / Infinity go out as Python writes them: a server must cope
    r = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text, raw[:2000])
    assert r.headers.get("x-request-id")
    for banned in ("Traceback", 'File "', "/work/", "pid=", "0x7f"):
        assert banned not in r.text, (banned, r.text)
    if r.status_code >= 400:
        data = r.json()
        assert "error" in data and data["error"]["message"]
    elif re.search(r'"error": ?\{', r.text) or "event: error" in r.text or "response.failed" in r.text:
        # a stream that started, then failed (a Responses body's "error": null is no error)
        raise AssertionError(f"a stream ended with an error: {r.text[:2000]} for {raw[:2000]!r}")


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_generated_requests_are_never_a_5xx_and_serving_goes_on(http: httpx.Client, path: str) -> None:
    model, base = ENDPOINTS[path]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body=request_bodies(model, base))
    def check(body: dict[str, Any]) -> None:
        _check(http, path, body)

    check()
    good = http.post(path, json=base)
    assert good.status_code == 200, good.text
