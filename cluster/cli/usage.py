"""`UsageError`: a command line nextserve cannot act on. `main` prints it as one line, exit status 2."""

from __future__ import annotations


class UsageError(ValueError):
    """A command line nextserve cannot act on; the message names the value and the fix."""
