"""What the gateway refuses and cuts off, over real HTTP against the real engine on the tiny model: a full
queue (429 / Anthropic 529 with Retry-After, the admitted requests completing exactly), an oversized body
(413 in each API's shape), a prompt past the context (refused before the engine sees it), and a streaming
client that stops reading (a raw socket with a small receive buffer: its request is aborted, its slot and
blocks freed)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_local_engine import Server, TinyEngine, sse_events, wait_until
from nextserve.cluster.engine.contract import RETRY_AFTER_S, EngineRequest, StepOutput
from nextserve.cluster.engine.scheduler import SchedulerConfig
from nextserve.cluster.gateway.admission import GatewayLimits
from nextserve.model.sampling import SamplingParams

MODEL = "tiny"
CONTEXT = 4096
MAX_NUM_SEQS, MAX_QUEUED = 2, 1
BODY_LIMIT = 64 * 1024
"""Room for a prompt of CONTEXT token ids."""
IDLE_TIMEOUT_S = 1.0
CMPL, MESSAGES = "/v1/completions", "/v1/messages"


@pytest.fixture(scope="module")
def server(tiny_dir: Path) -> Iterator[Server]:
    engine = TinyEngine(tiny_dir, CONTEXT, SchedulerConfig(max_num_seqs=MAX_NUM_SEQS, max_queued_requests=MAX_QUEUED))
    with Server(engine, MODEL, limits=GatewayLimits(BODY_LIMIT, IDLE_TIMEOUT_S)) as s:
        yield s


def completion(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "def main(", "max_tokens": 4, "temperature": 0, **extra}


def message(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], **extra}


def _whole_text(server: Server, ids: list[int]) -> str:
    """The text of `ids` up to the last whole character (a stream never ends inside one)."""
    texts = (str(server.engine.tokenizer.decode(ids[:n], skip_special_tokens=True)) for n in range(len(ids), -1, -1))
    return next(t for t in texts if not t.endswith("\ufffd"))


def test_a_full_queue_refuses_at_once_with_retry_after_and_the_admitted_complete_exactly(server: Server) -> None:
    tok, engine, n = server.engine.tokenizer, server.engine.engine, 40
    prompts = [tok.encode(p, add_special_tokens=False) for p in ("import os\n", "class Tree:", "for i in")]

    async def run() -> tuple[list[str], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            async def admitted(prompt: list[int]) -> str:
                body = completion(prompt=prompt, max_tokens=n, ignore_eos=True, stream=True)
                r = await client.post(CMPL, json=body)
                assert r.status_code == 200, r.text
                return "".join(json.loads(e)["choices"][0]["text"] for e in sse_events(r.text)[:-1])

            tasks = [asyncio.create_task(admitted(p)) for p in prompts]
            while (s := engine.stats()).num_running + s.num_waiting < len(prompts):  # 2 running, 1 waiting
                assert not any(t.done() for t in tasks)
                await asyncio.sleep(0.01)
            refused = [await client.post(CMPL, json=completion()),
                       await client.post("/v1/chat/completions", json={**message(), "temperature": 0}),
                       await client.post(MESSAGES, json=message())]
            assert not all(t.done() for t in tasks)  # refused while the queue was full, not after
            return list(await asyncio.gather(*tasks)), refused

    texts, (openai_cmpl, openai_chat, anthropic) = asyncio.run(run())
    for r in (openai_cmpl, openai_chat):
        assert r.status_code == 429 and r.headers["retry-after"] == str(RETRY_AFTER_S), r.text
        error = r.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "server_overloaded"
        assert "--max-queued-requests" in error["message"]
    assert anthropic.status_code == 529 and anthropic.headers["retry-after"] == str(RETRY_AFTER_S)
    assert anthropic.json()["type"] == "error" and anthropic.json()["error"]["type"] == "overloaded_error"
    for prompt, text in zip(prompts, texts):
        assert text == _whole_text(server, server.engine.reference(prompt, SamplingParams(max_tokens=n,
                                                                                           ignore_eos=True)))
    stats = server.engine.engine.stats()
    assert stats.num_running == stats.num_waiting == stats.slots_used == stats.blocks_used == 0
    assert httpx.post(f"{server.url}{CMPL}", json=completion(), timeout=60).status_code == 200  # drained: admitted


def test_a_body_past_the_limit_is_413_in_each_apis_shape(server: Server) -> None:
    big = completion(prompt="x" * BODY_LIMIT)
    r = httpx.post(f"{server.url}{CMPL}", json=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert "--max-request-body-bytes" in r.json()["error"]["message"] and "retry-after" not in r.headers
    r = httpx.post(f"{server.url}{MESSAGES}", json=message(system="x" * BODY_LIMIT), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large", r.text
    r = httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, "input": "x" * BODY_LIMIT}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
        body = json.dumps(big).encode()
        for i in range(0, len(body), 8192):
            yield body[i:i + 8192]

    r = httpx.post(f"{server.url}{CMPL}", content=chunked(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert httpx.post(f"{server.url}{CMPL}", json=completion(), timeout=60).status_code == 200


def test_a_prompt_past_the_context_is_refused_before_the_engine_sees_it(server: Server,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    client, seen = server.engine.client, []
    generate = client.generate

    def recording(request: EngineRequest) -> AsyncGenerator[StepOutput, None]:
        seen.append(request.request_id)
        return generate(request)

    monkeypatch.setattr(client, "generate", recording)
    r = httpx.post(f"{server.url}{CMPL}", json=completion(prompt=[7] * CONTEXT), timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded" and r.json()["error"]["param"] == "prompt"
    assert seen == []
    r = httpx.post(f"{server.url}{CMPL}", json=completion(prompt=[7] * (CONTEXT - 1), max_tokens=1), timeout=120)
    assert r.status_code == 200 and len(seen) == 1


def test_a_client_that_stops_reading_is_cut_off_and_its_slot_freed(server: Server) -> None:
    engine = server.engine.engine
    before = len(engine.aborted)
    # 20 logprobs per token: ~2 KB a chunk, so the buffers fill in some 50 tokens
    body = json.dumps(completion(max_tokens=CONTEXT - 16, ignore_eos=True, stream=True, logprobs=20)).encode()
    host, port = server.url.removeprefix("http://").split(":")
    # Small kernel buffers both ends (the server's accepted socket inherits its listener's send buffer, and a
    # set size stops Linux growing it to MiBs on loopback): what fills is then mostly the server's own.
    server.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    try:
        sock.connect((host, int(port)))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        head = sock.recv(1024)
        assert head.startswith(b"HTTP/1.1 200"), head
        # ...and read nothing more: the buffers fill, then the idle timeout ends the request in the engine
        wait_until(lambda: len(engine.aborted) > before, "the unread stream was not aborted", timeout_s=60)
        wait_until(lambda: engine.stats().num_running == 0, "the aborted request still runs")
        stats = engine.stats()
        assert stats.slots_used == stats.blocks_used == stats.num_waiting == 0
    finally:
        sock.close()
    r = httpx.post(f"{server.url}{CMPL}", json=completion(stream=True), timeout=60)  # a reading client is not cut
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
