"""A local `nextserve up` seen from outside, holding no token: its expert workers (on loopback) answer
Dispatch, DispatchStream, Info and a 200 MiB Echo with UNAUTHENTICATED and a 64 MiB body with
UNAUTHENTICATED or RESOURCE_EXHAUSTED; its redis-server answers NOAUTH; neither `up`'s output nor
`status` shows the Redis password, and the state file is its owner's only. Meanwhile the heads, which
hold the token, dispatch: greedy completions equal transformers' `generate`."""

from __future__ import annotations

import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster_harness import UpProcess
from nextserve.proto import expert_pb2, expert_pb2_grpc
from nextserve.proto.admin_auth import admin_metadata
from nextserve.proto.codec import MESSAGE_SIZE_OPTIONS

pytestmark = pytest.mark.cluster
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def up(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    proc = UpProcess(tiny_dir, tmp_path_factory.mktemp("perimeter"), 2)
    yield proc
    if proc.proc.poll() is None:
        assert proc.interrupt() == 0


def _outsider_calls() -> dict[str, object]:
    dispatch = expert_pb2.DispatchRequest(layer=0, epoch=10**6, dtype=expert_pb2.DTYPE_FLOAT32, num_tokens=1,
                                          hidden_size=64, hidden=bytes(256))
    echo = expert_pb2.EchoRequest(reply_bytes=200 * MiB)
    body = expert_pb2.DispatchRequest(layer=0, num_tokens=1, hidden_size=64, hidden=bytes(64 * MiB))
    return {"Dispatch": dispatch, "DispatchStream": [dispatch], "Info": expert_pb2.InfoRequest(), "Echo": echo,
            "EchoStream": [echo], "Dispatch 64 MiB": body}


def _call(stub: expert_pb2_grpc.ExpertServiceStub, name: str, request: object, metadata: tuple = ()) -> object:
    method = getattr(stub, name.split()[0])
    if isinstance(request, list):
        return list(method(iter(request), timeout=60, metadata=metadata))
    return method(request, timeout=60, metadata=metadata)


def test_an_outsider_is_refused_everywhere_and_the_cluster_serves_as_transformers(up: UpProcess,
                                                                                   tiny_dir: Path) -> None:
    state_file = up.cache / "cluster-default.json"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    state = up.state()
    redis_url = urlsplit(state["redis_url"])
    assert redis_url.password and len(redis_url.password) >= 32
    status_text = up.cli("status")
    assert status_text.returncode == 0, status_text.stderr
    for shown in (status_text.stdout, status_text.stderr, up.cli("status", "--json").stdout, "".join(up.lines)):
        assert redis_url.password not in shown and state["admin_token"] not in shown

    with socket.create_connection((redis_url.hostname, redis_url.port), timeout=10) as raw:
        raw.sendall(b"PING\r\n")
        assert raw.recv(256).startswith(b"-NOAUTH")

    workers = up.status()["workers"]
    assert len(workers) == 2
    for worker in workers:
        host, _, port = worker["address"].rpartition(":")
        assert host == "127.0.0.1", worker["address"]  # a local cluster's workers listen on loopback only
        with grpc.insecure_channel(worker["address"], options=MESSAGE_SIZE_OPTIONS) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            before = _call(stub, "Info", expert_pb2.InfoRequest(), admin_metadata(state["admin_token"]))
            for name, request in _outsider_calls().items():
                with pytest.raises(grpc.RpcError) as err:
                    _call(stub, name, request)
                allowed = {grpc.StatusCode.UNAUTHENTICATED} | (
                    {grpc.StatusCode.RESOURCE_EXHAUSTED} if "MiB" in name else set())
                assert err.value.code() in allowed, (worker["address"], name, err.value.code())
            after = _call(stub, "Info", expert_pb2.InfoRequest(), admin_metadata(state["admin_token"]))
            assert 10**6 not in after.inflight_by_epoch and after.epoch == before.epoch  # nothing counted
        with socket.socket() as s:  # not on the host's other addresses (0.0.0.0 would take this)
            s.settimeout(5)
            other = socket.gethostbyname(socket.gethostname())
            if not other.startswith("127."):
                assert s.connect_ex((other, int(port))) != 0

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for prompt in ("def fibonacci(n):", "The quick brown fox"):
        r = httpx.post(f"{up.base_url}/v1/completions", timeout=120,
                       json={"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        ids = tok(prompt)["input_ids"]
        want = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
        assert r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
