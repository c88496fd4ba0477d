"""A request body as a JSON object: the one decoding both APIs share (each maps the error to its shape)."""

from __future__ import annotations

import json
from typing import Any


class BodyError(ValueError):
    """The body is not a JSON object; the message says what it is instead."""


def json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BodyError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BodyError(f"the request body must be a JSON object, got {type(data).__name__}")
    return data
