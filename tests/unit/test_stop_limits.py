"""Bounded client input: at most MAX_STOP_STRINGS stop strings of at most MAX_STOP_CHARS characters each.

One owner per rule: the protocol modules check only the shape (strings, non-empty); how many and how long
is a serving rule of the engine's admission, which every API maps to a 400 naming its own field
(tests/test_gateway_app.py sends them over HTTP to both APIs)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nextserve.cluster.engine.detokenizer import MAX_STOP_CHARS, MAX_STOP_STRINGS
from nextserve.cluster.gateway.protocols import anthropic, openai

pytestmark = pytest.mark.unit
OVER_LIMIT = ["s" * (MAX_STOP_CHARS + 1)] * (MAX_STOP_STRINGS + 1)
OPENAI_BODIES = {openai.CompletionRequest: {"model": "m", "prompt": "hi"},
                 openai.ChatCompletionRequest: {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}
MESSAGES_BODY: dict[str, Any] = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


def test_limits_are_openais() -> None:
    assert (MAX_STOP_STRINGS, MAX_STOP_CHARS) == (4, 256)


@pytest.mark.parametrize("model", list(OPENAI_BODIES), ids=lambda m: m.__name__)
def test_openai_shape_only_and_stop_reaches_the_sampling_params(model: type) -> None:
    req = openai.parse_request(json.dumps({**OPENAI_BODIES[model], "stop": OVER_LIMIT}).encode(), model)
    assert req.sampling_params(openai.SamplingDefaults()).stop == tuple(OVER_LIMIT)
    for bad in ([1], [""], {"a": 1}):
        with pytest.raises(openai.RequestError) as err:
            openai.parse_request(json.dumps({**OPENAI_BODIES[model], "stop": bad}).encode(), model)
        assert err.value.status_code == 400 and err.value.param == "stop"


def test_anthropic_shape_only_and_stop_reaches_the_sampling_params() -> None:
    req = anthropic.parse_messages_request(json.dumps({**MESSAGES_BODY, "stop_sequences": OVER_LIMIT}).encode())
    assert req.sampling_params(anthropic.SamplingDefaults()).stop == tuple(OVER_LIMIT)
    with pytest.raises(anthropic.AnthropicError) as err:
        anthropic.parse_messages_request(json.dumps({**MESSAGES_BODY, "stop_sequences": [""]}).encode())
    assert err.value.status == 400 and "stop_sequences" in err.value.message
