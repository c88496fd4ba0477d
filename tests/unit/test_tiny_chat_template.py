"""The tiny tokenizer's chat template renders tools, tool calls and tool results as Qwen3-Coder's template does,
and `<tool_call>` / `<tool_response>` are single, non-special tokens."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from nextserve.model.tiny_tokenizer import NON_SPECIAL_TOKENS, TOOL_INSTRUCTIONS

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather forecast.\n",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "days": {"type": "integer", "description": "Days ahead", "minimum": 1},
            "metric": {"type": "boolean"},
        }, "required": ["city"]},
    }},
    {"type": "function", "function": {
        "name": "search_files", "description": "Search files.",
        "parameters": {"type": "object", "properties": {
            "paths": {"type": "array", "items": {"type": "string"}},
            "max_results": {"type": ["integer", "null"]},
        }},
    }},
]

CONVERSATION = [
    {"role": "system", "content": "You are an agent."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "Checking both.", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather",
                                                     "arguments": {"city": "Paris", "days": 2, "metric": True}}},
        {"id": "b", "type": "function", "function": {"name": "search_files",
                                                     "arguments": {"paths": ["src", "docs"], "max_results": None}}},
    ]},
    {"role": "tool", "tool_call_id": "a", "content": "sunny, 21C"},
    {"role": "tool", "tool_call_id": "b", "content": "no files"},
    {"role": "user", "content": "And tomorrow?"},
]


@pytest.fixture(scope="module")
def tok(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tiny tokenizer (train_tiny_tokenizer's default vocabulary): the session's, trained once."""
    return tokenizer


@pytest.fixture(scope="module")
def rendered(tok: PreTrainedTokenizerBase) -> str:
    return str(tok.apply_chat_template(CONVERSATION, tools=TOOLS, add_generation_prompt=True, tokenize=False))


def test_tools_go_into_the_system_turn(rendered: str) -> None:
    system = (
        "<|im_start|>system\nYou are an agent.\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>"
        "\n<function>\n<name>get_weather</name>\n<description>Get the weather forecast.</description>"
        "\n<parameters>"
        "\n<parameter>\n<name>city</name>\n<type>string</type>\n<description>City name</description>\n</parameter>"
        "\n<parameter>\n<name>days</name>\n<type>integer</type>\n<description>Days ahead</description>"
        "\n<minimum>1</minimum>\n</parameter>"
        "\n<parameter>\n<name>metric</name>\n<type>boolean</type>\n</parameter>"
        '\n<required>["city"]</required>\n</parameters>\n</function>'
        "\n<function>\n<name>search_files</name>\n<description>Search files.</description>\n<parameters>"
        '\n<parameter>\n<name>paths</name>\n<type>array</type>\n<items>{"type": "string"}</items>\n</parameter>'
        "\n<parameter>\n<name>max_results</name>\n<type>['integer', 'null']</type>\n</parameter>"
        "\n</parameters>\n</function>\n</tools>" + TOOL_INSTRUCTIONS + "<|im_end|>\n"
    )
    assert rendered.startswith(system)
    assert "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>" \
        in TOOL_INSTRUCTIONS


def test_conversation_turns(rendered: str) -> None:
    turns = rendered[rendered.index("<|im_end|>\n") + len("<|im_end|>\n"):]
    assert turns == (
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\nChecking both.\n"
        "\n<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n"
        "<parameter=metric>\ntrue\n</parameter>\n"
        "</function>\n</tool_call>"
        "\n<tool_call>\n<function=search_files>\n"
        '<parameter=paths>\n["src", "docs"]\n</parameter>\n<parameter=max_results>\nnull\n</parameter>\n'
        "</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny, 21C\n</tool_response>\n"
        "<tool_response>\nno files\n</tool_response>\n<|im_end|>\n"
        "<|im_start|>user\nAnd tomorrow?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_default_system_prompt_and_no_tools(tok: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with_tools = str(tok.apply_chat_template(messages, tools=TOOLS, tokenize=False))
    assert with_tools.startswith("<|im_start|>system\nYou are Qwen, a helpful AI assistant that can interact with a "
                                 "computer to solve tasks.\n\n# Tools\n")
    assert with_tools.endswith("</IMPORTANT><|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")
    assert tok.apply_chat_template(messages, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"
    developer = [{"role": "developer", "content": "be brief"}, *messages]
    assert tok.apply_chat_template(developer, tokenize=False) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")


def test_tool_call_edge_cases(tok: PreTrainedTokenizerBase) -> None:
    """No content: the call opens the turn; arguments as a JSON string are kept as is; a tool result first."""
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "content": "done"},
    ]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>assistant\n<tool_call>\n<function=f>\n{\"x\": 1}\n</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\ndone\n</tool_response>\n<|im_end|>\n")


def test_tool_tokens_are_single_and_not_special(tok: PreTrainedTokenizerBase, rendered: str) -> None:
    ids = [tok.convert_tokens_to_ids(t) for t in NON_SPECIAL_TOKENS]
    assert ids == list(range(len(tok) - len(NON_SPECIAL_TOKENS), len(tok)))
    text = "Sure.\n<tool_call>\n<function=f>\n</function>\n</tool_call>"
    encoded = tok.encode(text, add_special_tokens=False)
    assert encoded.count(ids[0]) == 1 and encoded.count(ids[1]) == 1
    assert tok.decode(encoded + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.encode("<tool_response>", add_special_tokens=False) == [ids[2]]
    assert not set(ids) & set(tok.all_special_ids)
    prompt_ids = tok.encode(rendered, add_special_tokens=False)  # as the gateway encodes a rendered prompt
    for token_id, token in zip(ids, NON_SPECIAL_TOKENS):
        assert prompt_ids.count(token_id) == rendered.count(token)
    assert tok.decode(prompt_ids) == rendered

