"""What tests read out of the official openai SDK's chat completion replies."""

from __future__ import annotations

import json
from typing import Any


def tool_calls(message: Any) -> list[tuple[str, dict[str, Any]]]:
    """(name, parsed arguments) of each tool call a chat completion's message carries, in order."""
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
