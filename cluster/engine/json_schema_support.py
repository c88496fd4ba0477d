"""Which JSON Schema keywords a grammar enforces: a schema that uses any other is refused, never half-enforced.

    check_schema(schema, param) -> None, or UnsupportedSchemaError(keyword, path, param)
    enforceable(schema) -> the schema with length-bounded strings as a pattern (see below)

xgrammar turns a schema into a grammar, and silently drops what it cannot express (maxProperties,
uniqueItems, propertyNames, contains, dependentRequired, unevaluated*, multipleOf on numbers, formats it
does not know); it merges `oneOf` into `anyOf` (two alternatives may both match) and does not intersect
`allOf`. An output it produced could then fail the client's own validation, which is worse than a
refusal. So the accepted keywords are a list checked here (tests/unit/test_grammar.py checks that
refused ones are refused and the formats listed are enforced), annotations are ignored as every
validator does, and anything else is a 400 naming the keyword and where it is. Pure: no xgrammar, no engine.

xgrammar 0.2.9 writes a string with minLength / maxLength as up to N of [^"\\\r\n], which lets raw control
characters through (invalid JSON: a seeded output on the tiny model held a raw \\x01). `enforceable` rewrites such
a string as the pattern ^[^\\u0000-\\u001f"\\\\]{min,max}$ (the same lengths, without quotes, backslashes and
control characters: a subset of what the schema allows, so every output still validates); a string with a
pattern and a length bound is refused (fold the length into the pattern).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ENFORCED = frozenset({
    "type", "enum", "const", "anyOf", "$ref", "$defs", "definitions",
    "properties", "required", "additionalProperties", "patternProperties", "minProperties",
    "items", "prefixItems", "minItems", "maxItems",
    "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
})
"""Keywords the grammar enforces (`format` only for FORMATS, `multipleOf` only on integers)."""
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment",
                         "deprecated", "readOnly", "writeOnly", "strict"})
"""Keywords that constrain nothing (validators ignore them too)."""
FORMATS = frozenset({"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri",
                     "uri-reference", "uri-template", "uuid"})
"""String formats the grammar enforces; another format is refused."""
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties")


class UnsupportedSchemaError(ValueError):
    """A schema keyword the grammar cannot enforce; `keyword`, its `path` in the schema, the request `param`."""

    def __init__(self, keyword: str, path: str, param: str, why: str = "") -> None:
        self.keyword, self.path, self.param = keyword, path, param
        detail = f" ({why})" if why else ""
        super().__init__(f"the JSON Schema keyword {keyword!r} at {path} cannot be enforced by this server's "
                         f"grammar{detail}; remove it or check it yourself after generation")


def check_schema(schema: Any, param: str, path: str = "#") -> None:
    """Raise UnsupportedSchemaError for the first keyword under `schema` that the grammar would not enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, Mapping):
        raise UnsupportedSchemaError(type(schema).__name__, path, param, "a schema is an object or a boolean")
    for keyword, value in schema.items():
        where = f"{path}/{keyword}"
        if keyword in ANNOTATIONS:
            continue
        if keyword == "uniqueItems" and value is False:
            continue
        if keyword not in ENFORCED:
            raise UnsupportedSchemaError(keyword, path, param, _hint(keyword))
        if keyword == "format" and value not in FORMATS:
            raise UnsupportedSchemaError(f"format: {value}", path, param,
                                         f"the formats enforced are {', '.join(sorted(FORMATS))}")
        if keyword == "pattern" and ("minLength" in schema or "maxLength" in schema):
            raise UnsupportedSchemaError("pattern with minLength/maxLength", path, param,
                                         "fold the length into the pattern")
        if keyword == "multipleOf" and schema.get("type") != "integer":
            raise UnsupportedSchemaError(keyword, path, param, "enforced on integers only")
        if keyword in _SUBSCHEMA_MAPS and isinstance(value, Mapping):
            for name, sub in value.items():
                check_schema(sub, param, f"{where}/{name}")
        elif keyword in _SUBSCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                check_schema(sub, param, f"{where}/{i}")
        elif keyword in _SUBSCHEMAS and isinstance(value, (Mapping, bool)):
            check_schema(value, param, where)


def enforceable(schema: Any) -> Any:
    """`schema` (checked) with every length-bounded string (no pattern, format, enum or const) as a pattern."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for keyword in _SUBSCHEMA_MAPS:
        if isinstance(out.get(keyword), Mapping):
            out[keyword] = {name: enforceable(sub) for name, sub in out[keyword].items()}
    for keyword in _SUBSCHEMA_LISTS:
        if isinstance(out.get(keyword), list):
            out[keyword] = [enforceable(sub) for sub in out[keyword]]
    for keyword in _SUBSCHEMAS:
        if isinstance(out.get(keyword), Mapping):
            out[keyword] = enforceable(out[keyword])
    if ("minLength" in out or "maxLength" in out) and out.get("type") in ("string", None) \
            and not {"pattern", "format", "enum", "const"} & set(out):
        low, high = int(out.pop("minLength", 0)), out.pop("maxLength", None)
        out["pattern"] = f'^[^\\u0000-\\u001f"\\\\]{{{low},{"" if high is None else int(high)}}}$'
    return out


def _hint(keyword: str) -> str:
    if keyword == "oneOf":
        return "use anyOf: the output then matches at least one alternative"
    if keyword == "allOf":
        return "merge the alternatives into one schema"
    return ""
