"""What both ends of proto/expert.proto share, hand-written beside the generated modules: the dtype
enum <-> torch, tensors and index arrays <-> raw row-major bytes, status codes in replies, and the
message size limit.

router/ and experts/ never import each other; both import this.
"""

from __future__ import annotations

import warnings

import grpc
import torch
from torch import Tensor

from nextserve.proto import expert_pb2

DTYPE_TO_TORCH = {expert_pb2.DTYPE_FLOAT32: torch.float32, expert_pb2.DTYPE_BFLOAT16: torch.bfloat16}
TORCH_TO_DTYPE = {v: k for k, v in DTYPE_TO_TORCH.items()}

INDEX_DTYPE = torch.int32
"""DispatchRequest's counts and expert_ids: raw little-endian int32 (a real layer has 512 experts)."""

STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}
"""DispatchReply.error_code (the number gRPC puts on the wire for a status) -> grpc.StatusCode."""

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""Both directions, on workers and heads. A Qwen3-Next prefill batch of 16384 tokens is 16384 x 2048
x 4 B = 128 MiB of float32 hidden states (64 MiB in bfloat16) plus ~50 B/token of expert ids and
weights; 256 MiB leaves 2x headroom. gRPC's default (4 MiB receive) would cap a bf16 batch at ~1000
tokens."""
MESSAGE_SIZE_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
"""The callers' (heads', the controller's) limits; a worker receives at most `dispatch_message_limit`."""

DEFAULT_MAX_DISPATCH_TOKENS = 8192
"""Tokens in the largest Dispatch a worker takes when nobody says (a worker started by hand, a benchmark);
a cluster's workers are sized from the heads' step (AppArgs.max_tokens_per_step)."""
MESSAGE_LIMIT_FLOOR = 4 * 1024 * 1024
"""gRPC's own default receive limit: a worker never accepts less (small models, small steps)."""


def dispatch_message_limit(max_tokens: int, hidden_size: int, experts_per_token: int, dtype_bytes: int) -> int:
    """Bytes of the largest legitimate DispatchRequest (and the reply, which is smaller) of `max_tokens`
    tokens, with 2x margin: hidden [t, H] x dtype, weights [t * k] x dtype, counts [t] and expert ids
    [t * k] as int32, protobuf framing. A worker receives nothing larger (RESOURCE_EXHAUSTED), and Echo
    replies nothing larger. E.g. Qwen3-Next (H = 2048, k = 10), 512 tokens in bfloat16: 2.1 MB -> 4.3 MB."""
    pairs = max_tokens * experts_per_token
    largest = max_tokens * hidden_size * dtype_bytes + pairs * (dtype_bytes + 4) + max_tokens * 4 + 1024
    return max(2 * largest, MESSAGE_LIMIT_FLOOR)

# Message bytes are immutable, so torch warns that a view of them is not writable. The views are only
# ever read; filtered once here (catch_warnings per call would swap the process's filters from
# several threads at once).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def frombuffer(data: bytes, dtype: torch.dtype) -> Tensor:
    """A read-only 1-D view of `data` (no copy)."""
    return torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)


def tensor_bytes(t: Tensor) -> bytes:
    """Raw row-major bytes of any dtype (bfloat16 included, which numpy lacks)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
