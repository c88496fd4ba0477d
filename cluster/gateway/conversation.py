"""The internal request model every API parses into: a conversation (or a raw prompt) and how to generate.

    API JSON -> protocols/<api>.py (shape checks only) -> GenerationSpec(prompt, params, n, request_fields)
      prompt: Conversation(messages, tools, tool_choice)   chat APIs (OpenAI chat, Anthropic Messages, ...)
              str | list[int]                              OpenAI completions: text or token ids as sent
      -> prompt_of(spec.prompt, tokenizer) -> ChatPrompt   (chat template + forced tool-call opening, or
                                                             the raw prompt's ids; chat_template.py)
      -> generation.py: engine requests -> events.py: one stream of events every API renders

A Conversation's messages are the chat template's input in OpenAI's chat shape (role, content, tool_calls
with arguments as an object or a JSON string, tool_call_id), its tools OpenAI function tools: the shape the
model's template reads, so each API translates once into it and nothing downstream knows which API spoke.
The serving rules (stop limits, context length) are not checked here: they are the engine's `Engine.admit`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from nextserve.cluster.engine.contract import SamplingParams
from nextserve.cluster.gateway.chat_template import ChatPrompt, ToolChoice, render_chat


@dataclass(frozen=True, slots=True)
class Conversation:
    """A chat as the model's template reads it, whichever API sent it."""
    messages: tuple[Mapping[str, Any], ...]
    """OpenAI chat-shaped messages: {"role", "content", "tool_calls"?, "tool_call_id"?, "name"?}."""
    tools: tuple[Mapping[str, Any], ...] = ()
    """OpenAI function tools: {"type": "function", "function": {"name", "description"?, "parameters"}}."""
    tool_choice: ToolChoice = ToolChoice("none")
    """Whether the output is parsed for tool calls, and a call forced (named / required) or not."""

    def render(self, tokenizer: PreTrainedTokenizerBase) -> ChatPrompt:
        """The prompt ids (raises ChatTemplateError naming the message the template refused)."""
        return render_chat(tokenizer, self.messages, self.tools or None, self.tool_choice)


Prompt = Conversation | str | list[int]
"""A chat, or a completion's raw prompt: its text, or its token ids."""


def prompt_of(prompt: Prompt, tokenizer: PreTrainedTokenizerBase) -> ChatPrompt:
    """The prompt ids with what the output is parsed with (a raw prompt's output is plain text)."""
    if isinstance(prompt, Conversation):
        return prompt.render(tokenizer)
    if isinstance(prompt, str):
        return ChatPrompt(tokenizer.encode(prompt, add_special_tokens=False))
    return ChatPrompt(list(prompt))


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """What every choice's text must parse as (OpenAI `response_format`, Responses `text.format`).

    "text" is free text; "json_object" any JSON object; "json_schema" a JSON value valid against `schema`.
    Enforcement (a grammar mask in the engine) is the structured-output feature's; the APIs only parse into this.
    """
    type: Literal["text", "json_object", "json_schema"] = "text"
    schema: Mapping[str, Any] | None = None
    """The JSON Schema of "json_schema" (None otherwise)."""
    name: str = ""
    """The schema's name as the request gave it (json_schema.name), for errors and logs."""
    strict: bool = False


@dataclass(frozen=True, slots=True)
class GenerationSpec:
    """One API request in the internal model: what to prompt with and how to sample, for n choices."""
    prompt: Prompt
    params: SamplingParams
    """Sampling and stopping for every choice (choice i seeds with seed + i); unset fields already took the
    checkpoint's defaults."""
    n: int = 1
    request_fields: Mapping[str, str] = field(default_factory=dict)
    """The engine's field names (an EngineError's `param`: "prompt", "max_tokens", "stop") as this request
    names them ("messages", "max_completion_tokens", "stop_sequences"), for errors in the API's terms."""
    cache_salt: str = ""
    """The request's `cache_salt` (OpenAI extension): narrows its prefix-cache sharing within its tenant."""
    response_format: ResponseFormat = ResponseFormat()
    """What the output must parse as (free text unless the request asked for JSON)."""
    prompt_cache_key: str = ""
    """The client's session key (Responses' `prompt_cache_key`): joins the key that routes the request to a
    head replica, so a session's turns keep landing on the head that caches its prefix. Routing only."""

    def request_field(self, engine_field: str) -> str:
        return self.request_fields.get(engine_field, engine_field)
