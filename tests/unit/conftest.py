"""The unit tier's promise, checked: a test here starts no process and no gRPC server (those belong in
tests/process/ or tests/grpc/); it fails naming what it started."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import grpc
import pytest


class StartedAProcess(AssertionError):
    """A unit test started a process or a server."""


@pytest.fixture(autouse=True)
def _no_processes_or_servers(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[None]:
    def refuse(what: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise StartedAProcess(f"{request.node.nodeid} started {what} {args[:2]!r}: a unit test starts no process"
                                  " or server; move the file to tests/process/ (processes) or tests/grpc/ (gRPC)")
        return refused

    monkeypatch.setattr(subprocess, "Popen", refuse("a process (subprocess.Popen)"))
    monkeypatch.setattr(grpc, "server", refuse("a gRPC server (grpc.server)"))
    monkeypatch.setattr(grpc.aio, "server", refuse("a gRPC server (grpc.aio.server)"))
    yield
