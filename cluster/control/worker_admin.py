"""The controller's side of the expert service: load, drop and inspect a worker's experts over gRPC.

Every call carries the cluster's admin token (proto/admin_auth.py): a worker answers UNAUTHENTICATED
without it, Info included."""

from __future__ import annotations

import grpc

from nextserve.proto import expert_pb2, expert_pb2_grpc
from nextserve.proto.admin_auth import admin_metadata
from nextserve.proto.codec import MESSAGE_SIZE_OPTIONS

ADMIN_TIMEOUT_S = 600.0
"""LoadExperts reads weights from the checkpoint: minutes for a large share of the 80B model."""

def _keys(pairs: list[tuple[int, int]]) -> list[expert_pb2.ExpertKey]:
    return [expert_pb2.ExpertKey(layer=layer, expert=expert) for layer, expert in sorted(pairs)]


def _call(address: str, method: str, request: object, timeout_s: float,
          admin_token: str | None) -> expert_pb2.InfoReply:
    metadata = None if admin_token is None else admin_metadata(admin_token)
    with grpc.insecure_channel(address, options=MESSAGE_SIZE_OPTIONS) as channel:
        stub = expert_pb2_grpc.ExpertServiceStub(channel)
        return getattr(stub, method)(request, timeout=timeout_s, metadata=metadata)


def load_experts(address: str, pairs: list[tuple[int, int]], epoch: int, admin_token: str) -> expert_pb2.InfoReply:
    request = expert_pb2.LoadExpertsRequest(experts=_keys(pairs), epoch=epoch)
    return _call(address, "LoadExperts", request, ADMIN_TIMEOUT_S, admin_token)


def drop_experts(address: str, pairs: list[tuple[int, int]], epoch: int, admin_token: str) -> expert_pb2.InfoReply:
    request = expert_pb2.DropExpertsRequest(experts=_keys(pairs), epoch=epoch)
    return _call(address, "DropExperts", request, 60.0, admin_token)


def info(address: str, admin_token: str | None, timeout_s: float = 10.0) -> expert_pb2.InfoReply:
    """`admin_token`: the cluster's (None only for a worker started without one)."""
    return _call(address, "Info", expert_pb2.InfoRequest(), timeout_s, admin_token)


def tokens_served(reply: expert_pb2.InfoReply) -> dict[tuple[int, int], int]:
    return {(e.layer, e.expert): e.tokens_served for e in reply.experts}
