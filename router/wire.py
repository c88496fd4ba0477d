"""Router side of the wire format (proto/expert.proto): WorkerBatch -> DispatchRequest, reply -> [t, H].

Tensors travel as raw row-major bytes in the model dtype, counts and expert ids as int32 bytes. The worker's side is experts/compute.py
(kept separate: router/ and experts/ both depend on proto/ and model/, never on each other).
Letters: t = tokens in the request, H = hidden, P = pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nextserve.proto import expert_pb2
from nextserve.proto.codec import INDEX_DTYPE, TORCH_TO_DTYPE, frombuffer, tensor_bytes
from nextserve.router.plan import WorkerBatch


def encode_request(layer: int, epoch: int, hidden: Tensor, batch: WorkerBatch,
                   dtype: torch.dtype) -> expert_pb2.DispatchRequest:
    """hidden [T, H] of the whole layer batch; only batch.tokens rows are sent, each once."""
    return expert_pb2.DispatchRequest(
        layer=layer, epoch=epoch, dtype=TORCH_TO_DTYPE[dtype], num_tokens=batch.tokens.numel(),
        hidden_size=hidden.shape[1], hidden=tensor_bytes(hidden[batch.tokens]),  # [t, H]
        counts=tensor_bytes(batch.counts.to(INDEX_DTYPE)), expert_ids=tensor_bytes(batch.experts.to(INDEX_DTYPE)),
        weights=tensor_bytes(batch.weights.to(dtype)))  # [t], [P], [P]


def decode_partial(reply: expert_pb2.DispatchReply, num_tokens: int, hidden_size: int,
                   dtype: torch.dtype) -> Tensor:
    """[t, H] read-only view of the reply bytes (only ever read by index_add_)."""
    expected = num_tokens * hidden_size * dtype.itemsize
    partial = reply.partial  # each read of a bytes field copies it: read once
    if len(partial) != expected or reply.dtype != TORCH_TO_DTYPE[dtype]:
        raise ValueError(f"worker replied {len(partial)} bytes of {expert_pb2.DType.Name(reply.dtype)}; "
                         f"expected {expected} bytes of {dtype} for [{num_tokens}, {hidden_size}]")
    return frombuffer(partial, dtype).view(num_tokens, hidden_size)
