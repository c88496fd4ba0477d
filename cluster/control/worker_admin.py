"""The controller's side of the expert service: load, drop and inspect a worker's experts over gRPC."""

from __future__ import annotations

import grpc

from nextserve.proto import expert_pb2, expert_pb2_grpc
from nextserve.proto.codec import MESSAGE_SIZE_OPTIONS

ADMIN_TIMEOUT_S = 600.0
"""LoadExperts reads weights from the checkpoint: minutes for a large share of the 80B model."""

def _keys(pairs: list[tuple[int, int]]) -> list[expert_pb2.ExpertKey]:
    return [expert_pb2.ExpertKey(layer=layer, expert=expert) for layer, expert in sorted(pairs)]


def _call(address: str, method: str, request: object, timeout_s: float) -> expert_pb2.InfoReply:
    with grpc.insecure_channel(address, options=MESSAGE_SIZE_OPTIONS) as channel:
        stub = expert_pb2_grpc.ExpertServiceStub(channel)
        return getattr(stub, method)(request, timeout=timeout_s)


def load_experts(address: str, pairs: list[tuple[int, int]], epoch: int) -> expert_pb2.InfoReply:
    request = expert_pb2.LoadExpertsRequest(experts=_keys(pairs), epoch=epoch)
    return _call(address, "LoadExperts", request, ADMIN_TIMEOUT_S)


def drop_experts(address: str, pairs: list[tuple[int, int]], epoch: int) -> expert_pb2.InfoReply:
    request = expert_pb2.DropExpertsRequest(experts=_keys(pairs), epoch=epoch)
    return _call(address, "DropExperts", request, 60.0)


def info(address: str, timeout_s: float = 10.0) -> expert_pb2.InfoReply:
    return _call(address, "Info", expert_pb2.InfoRequest(), timeout_s)


def tokens_served(reply: expert_pb2.InfoReply) -> dict[tuple[int, int], int]:
    return {(e.layer, e.expert): e.tokens_served for e in reply.experts}
