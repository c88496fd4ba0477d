"""One Dispatch call on a worker: validate and decode the request, run the experts, encode the reply.

    DispatchRequest --decode_dispatch--> DispatchBatch --compute_partial--> [t, H] --> DispatchReply

Requests and replies are CPU bytes whatever device the worker computes on.
Every check a client can fail raises `InvalidDispatch` naming the bad value (the servicer turns it
into INVALID_ARGUMENT); a request for experts this worker does not hold (now) raises `ExpertsNotHeld`
(FAILED_PRECONDITION): the caller's placement and this worker disagree, e.g. a worker Ray restarted
with an older assignment, so the caller fails over to another replica while the controller re-syncs it. The math is `model.layers.experts.experts_forward`, the same as a local run.
Letters: t = tokens in the request, H = hidden, P = (token, expert) pairs, n = experts held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nextserve.experts.store import LayerTable
from nextserve.model.layers.experts import Assignments, experts_forward
from nextserve.proto import expert_pb2
from nextserve.proto.codec import INDEX_DTYPE, TORCH_TO_DTYPE, frombuffer

INDEX_BYTES = INDEX_DTYPE.itemsize


class InvalidDispatch(ValueError):
    """A Dispatch request this worker cannot serve; the message names the value."""


class ExpertsNotHeld(InvalidDispatch):
    """A well-formed request for a layer or experts this worker does not hold (a placement mismatch)."""


@dataclass(frozen=True, slots=True)
class DispatchBatch:
    layer: int
    table: LayerTable
    hidden: Tensor   # [t, H]
    token: Tensor    # [P] int64 in [0, t)
    experts: Tensor  # [P] int64 global expert ids
    rows: Tensor     # [P] int64 rows of table
    weights: Tensor  # [P]


def _check_sizes(req: expert_pb2.DispatchRequest, hidden: bytes, counts: bytes, dtype: torch.dtype,
                 hidden_size: int) -> None:
    """dtype, shape and the byte counts of hidden and counts against each other (hidden / counts: the
    fields' bytes, read once by the caller: each read of a bytes field copies it)."""
    if req.dtype != TORCH_TO_DTYPE[dtype]:
        sent = expert_pb2.DType.Name(req.dtype) if req.dtype in expert_pb2.DType.values() else str(req.dtype)
        raise InvalidDispatch(f"dtype {sent} does not match the worker's "
                              f"{expert_pb2.DType.Name(TORCH_TO_DTYPE[dtype])}; send the model's dtype")
    if req.hidden_size != hidden_size:
        raise InvalidDispatch(f"hidden_size {req.hidden_size} does not match the model's {hidden_size}")
    size, t = dtype.itemsize, req.num_tokens
    if len(hidden) != t * hidden_size * size:
        raise InvalidDispatch(f"hidden has {len(hidden)} bytes; num_tokens {t} x hidden_size "
                              f"{hidden_size} x {size} bytes needs {t * hidden_size * size}")
    if len(counts) != t * INDEX_BYTES:
        raise InvalidDispatch(f"counts has {len(counts)} bytes; num_tokens {t} x {INDEX_BYTES} bytes (int32) "
                              f"needs {t * INDEX_BYTES}")


def _check_pairs(counts: Tensor, expert_ids: bytes, weights: bytes, dtype: torch.dtype) -> int:
    """counts [t] int32 >= 1 each; the pair arrays' byte counts against sum(counts) -> the pairs P."""
    if counts.numel() and int(counts.min()) < 1:
        i = int((counts < 1).nonzero()[0])
        raise InvalidDispatch(f"counts[{i}] is {int(counts[i])}; every token sent needs >= 1 (expert, weight) pair")
    num_pairs = int(counts.sum())
    if len(expert_ids) != num_pairs * INDEX_BYTES:
        raise InvalidDispatch(f"expert_ids has {len(expert_ids)} bytes; sum(counts) {num_pairs} pairs x "
                              f"{INDEX_BYTES} bytes (int32) needs {num_pairs * INDEX_BYTES}")
    if len(weights) != num_pairs * dtype.itemsize:
        raise InvalidDispatch(f"weights has {len(weights)} bytes; {num_pairs} pairs x {dtype.itemsize} bytes "
                              f"needs {num_pairs * dtype.itemsize}")
    return num_pairs


def decode_dispatch(req: expert_pb2.DispatchRequest, tables: dict[int, LayerTable], dtype: torch.dtype,
                    hidden_size: int, num_experts: int) -> DispatchBatch:
    """Validate and view the request's bytes as tensors: no Python work per token or pair."""
    table = tables.get(req.layer)
    if table is None:
        raise ExpertsNotHeld(f"layer {req.layer} is not served by this worker (layers held: {sorted(tables)})")
    hidden_bytes, count_bytes, id_bytes, weight_bytes = req.hidden, req.counts, req.expert_ids, req.weights
    _check_sizes(req, hidden_bytes, count_bytes, dtype, hidden_size)
    counts = frombuffer(count_bytes, INDEX_DTYPE)  # [t]
    _check_pairs(counts, id_bytes, weight_bytes, dtype)
    experts = frombuffer(id_bytes, INDEX_DTYPE).to(torch.int64)  # [P]
    if experts.numel():
        low, high = torch.aminmax(experts)
        if int(low) < 0 or int(high) >= num_experts:
            bad = int(experts[(experts < 0) | (experts >= num_experts)][0])
            raise InvalidDispatch(f"expert_ids holds {bad} (layer {req.layer}), outside [0, {num_experts}); "
                                  f"send global expert ids of the model")
    rows = table.global_to_row[experts]  # [P]
    if bool((rows < 0).any()):
        bad = int(experts[rows < 0][0])
        raise ExpertsNotHeld(f"expert {bad} of layer {req.layer} is not held by this worker")
    weights = frombuffer(weight_bytes, dtype)  # [P]
    finite = torch.isfinite(weights)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise InvalidDispatch(f"weights[{i}] is {float(weights[i])} (expert {int(experts[i])}); "
                              f"routing weights must be finite")
    t = req.num_tokens
    hidden = frombuffer(hidden_bytes, dtype).view(t, hidden_size)  # [t, H]
    token = torch.repeat_interleave(torch.arange(t), counts.to(torch.int64))  # [P]
    return DispatchBatch(req.layer, table, hidden, token, experts, rows, weights)


def compute_partial(batch: DispatchBatch) -> Tensor:
    """[t, H] on the CPU: per token, the weighted sum of its experts held here. The math runs where the
    weights are (the decoded request is moved there and the result back; both are no-ops on a CPU)."""
    device = batch.table.gate_up.device
    assign = Assignments(token=batch.token.to(device), expert=batch.rows.to(device),
                         weight=batch.weights.to(device))
    return experts_forward(batch.hidden.to(device), assign, batch.table.gate_up, batch.table.down).cpu()
