"""Where checkpoints come from on the command line: a directory, or `tiny` made on first use.

Read by the CLI entrypoints only (they are the one place that reads the environment). The parser reads
TINY; model/tiny.py (transformers, to write the tiny) is imported when a command resolves `tiny`.
"""

from __future__ import annotations

import os
from pathlib import Path

from nextserve.model.checkpoint import CheckpointError


TINY = "tiny"
"""The model name that stands for the tiny test checkpoint (`nextserve up`'s and `generate`'s default)."""


def cache_dir() -> Path:
    """Where `--model tiny` lives: $NEXTSERVE_CACHE, else $XDG_CACHE_HOME/nextserve, else ~/.cache/nextserve."""
    if os.environ.get("NEXTSERVE_CACHE"):
        return Path(os.environ["NEXTSERVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nextserve"


def resolve_model(name: str) -> Path:
    if name == TINY:
        from nextserve.model.tiny import ensure_tiny  # transformers: only when `tiny` is asked for

        return ensure_tiny(cache_dir())
    path = Path(name)
    if not (path / "config.json").exists():
        raise CheckpointError(f"--model {name!r} is not a checkpoint directory (no config.json); "
                              f"pass a Hugging Face checkpoint dir or 'tiny'")
    return path
