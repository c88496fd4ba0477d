"""The expert service's admin calls and the credential they carry, shared by both ends of
proto/expert.proto: experts/server.py installs the check, cluster/control/worker_admin.py sends the token.

Every ExpertService method that is not in OPEN_METHODS changes what a worker holds (LoadExperts,
DropExperts) and must carry the cluster's admin token as gRPC metadata `authorization: Bearer <token>`;
AdminTokenInterceptor answers UNAUTHENTICATED otherwise, naming what is missing or wrong. A new method
is an admin method unless it is added to OPEN_METHODS. The data plane stays open: heads call Dispatch
on every MoE layer, the controller reads Info for load statistics, Echo is the benchmarks' floor, and
the standard health service is another service (not checked).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable

import grpc

from nextserve.proto import expert_pb2

SERVICE = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"]
OPEN_METHODS = frozenset({"Dispatch", "DispatchStream", "Info", "Echo", "EchoStream"})
"""Callable without the token: they change no placement (Dispatch only counts the tokens it serves)."""
ADMIN_METHODS = frozenset(m.name for m in SERVICE.methods) - OPEN_METHODS
AUTHORIZATION_KEY = "authorization"
"""gRPC metadata keys are lower case."""
BEARER_PREFIX = "Bearer "


def admin_metadata(token: str) -> tuple[tuple[str, str]]:
    """The metadata an admin call sends: pass as `metadata=` to the stub call."""
    return ((AUTHORIZATION_KEY, BEARER_PREFIX + token),)


def admin_method(full_method: str) -> str | None:
    """'/nextserve.expert.v1.ExpertService/LoadExperts' -> 'LoadExperts'; None for a call that needs no token."""
    service, _, name = full_method.lstrip("/").rpartition("/")
    return name if service == SERVICE.full_name and name not in OPEN_METHODS else None


def token_problem(method: str, metadata: Iterable[tuple[str, str | bytes]], token: bytes) -> str | None:
    """None when `metadata` carries `token`; else what is missing or wrong, and how to fix it."""
    sent = [value for key, value in metadata if key == AUTHORIZATION_KEY]
    if not sent:
        return (f"{method} changes what this expert worker holds and needs the cluster's admin token: send "
                f"gRPC metadata '{AUTHORIZATION_KEY}: {BEARER_PREFIX}<token>' (the token `nextserve up` made, "
                f"or the Secret named by admin_token_env)")
    value = sent[0].decode() if isinstance(sent[0], bytes) else sent[0]
    if not value.startswith(BEARER_PREFIX):
        return f"{method}: the '{AUTHORIZATION_KEY}' metadata must read '{BEARER_PREFIX}<token>'"
    if not hmac.compare_digest(value[len(BEARER_PREFIX):].encode(), token):
        return (f"{method}: the admin token sent does not match this worker's; send the token of the cluster "
                f"that started it")
    return None


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets an admin call through only with the worker's token; every other call passes untouched."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the admin token is empty; pass a token, or no interceptor to leave admin calls open")
        self._token = token.encode()

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = admin_method(details.method)
        problem = None if method is None else token_problem(method, details.invocation_metadata or (), self._token)
        if problem is None:
            return await continuation(details)
        return _refusal(problem)


def _refusal(problem: str) -> grpc.RpcMethodHandler:
    """A unary handler (every admin method is unary, tests/test_experts_worker.py) that answers UNAUTHENTICATED
    without decoding the request."""
    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
    return grpc.unary_unary_rpc_method_handler(refuse)
