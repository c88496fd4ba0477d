"""A request body as a JSON object: the one decoding every API shares (each maps the error to its shape), and
StrictModel, the base of their request models.

Every way a body can be wrong is a BodyError (the API's 400): not JSON, not UTF-8, an integer past Python's
digit limit, nesting deeper than MAX_JSON_DEPTH (a 40,000-deep body would otherwise exhaust the parser's
recursion, and a deep one that parses would exhaust the validators' or the chat template's), not an object.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

MAX_JSON_DEPTH = 64
"""Nesting levels of arrays and objects a body may hold (the body itself is level 1): far more than any
request needs (a tool's JSON schema nests a few levels), far less than Python's recursion limit."""


class BodyError(ValueError):
    """The body is not a JSON object; the message says what it is instead."""


def json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except RecursionError:
        raise BodyError(f"the request body nests arrays or objects deeper than {MAX_JSON_DEPTH} levels; "
                        f"flatten it") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BodyError(f"the request body is not valid JSON: {e}") from None
    except ValueError as e:  # e.g. an integer literal past Python's 4300-digit limit
        raise BodyError(f"the request body holds a value JSON decoding refuses: {e}") from None
    if not isinstance(data, dict):
        raise BodyError(f"the request body must be a JSON object, got {type(data).__name__}")
    if json_depth(data) > MAX_JSON_DEPTH:
        raise BodyError(f"the request body nests arrays or objects deeper than {MAX_JSON_DEPTH} levels; "
                        f"flatten it")
    return data


def json_depth(value: Any) -> int:
    """Nesting levels of arrays and objects in decoded JSON (a scalar is 0), without recursing."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


class StrictModel(BaseModel):
    """A request model: strict ("5" is not an int, 1 is not a bool), extra fields ignored (clients send many)."""
    model_config = ConfigDict(strict=True, extra="ignore")
