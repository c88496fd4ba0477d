"""Chat prompts as the checkpoint's own template renders them, with tools, for both HTTP APIs.

    messages (OpenAI shape: the OpenAI API's as sent, the Anthropic API's converted)
      -> template input: `developer` -> system, assistant `tool_calls[].function.arguments` decoded from
         a JSON string to an object (Qwen's templates iterate them as a mapping and crash on a string)
      -> tokenizer.apply_chat_template(messages, tools=..., add_generation_prompt=True)
      -> + the opening of a call when tool_choice forces one:
           named:    "<tool_call>\\n<function=NAME>\\n"   (the model writes the parameters)
           required: "<tool_call>\\n<function="           (then, for both, a TOOL_CALLS grammar in the
                                                          engine: a tool name + ">\\n" for required, and
                                                          parameters matching the tool's schema;
                                                          output_grammar.py)

The tool-call parser (tool_calls.py) is fed the forced opening first, so a forced call streams like a
generated one. Pure apart from the tokenizer: no HTTP, no engine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

CALL_OPEN = "<tool_call>\n<function="
"""How a Qwen3-Coder tool call opens; a name, then `>\\n`, then the parameters."""


class ChatTemplateError(ValueError):
    """Messages the template (or this module) cannot render; `param` names the message or field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


@dataclass(frozen=True, slots=True)
class ToolChoice:
    kind: Literal["auto", "none", "required", "named"] = "auto"
    name: str | None = None
    """The function a `named` choice forces."""
    parallel: bool = True
    """False keeps only the first call (OpenAI's parallel_tool_calls, Anthropic's
    disable_parallel_tool_use)."""

    @property
    def parses_calls(self) -> bool:
        """`none` leaves the output as plain text: no parsing at all."""
        return self.kind != "none"

    @property
    def forced_prefix(self) -> str:
        if self.kind == "named":
            return f"{CALL_OPEN}{self.name}>\n"
        return CALL_OPEN if self.kind == "required" else ""


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    prompt_ids: list[int]
    """The rendered prompt, forced call opening included."""
    tool_schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Function name -> its JSON schema `parameters` ({} without tools): how the parser types values."""
    choice: ToolChoice = ToolChoice()
    name_token_ids: tuple[tuple[int, ...], ...] = ()
    """For `required`: the token ids of each `NAME>\\n` the output may start with (the gateway now constrains
    the call with a grammar, output_grammar.py; kept for SamplingParams.allowed_starts users)."""


def tool_schemas(tools: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """OpenAI `tools` ([{"type": "function", "function": {"name", "parameters"}}]) -> name -> parameters."""
    return {t["function"]["name"]: dict(t["function"].get("parameters") or {}) for t in tools}


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the template reads them: developer -> system, tool-call arguments as objects."""
    out = []
    for i, m in enumerate(messages):
        msg = {k: v for k, v in m.items() if v is not None}
        if msg.get("role") == "developer":
            msg["role"] = "system"
        if msg.get("tool_calls"):
            msg["tool_calls"] = [_call_with_object_arguments(c, f"messages[{i}].tool_calls[{j}]")
                                 for j, c in enumerate(msg["tool_calls"])]
        msg.setdefault("content", "")
        out.append(msg)
    return out


def _call_with_object_arguments(call: Mapping[str, Any], param: str) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ChatTemplateError(f"{param}.function.arguments is not valid JSON ({e}); send the arguments "
                                    f"as a JSON object encoded as a string", f"{param}.function.arguments") from None
    if not isinstance(arguments, dict):
        raise ChatTemplateError(f"{param}.function.arguments must be a JSON object, got "
                                f"{type(arguments).__name__}", f"{param}.function.arguments")
    function["arguments"] = arguments
    return {**call, "function": function}


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]],
                tools: Sequence[Mapping[str, Any]] | None, choice: ToolChoice) -> ChatPrompt:
    """The prompt for `messages` (OpenAI shape) with `tools` (OpenAI shape, None or [] for none)."""
    schemas = tool_schemas(tools or [])
    if choice.kind in ("named", "required") and not schemas:
        raise ChatTemplateError(f"tool_choice {choice.kind!r} needs tools; send `tools` or use 'auto'",
                                "tool_choice")
    if choice.kind == "named" and choice.name not in schemas:
        raise ChatTemplateError(f"tool_choice names the function {choice.name!r}, which is not among the tools "
                                f"({', '.join(schemas)})", "tool_choice")
    rendered = template_messages(messages)
    text = _apply(tokenizer, rendered, list(tools) if tools else None) + choice.forced_prefix
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    names: tuple[tuple[int, ...], ...] = ()
    if choice.kind == "required":
        names = tuple(_name_ids(tokenizer, name) for name in schemas)
    return ChatPrompt(prompt_ids, schemas if choice.parses_calls else {}, choice, names)


def _name_ids(tokenizer: PreTrainedTokenizerBase, name: str) -> tuple[int, ...]:
    """The ids `NAME>\n` adds after the forced CALL_OPEN. Only the call is encoded, not the whole prompt once
    per tool: `<tool_call>` is an added token, so the tokenizer splits the text there and what comes before
    cannot change the ids after it."""
    opening = tokenizer.encode(CALL_OPEN, add_special_tokens=False)
    full = tokenizer.encode(f"{CALL_OPEN}{name}>\n", add_special_tokens=False)
    if full[:len(opening)] == opening:
        return tuple(full[len(opening):])
    return tuple(tokenizer.encode(f"{name}>\n", add_special_tokens=False))


def _apply(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]],
           tools: list[Mapping[str, Any]] | None) -> str:
    try:
        return str(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False))
    except (TemplateError, TypeError, KeyError, ValueError) as e:
        index = _first_refused(tokenizer, messages, tools)
        where = f"messages[{index}]" if index is not None else "messages"
        raise ChatTemplateError(f"the model's chat template refused {where}: {e}", where) from None


def _first_refused(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]],
                   tools: list[Mapping[str, Any]] | None) -> int | None:
    """The first message whose addition makes the template fail (rendered prefix by prefix)."""
    for i in range(1, len(messages) + 1):
        try:
            tokenizer.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True, tokenize=False)
        except Exception:
            return i - 1
    return None
