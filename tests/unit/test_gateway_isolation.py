"""Safe to share, over real HTTP on the tiny model: one hostile request ends only itself; client mistakes are
4xx in the API's shape; errors carry no internals; every response carries x-request-id."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest

from gateway_local_engine import Server, sse_events

MODEL = "tiny"
CONTEXT = 128
CMPL, CHAT, MSGS, COUNT = "/v1/completions", "/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens"
RESP = "/v1/responses"
GREEDY_TOKENS = 24


def body_for(path: str, **extra: Any) -> dict[str, Any]:
    if path == CMPL:
        return {"model": MODEL, "prompt": "def main(", "max_tokens": 4, "temperature": 0, **extra}
    if path == RESP:
        return {"model": MODEL, "input": "hi", "max_output_tokens": 4, "temperature": 0, **extra}
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
            **extra}


def is_api_error(path: str, r: httpx.Response) -> bool:
    data = r.json()
    if path.startswith(MSGS):
        return data["type"] == "error" and set(data["error"]) == {"type", "message"}
    return set(data["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("path", [CMPL, CHAT, MSGS, COUNT, RESP])
@pytest.mark.parametrize("depth", [40_000, 65])
def test_deep_json_is_a_400_in_the_apis_shape(http: httpx.Client, path: str, depth: int) -> None:
    deep = "[" * depth + "]" * depth
    raw = json.dumps(body_for(path))[:-1] + f', "metadata": {deep}}}'
    r = http.post(path, content=raw.encode())
    assert r.status_code == 400 and is_api_error(path, r), r.text
    assert "deeper than 64" in r.text
    assert http.post(path, json=body_for(path)).status_code == 200


@pytest.mark.parametrize("path", [CMPL, CHAT, MSGS, RESP])
def test_a_huge_integer_literal_is_a_400(http: httpx.Client, path: str) -> None:
    raw = json.dumps(body_for(path))[:-1] + ', "max_tokens": ' + "9" * 5000 + "}"
    r = http.post(path, content=raw.encode())
    assert r.status_code == 400 and is_api_error(path, r), r.text


def test_the_largest_seed_with_two_choices_wraps(http: httpx.Client) -> None:
    sampled = {"temperature": 1.0, "max_tokens": 8, "ignore_eos": True}
    r = http.post(CMPL, json=body_for(CMPL, seed=2**64 - 1, n=2, **sampled))
    assert r.status_code == 200, r.text
    second = r.json()["choices"][1]["text"]
    wrapped = http.post(CMPL, json=body_for(CMPL, seed=0, **sampled))  # choice 1 seeds with 2**64 mod 2**64
    assert wrapped.status_code == 200 and wrapped.json()["choices"][0]["text"] == second
    for bad in (2**64, -(2**63) - 1):
        r = http.post(CMPL, json=body_for(CMPL, seed=bad))
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text


def _hostile(path: str) -> dict[str, Any]:
    """A request with temperature 1e-300 (inside the documented range): greedy."""
    if path == MSGS:
        return body_for(path, temperature=1e-300, max_tokens=6, stream=True)
    return body_for(path, temperature=1e-300, max_tokens=6, n=4, stream=True)


def _stream_text(path: str, r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    if path == MSGS:
        assert "event: error" not in r.text, r.text
        datas = [json.loads(line.removeprefix("data: ")) for line in r.text.splitlines() if line.startswith("data: ")]
        return "".join(d["delta"].get("text", "") for d in datas if d["type"] == "content_block_delta")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), r.text
    chunks = [json.loads(e) for e in events[:-1]]
    key = "text" if path == CMPL else "content"
    return "".join(c["choices"][0].get(key) or "" if path == CMPL else c["choices"][0]["delta"].get(key) or ""
                   for c in chunks if c["choices"] and c["choices"][0]["index"] == 0)  # choice 0 of n


BYSTANDERS = [body_for(CMPL, prompt=p, max_tokens=GREEDY_TOKENS, ignore_eos=True, stream=True)
              for p in ["def main(", "import os\n", "class Foo:", "x = [1, 2"]]
"""The greedy streams that run beside a hostile request."""


@pytest.fixture(scope="module")
def bystanders_alone(http: httpx.Client) -> list[str]:
    """Each bystander stream's text when it runs alone on the shared gateway (greedy: the same for every
    hostile request below, so streamed once for all three)."""
    return [_stream_text(CMPL, http.post(CMPL, json=b)) for b in BYSTANDERS]


@pytest.mark.parametrize("path", [CMPL, CHAT, MSGS])
def test_a_tiny_temperature_ends_no_other_stream(server: Server, http: httpx.Client, bystanders_alone: list[str],
                                                 path: str) -> None:
    streams, alone = BYSTANDERS, bystanders_alone
    hostile = _hostile(path)
    greedy_alone = _stream_text(path, http.post(path, json={**hostile, "temperature": 0}))

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return list(await asyncio.gather(*(client.post(CMPL, json=b) for b in streams),
                                             client.post(path, json=hostile)))

    *together, hostile_response = asyncio.run(run())
    assert [_stream_text(CMPL, r) for r in together] == alone  # every other stream finished, exactly as alone
    assert _stream_text(path, hostile_response) == greedy_alone  # and temperature 1e-300 is greedy


def test_request_id_header_is_on_every_response_and_honours_a_sane_one(http: httpx.Client, server: Server,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nextserve.cluster.gateway")
    responses = [http.post(CMPL, json=body_for(CMPL)), http.post(CMPL, json={"model": MODEL}),
                 http.get("/v1/nothing"), http.get("/health/live"), http.post(MSGS, content=b"[")]
    ids = [r.headers["x-request-id"] for r in responses]
    assert all(len(i) == 32 for i in ids) and len(set(ids)) == len(ids)
    r = http.post(CMPL, json=body_for(CMPL), headers={"x-request-id": "client-trace.42:a"})
    assert r.headers["x-request-id"] == "client-trace.42:a"
    assert any("client-trace.42:a" in rec.getMessage() and r.json()["id"] in rec.getMessage()
               for rec in caplog.records)  # the gateway's log ties the client's id to the engine request
    for insane in ("a b", "x" * 129, "id\u00e9", ""):
        r = http.post(CMPL, json=body_for(CMPL), headers={"x-request-id": insane.encode("utf-8")})
        assert r.status_code == 200 and r.headers["x-request-id"] != insane and len(r.headers["x-request-id"]) == 32


def test_a_failed_step_tells_the_client_nothing_internal(server: Server, http: httpx.Client) -> None:
    server.engine.faults.fail_after(0).set()
    r = http.post(CMPL, json=body_for(CMPL))
    assert r.status_code == 500 and r.headers["x-request-id"]
    message = r.json()["error"]["message"]
    assert message == "the server failed while generating this request; it was logged, retry it"
    assert "injected" not in r.text and "Traceback" not in r.text
