"""A forced tool call as a grammar: Qwen3-Coder's XML call blocks whose parameters match the tools' schemas.

    prompt ... "<tool_call>\\n<function="        (chat_template.py's forced opening; named: "...=NAME>\\n")
    output     NAME>\\n                         (required: one of the tools' names; named: already in the prompt)
               <parameter=KEY>\\nVALUE\\n</parameter>\\n   per property, in the schema's order, the required
                                                          ones always, the others optionally
               </function>\\n</tool_call>
               ( \\n<tool_call>\\n<function=NAME>\\n ... )*  more calls of any tool (parallel calls allowed)
               <stop token>

exactly as the model's chat template writes a call (so the tool-call parser, tool_calls.py, reads every
value back): a parameter whose schema `type` is "string" is raw text (an enum / const: one of its
values; minLength / maxLength / pattern: a bounded text without "<"; else any text without a tag), any
other parameter is JSON (whitespace runs of at most one character) valid against its schema (the
parser reads those as JSON). A string parameter with a `format` is refused, as is any JSON keyword json_schema_support.py does not list.
Pure: builds xgrammar's structural-tag description, compiles nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from xgrammar.structural_tag import (AnyTextFormat, ConstStringFormat, Format, JSONSchemaFormat, OptionalFormat,
                                     OrFormat, RegexFormat, SequenceFormat, StarFormat, StructuralTag)

from nextserve.cluster.engine.json_schema_support import UnsupportedSchemaError, check_schema, enforceable

CALL_END = "</function>\n</tool_call>"
NEXT_CALL = "\n<tool_call>\n<function="
VALUE_TAGS = ["</parameter>", "<parameter=", "</function>", "</tool_call>"]
"""Text a free string value never holds: the parser would read it as structure."""
_STRING_KEYWORDS = frozenset({"type", "enum", "const", "minLength", "maxLength", "pattern"})


def tool_call_tag(tools: Sequence[Mapping[str, Any]], name: str | None, parallel: bool, param: str) -> StructuralTag:
    """The grammar after the forced opening: `name` (a named choice: its call's parameters come first) or
    any tool's call (required); then, when `parallel`, more calls. Raises UnsupportedSchemaError."""
    bodies = {t["function"]["name"]: _parameters(t["function"].get("parameters") or {}, param) for t in tools}
    if name is not None and name not in bodies:
        raise UnsupportedSchemaError(f"tool {name}", "#", param, "the forced tool is not among the tools")
    any_call = OrFormat(elements=[SequenceFormat(elements=[ConstStringFormat(value=f"{n}>\n"), body])
                                  for n, body in bodies.items()])
    first: Format = SequenceFormat(elements=[bodies[name], ConstStringFormat(value=CALL_END)]) if name else \
        SequenceFormat(elements=[any_call, ConstStringFormat(value=CALL_END)])
    if not parallel:
        return StructuralTag(format=first)
    more = StarFormat(content=SequenceFormat(elements=[ConstStringFormat(value=NEXT_CALL), any_call,
                                                       ConstStringFormat(value=CALL_END)]))
    return StructuralTag(format=SequenceFormat(elements=[first, more]))


def _parameters(schema: Mapping[str, Any], param: str) -> Format:
    """A call's parameter blocks for its `parameters` schema."""
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or ())
    keys = list(properties) + sorted(required - set(properties))
    parts: list[Format] = []
    for key in keys:
        block = SequenceFormat(elements=[ConstStringFormat(value=f"<parameter={key}>\n"),
                                         _value(properties.get(key, True), param, f"#/properties/{key}"),
                                         ConstStringFormat(value="\n</parameter>\n")])
        parts.append(block if key in required else OptionalFormat(content=block))
    return SequenceFormat(elements=parts) if parts else ConstStringFormat(value="")


def _value(schema: Any, param: str, path: str) -> Format:
    if not (isinstance(schema, Mapping) and schema.get("type") == "string"):
        check_schema(schema, param, path)
        return JSONSchemaFormat(json_schema=enforceable(schema) if isinstance(schema, (Mapping, bool)) else True,
                                style="json", max_whitespace_cnt=1)
    for keyword in schema:
        if keyword not in _STRING_KEYWORDS and keyword not in ("title", "description", "default", "examples"):
            raise UnsupportedSchemaError(keyword, path, param, "a string tool parameter is raw text; enforced there "
                                         "are enum, const, minLength, maxLength and pattern")
    if "const" in schema:
        return ConstStringFormat(value=str(schema["const"]))
    if "enum" in schema:
        return OrFormat(elements=[ConstStringFormat(value=str(v)) for v in schema["enum"]])
    if "pattern" in schema:
        if "minLength" in schema or "maxLength" in schema:
            raise UnsupportedSchemaError("pattern with minLength/maxLength", path, param,
                                         "fold the length into the pattern")
        return RegexFormat(pattern=str(schema["pattern"]).removeprefix("^").removesuffix("$"))
    if "minLength" in schema or "maxLength" in schema:
        low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
        return RegexFormat(pattern=f"[^<]{{{low},{'' if high is None else int(high)}}}")
    return AnyTextFormat(excludes=VALUE_TAGS)
