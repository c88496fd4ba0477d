"""The expert service's credential, shared by both ends of proto/expert.proto: experts/server.py installs
the check; the callers (router/channels.py for heads and benchmarks, cluster/control/worker_admin.py for
the controller) send the token.

Every ExpertService method, the data plane included (Dispatch, DispatchStream, Info, Echo, EchoStream,
LoadExperts, DropExperts), must carry the cluster's token as gRPC metadata `authorization: Bearer <token>`;
TokenInterceptor answers UNAUTHENTICATED otherwise, naming what is missing or wrong, before the request is
decoded (a stream is checked once, when it opens: its messages cost nothing more). The token is still
called the "admin token" (AppArgs.admin_token, --admin-token-env): it now covers every call. A new
ExpertService method needs it too. The standard gRPC health service is another service and stays open,
for Kubernetes and Ray probes (it tells only SERVING / NOT_SERVING).

ADMIN_METHODS names the calls that change what a worker holds; the check does not depend on it.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from nextserve.proto import expert_pb2

SERVICE = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"]
ADMIN_METHODS = frozenset({"LoadExperts", "DropExperts"})
"""The calls that change what a worker holds (the controller's); every other call reads or computes."""
AUTHORIZATION_KEY = "authorization"
"""gRPC metadata keys are lower case."""
BEARER_PREFIX = "Bearer "


def admin_metadata(token: str) -> tuple[tuple[str, str]]:
    """The metadata every ExpertService call sends: pass as `metadata=` to the stub call."""
    return ((AUTHORIZATION_KEY, BEARER_PREFIX + token),)


def service_method(full_method: str) -> str | None:
    """'/nextserve.expert.v1.ExpertService/Dispatch' -> 'Dispatch'; None for another service (health)."""
    service, _, name = full_method.lstrip("/").rpartition("/")
    return name if service == SERVICE.full_name else None


def token_problem(method: str, metadata: Iterable[tuple[str, str | bytes]], token: bytes) -> str | None:
    """None when `metadata` carries `token`; else what is missing or wrong, and how to fix it."""
    sent = [value for key, value in metadata if key == AUTHORIZATION_KEY]
    if not sent:
        return (f"{method} needs the cluster's admin token: send gRPC metadata '{AUTHORIZATION_KEY}: "
                f"{BEARER_PREFIX}<token>' (every ExpertService call does; the token `nextserve up` made, "
                f"or the Secret named by admin_token_env)")
    value = sent[0].decode() if isinstance(sent[0], bytes) else sent[0]
    if not value.startswith(BEARER_PREFIX):
        return f"{method}: the '{AUTHORIZATION_KEY}' metadata must read '{BEARER_PREFIX}<token>'"
    if not hmac.compare_digest(value[len(BEARER_PREFIX):].encode(), token):
        return (f"{method}: the admin token sent does not match this worker's; send the token of the cluster "
                f"that started it")
    return None


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets an ExpertService call through only with the worker's token; other services (health) pass."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the admin token is empty; pass a token, or no interceptor to leave the service open")
        self._token = token.encode()

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = service_method(details.method)
        problem = None if method is None else token_problem(method, details.invocation_metadata or (), self._token)
        if problem is None:
            return await continuation(details)
        return _refusal(method or details.method, problem)


def _refusal(method: str, problem: str) -> grpc.RpcMethodHandler:
    """A handler of `method`'s kind (unary or streaming, each way) that answers UNAUTHENTICATED without
    decoding a request (no deserializer: it never reads one)."""
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    descriptor = SERVICE.methods_by_name.get(method)
    streams_in = descriptor is not None and descriptor.client_streaming
    streams_out = descriptor is not None and descriptor.server_streaming
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[(streams_in, streams_out)]
    return make(refuse)
