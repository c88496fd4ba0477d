"""Bounded client input: at most MAX_STOP_STRINGS stop strings of at most MAX_STOP_CHARS characters each,
refused by both APIs' request validation with a 400 naming the field and the limit."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nextserve.cluster.engine.detokenizer import MAX_STOP_CHARS, MAX_STOP_STRINGS
from nextserve.cluster.gateway.protocols import anthropic, openai

pytestmark = pytest.mark.unit
AT_LIMIT = ["s" * MAX_STOP_CHARS] * MAX_STOP_STRINGS
OPENAI_BODIES = {openai.CompletionRequest: {"model": "m", "prompt": "hi"},
                 openai.ChatCompletionRequest: {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}
MESSAGES_BODY: dict[str, Any] = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


def test_limits_are_openais() -> None:
    assert (MAX_STOP_STRINGS, MAX_STOP_CHARS) == (4, 256)


@pytest.mark.parametrize("model", list(OPENAI_BODIES), ids=lambda m: m.__name__)
@pytest.mark.parametrize("stop, message", [
    (["a"] * (MAX_STOP_STRINGS + 1), f"at most {MAX_STOP_STRINGS} stop strings are allowed, got 5"),
    (["a", "b" * (MAX_STOP_CHARS + 1)], f"at most {MAX_STOP_CHARS} characters; stop[1] has 257"),
    ("b" * (MAX_STOP_CHARS + 1), f"at most {MAX_STOP_CHARS} characters; stop[0] has 257"),
], ids=["too-many", "one-too-long", "string-too-long"])
def test_openai_refuses_more_stop_strings_or_longer(model: type, stop: Any, message: str) -> None:
    with pytest.raises(openai.RequestError) as err:
        openai.parse_request(json.dumps({**OPENAI_BODIES[model], "stop": stop}).encode(), model)
    assert err.value.status_code == 400 and err.value.param == "stop"
    assert message in err.value.message, err.value.message
    accepted = openai.parse_request(json.dumps({**OPENAI_BODIES[model], "stop": AT_LIMIT}).encode(), model)
    assert accepted.stop == AT_LIMIT


@pytest.mark.parametrize("stop_sequences, message", [
    (["a"] * (MAX_STOP_STRINGS + 1), f"stop_sequences: List should have at most {MAX_STOP_STRINGS} items"),
    (["a", "b" * (MAX_STOP_CHARS + 1)], f"stop_sequences.1: String should have at most {MAX_STOP_CHARS} characters"),
], ids=["too-many", "one-too-long"])
def test_anthropic_refuses_more_stop_sequences_or_longer(stop_sequences: list[str], message: str) -> None:
    with pytest.raises(anthropic.AnthropicError) as err:
        anthropic.parse_messages_request(json.dumps({**MESSAGES_BODY, "stop_sequences": stop_sequences}).encode())
    assert err.value.status == 400 and message in err.value.message, err.value.message
    accepted = anthropic.parse_messages_request(json.dumps({**MESSAGES_BODY, "stop_sequences": AT_LIMIT}).encode())
    assert accepted.stop == AT_LIMIT
