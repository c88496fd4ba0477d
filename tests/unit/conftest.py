"""The unit tier's promise, checked: a test here starts no process and no gRPC server (those belong in
tests/process/ or tests/grpc/); it fails naming what it started. And the tier's one gateway: the real app
over the real engine on the tiny checkpoint (context 128), in uvicorn on a loopback port in this process,
shared by every HTTP test that needs no settings of its own (one model load for all of them)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from gateway_local_engine import Server, TinyEngine

TINY_SERVER_CONTEXT = 128
"""The shared gateway's max_model_len: small, so over-long cases are cheap."""


@pytest.fixture(scope="session")
def server(tiny_dir: Path) -> Iterator[Server]:
    """The shared gateway (model name "tiny", no API key). A test that arms a fault or shuts something
    down on it restores it; one that needs other settings starts a Server of its own."""
    with Server(TinyEngine(tiny_dir, TINY_SERVER_CONTEXT), "tiny") as s:
        yield s


@pytest.fixture(scope="session")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


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
