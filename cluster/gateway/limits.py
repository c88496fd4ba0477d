"""`GatewayLimits`: what one gateway replica allows a client. Its own module (plain dataclass, no FastAPI,
no tokenizer) so that AppArgs, and with it the CLI's parser, reads its defaults without importing the
gateway; cluster/gateway/admission.py applies it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GatewayLimits:
    """What one gateway replica allows a client (the head's queue bound is SchedulerConfig's)."""
    max_request_body_bytes: int = 32 * 2**20
    """Largest request body read, in bytes; past it: 413. 32 MiB is Anthropic's own Messages limit, room for
    a long agent conversation with its tools (a 256k-token context is ~1 MiB of text)."""
    stream_idle_timeout_s: float = 60.0
    """Seconds a streaming client may read nothing while its output waits; then it is treated as gone (its
    request aborted, slot and blocks freed). A minute outlasts any pause of a live client's reader."""

    def __post_init__(self) -> None:
        if self.max_request_body_bytes < 1 or self.stream_idle_timeout_s <= 0:
            raise ValueError(f"max_request_body_bytes ({self.max_request_body_bytes}) and stream_idle_timeout_s "
                             f"({self.stream_idle_timeout_s}) must be positive")
