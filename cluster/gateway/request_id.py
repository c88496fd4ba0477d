"""The request id: one per HTTP request, in the `x-request-id` response header and in the logs for it.

    client x-request-id (if sane: 1-128 of [A-Za-z0-9._:-]) or a fresh uuid4 hex
      -> current_request_id() for anything logged while serving it (the gateway logs it with the engine
         request ids it starts, and with any failure), and the response's `x-request-id` header

A client error never carries more than a stable message; this id is how an operator finds the rest.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

HEADER = "x-request-id"
_SANE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_current: contextvars.ContextVar[str] = contextvars.ContextVar("nextserve_request_id", default="-")


def current_request_id() -> str:
    """The id of the HTTP request being served in this context ("-" outside one)."""
    return _current.get()


def request_id_from(client_value: str | None) -> str:
    """The client's id when it is sane (an id, not a payload for the logs), else a fresh one."""
    if client_value is not None and _SANE.fullmatch(client_value):
        return client_value
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Give every HTTP request its id (the outermost middleware, so every response carries the header)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(HEADER.encode())
        request_id = request_id_from(None if sent is None else sent.decode("latin-1"))
        token = _current.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER.encode()]
                message = {**message, "headers": [*headers, (HEADER.encode(), request_id.encode())]}
                if message["status"] >= 500:
                    log.warning("request %s: %s %s answered %d", request_id, scope.get("method"),
                                scope.get("path"), message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)
