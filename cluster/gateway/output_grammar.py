"""What a request's output must parse as, as the engine's Grammar: structured outputs and forced tool calls.

    GenerationSpec.response_format (every API parses into it)  ChatPrompt.choice (tool_choice, parsed)
      "text"        -> None (free text)                        auto / none -> None
      "json_object" -> Grammar(JSON_OBJECT)                    required    -> Grammar(TOOL_CALLS, any tool)
      "json_schema" -> Grammar(JSON_SCHEMA, schema)            named       -> Grammar(TOOL_CALLS, that tool)
                                                               (parallel_tool_calls false: one call)

The JSON keeps the client's key order (properties are generated in it). A forced call wins over a
response format (the output is the call, not content). The engine compiles
the grammar at admission (cluster/engine/grammar.py) and refuses what it cannot enforce as a 400 whose
`param` is the grammar's: "response_format" (each API names it in its own terms through
GenerationSpec.request_fields, e.g. Responses' "text.format") or "tools". Pure: no engine, no HTTP.
"""

from __future__ import annotations

import json

from nextserve.cluster.engine.contract import Grammar, GrammarKind
from nextserve.cluster.gateway.chat_template import ChatPrompt
from nextserve.cluster.gateway.conversation import ResponseFormat


def output_grammar(response_format: ResponseFormat, prompt: ChatPrompt) -> Grammar | None:
    """The grammar the engine enforces for this request, None for free text."""
    choice = prompt.choice
    if choice.kind in ("required", "named") and prompt.tool_schemas:
        tools = [{"type": "function", "function": {"name": name, "parameters": parameters}}
                 for name, parameters in prompt.tool_schemas.items()]
        spec = {"tools": tools, "name": choice.name if choice.kind == "named" else None, "parallel": choice.parallel}
        return Grammar(GrammarKind.TOOL_CALLS, json.dumps(spec), param="tools")
    if response_format.type == "json_object":
        return Grammar(GrammarKind.JSON_OBJECT)
    if response_format.type == "json_schema":
        return Grammar(GrammarKind.JSON_SCHEMA, json.dumps(response_format.schema))
    return None
