"""The expert worker over real gRPC: bad messages get INVALID_ARGUMENT naming the value and the worker
keeps serving; Info counters; LoadExperts / DropExperts, which need the admin token (UNAUTHENTICATED
naming what is missing or wrong; the worker CLI's token flags); the health service. Every call here
carries the token (`served.stub`) unless a test says otherwise (`served.bare`); tests/grpc/test_perimeter.py
covers the data plane's refusals, tests/grpc/test_remote_failover.py a worker process's token."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextserve.cluster.control import reshard, worker_admin
from nextserve.experts.server import BackgroundWorkers, Worker, main as server_main, parse_experts
from nextserve.proto import expert_pb2, expert_pb2_grpc
from nextserve.proto.admin_auth import ADMIN_METHODS, SERVICE, admin_metadata
from nextserve.router.channels import WorkerChannels
from nextserve.router.local_backend import load_local_backend
from nextserve.router.worker_stream import WorkerCallError, WorkerStream, reply_of

pytestmark = pytest.mark.grpc
HELD = [(0, e) for e in range(8)] + [(2, 3), (2, 9)]
TOKEN = "test-admin-token"
ADMIN = admin_metadata(TOKEN)


class SendsToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the cluster token to every call of a channel, as a head's channels do (router/channels.py)."""

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(metadata=[*(details.metadata or ()), *ADMIN])  # type: ignore[attr-defined]

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(details), requests)


@dataclass
class Served:
    path: Path
    worker: Worker
    stub: expert_pb2_grpc.ExpertServiceStub
    """Every call carries the token."""
    channel: grpc.Channel
    bare: expert_pb2_grpc.ExpertServiceStub
    """No token unless a call passes one."""


@pytest.fixture(scope="module")
def served(reference: dict) -> Iterator[Served]:
    path = reference["small"][1]
    workers = BackgroundWorkers(admin_token=TOKEN)
    worker = workers.start(path, HELD)
    channel = grpc.insecure_channel(f"127.0.0.1:{worker.port}")
    with_token = grpc.intercept_channel(channel, SendsToken())
    yield Served(path, worker, expert_pb2_grpc.ExpertServiceStub(with_token), channel,
                 expert_pb2_grpc.ExpertServiceStub(channel))
    channel.close()
    workers.close()


def int32_bytes(values: list[int]) -> bytes:
    return torch.tensor(values, dtype=torch.int32).numpy().tobytes()


def good_request(num_tokens: int = 3, layer: int = 0, seed: int = 0) -> tuple[expert_pb2.DispatchRequest, tuple]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, 64, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(num_tokens)])  # [t, 2] held experts
    weights = torch.rand(num_tokens, 2, generator=g)
    request = expert_pb2.DispatchRequest(
        layer=layer, dtype=expert_pb2.DTYPE_FLOAT32, num_tokens=num_tokens, hidden_size=64,
        hidden=hidden.numpy().tobytes(), counts=int32_bytes([2] * num_tokens),
        expert_ids=int32_bytes(ids.reshape(-1).tolist()), weights=weights.numpy().tobytes())
    return request, (hidden, ids, weights)


def test_good_call_computes_the_local_partial(served: Served) -> None:
    request, (hidden, ids, weights) = good_request(5)
    reply = served.stub.Dispatch(request, timeout=10)
    got = torch.frombuffer(bytearray(reply.partial), dtype=torch.float32).view(5, 64)
    want = load_local_backend(served.path).forward(0, hidden, ids, weights)
    assert (got - want).abs().max().item() <= 1e-6


def _bad(field: str, value: object) -> expert_pb2.DispatchRequest:
    request, _ = good_request()
    if field == "nan_weight":
        w = torch.frombuffer(bytearray(request.weights), dtype=torch.float32).clone()
        w[value] = float("nan") if value == 1 else float("inf")
        request.weights = w.numpy().tobytes()
    elif field == "expert_ids":
        ids = torch.frombuffer(bytearray(request.expert_ids), dtype=torch.int32).clone()
        ids[0] = value
        request.expert_ids = ids.numpy().tobytes()
    elif field == "expert_ids_bytes":
        request.expert_ids = request.expert_ids[:value]
    elif field == "hidden":
        request.hidden = request.hidden[:value]
    elif field == "counts":
        request.counts = int32_bytes(value)
    elif field == "counts_bytes":
        request.counts = request.counts[:value]
    else:
        setattr(request, field, value)
    return request


NOT_HELD = [
    ("layer", 3, "layer 3 is not served"),
    ("layer", 99, "layer 99"),
    ("expert_ids", 12, "expert 12 of layer 0 is not held"),
]
"""Well-formed requests for what the worker does not hold: FAILED_PRECONDITION, which heads fail over."""
BAD = [
    ("expert_ids", 4000, "expert_ids holds 4000 \\(layer 0\\), outside \\[0, 16\\)"),
    ("expert_ids", -3, "expert_ids holds -3 \\(layer 0\\), outside \\[0, 16\\)"),
    ("expert_ids_bytes", 23, "expert_ids has 23 bytes; sum\\(counts\\) 6 pairs x 4 bytes \\(int32\\) needs 24"),
    ("dtype", expert_pb2.DTYPE_BFLOAT16, "dtype DTYPE_BFLOAT16 does not match the worker's DTYPE_FLOAT32"),
    ("dtype", 7, "dtype 7 does not match the worker's DTYPE_FLOAT32"),
    ("hidden_size", 65, "hidden_size 65 does not match the model's 64"),
    ("num_tokens", 4, "num_tokens 4"),
    ("hidden", 100, "hidden has 100 bytes"),
    ("counts", [2, 2], "counts has 8 bytes; num_tokens 3 x 4 bytes \\(int32\\) needs 12"),
    ("counts_bytes", 11, "counts has 11 bytes"),
    ("counts", [2, 0, 4], "counts\\[1\\] is 0; every token sent needs >= 1"),
    ("counts", [2, -1, 5], "counts\\[1\\] is -1"),
    ("counts", [2, 2, 3], "expert_ids has 24 bytes; sum\\(counts\\) 7 pairs"),
    ("weights", b"\0" * 8, "weights has 8 bytes"),
    ("nan_weight", 1, "weights\\[1\\] is nan"),
    ("nan_weight", 4, "weights\\[4\\] is inf"),
]


@pytest.mark.parametrize("field,value,message", BAD, ids=[f"{f}={str(v)[:12]}" for f, v, _ in BAD])
def test_bad_message_is_invalid_argument_and_worker_keeps_serving(served: Served, field: str, value: object,
                                                                   message: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        served.stub.Dispatch(_bad(field, value), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, err.value.details()), err.value.details()
    request, _ = good_request(2, seed=1)
    assert len(served.stub.Dispatch(request, timeout=10).partial) == 2 * 64 * 4


@pytest.mark.parametrize("field,value,message", NOT_HELD, ids=[f"{f}={v}" for f, v, _ in NOT_HELD])
def test_experts_not_held_are_failed_precondition_and_worker_keeps_serving(served: Served, field: str,
                                                                           value: object, message: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        served.stub.Dispatch(_bad(field, value), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert re.search(message, err.value.details()), err.value.details()
    request, _ = good_request(2, seed=1)
    assert len(served.stub.Dispatch(request, timeout=10).partial) == 2 * 64 * 4


def test_info_counts_tokens_served_per_expert(served: Served) -> None:
    before = {(x.layer, x.expert): x.tokens_served for x in served.stub.Info(expert_pb2.InfoRequest()).experts}
    request, (_, ids, _) = good_request(9, seed=3)
    served.stub.Dispatch(request, timeout=10)
    info = served.stub.Info(expert_pb2.InfoRequest())
    after = {(x.layer, x.expert): x.tokens_served for x in info.experts}
    assert set(after) == set(HELD)
    for e in range(8):
        assert after[(0, e)] - before[(0, e)] == int((ids == e).sum())
    assert info.dtype == expert_pb2.DTYPE_FLOAT32 and info.hidden_size == 64


def test_info_reports_busy_time_that_grows_with_dispatches_only(served: Served) -> None:
    """busy_s / inflight_s (the autoscaler's input) grow while calls compute, not while the worker idles."""
    first = served.stub.Info(expert_pb2.InfoRequest())
    time.sleep(0.3)
    idle = served.stub.Info(expert_pb2.InfoRequest())
    assert idle.busy_s == first.busy_s and idle.inflight_s == first.inflight_s
    for seed in range(20):
        served.stub.Dispatch(good_request(64, seed=seed)[0], timeout=10)
    after = served.stub.Info(expert_pb2.InfoRequest())
    assert after.busy_s > idle.busy_s and after.inflight_s >= after.busy_s - 1e-9
    assert after.inflight == 0


def test_load_and_drop_experts(served: Served) -> None:
    request, _ = good_request(layer=0)
    request.layer, request.expert_ids = 1, int32_bytes([4, 5] * 3)
    with pytest.raises(grpc.RpcError, match="layer 1 is not served"):
        served.stub.Dispatch(request, timeout=10)
    info = served.stub.LoadExperts(expert_pb2.LoadExpertsRequest(
        experts=[expert_pb2.ExpertKey(layer=1, expert=e) for e in (4, 5)], epoch=7), timeout=30, metadata=ADMIN)
    assert info.epoch == 7 and {(x.layer, x.expert) for x in info.experts} >= {(1, 4), (1, 5)}
    assert len(served.stub.Dispatch(request, timeout=10).partial) == 3 * 64 * 4
    info = served.stub.DropExperts(expert_pb2.DropExpertsRequest(
        experts=[expert_pb2.ExpertKey(layer=1, expert=e) for e in (4, 5)], epoch=8), timeout=30, metadata=ADMIN)
    assert info.epoch == 8 and not {(1, 4), (1, 5)} & {(x.layer, x.expert) for x in info.experts}
    with pytest.raises(grpc.RpcError, match="layer 1 is not served"):
        served.stub.Dispatch(request, timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        served.stub.LoadExperts(expert_pb2.LoadExpertsRequest(experts=[expert_pb2.ExpertKey(layer=0, expert=99)]),
                                metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "expert 99" in err.value.details()


def test_health_and_echo(served: Served) -> None:
    health = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", "nextserve.expert.v1.ExpertService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    assert len(served.stub.Echo(expert_pb2.EchoRequest(payload=b"x" * 10, reply_bytes=1234)).payload) == 1234


def _held(stub: expert_pb2_grpc.ExpertServiceStub) -> tuple[int, set[tuple[int, int]]]:
    info = stub.Info(expert_pb2.InfoRequest(), timeout=10)
    return info.epoch, {(x.layer, x.expert) for x in info.experts}


def _admin_request(method: str) -> expert_pb2.LoadExpertsRequest | expert_pb2.DropExpertsRequest:
    request_type = {"LoadExperts": expert_pb2.LoadExpertsRequest, "DropExperts": expert_pb2.DropExpertsRequest}
    return request_type[method](experts=[expert_pb2.ExpertKey(layer=2, expert=e) for e in (3, 4)], epoch=99)


CREDENTIALS = [
    ((), "needs the cluster's admin token: send gRPC metadata 'authorization: Bearer <token>'"),
    ((("authorization", TOKEN),), "must read 'Bearer <token>'"),
    ((("authorization", "Bearer not-the-token"),), "does not match this worker's"),
    ((("authorization", "Bearer " + TOKEN[:-1]),), "does not match this worker's"),
    ((("x-other", "Bearer " + TOKEN),), "needs the cluster's admin token"),
]


@pytest.mark.parametrize("method", sorted(ADMIN_METHODS))
@pytest.mark.parametrize("metadata,message", CREDENTIALS, ids=["none", "no-bearer", "wrong", "prefix", "other-key"])
def test_admin_calls_without_the_token_are_unauthenticated_and_change_nothing(
        served: Served, method: str, metadata: tuple, message: str) -> None:
    before = _held(served.stub)
    with pytest.raises(grpc.RpcError) as err:
        getattr(served.bare, method)(_admin_request(method), timeout=10, metadata=metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details().startswith(method) and message in err.value.details(), err.value.details()
    assert TOKEN not in err.value.details()
    assert _held(served.stub) == before  # refused before the servicer ran: epoch 99 never applied


def test_every_state_changing_method_is_an_admin_method() -> None:
    """The calls that change what a worker holds; the token check covers every method (test_perimeter.py)."""
    assert ADMIN_METHODS == {"LoadExperts", "DropExperts"}
    assert {m.name for m in SERVICE.methods} == ADMIN_METHODS | {"Dispatch", "DispatchStream", "Info", "Echo", "EchoStream"}


def test_worker_admin_sends_the_cluster_token(served: Served) -> None:
    address = f"127.0.0.1:{served.worker.port}"
    info = worker_admin.load_experts(address, [(1, 7)], 20, TOKEN)
    assert info.epoch == 20 and (1, 7) in {(x.layer, x.expert) for x in info.experts}
    with pytest.raises(grpc.RpcError) as err:
        worker_admin.drop_experts(address, [(1, 7)], 21, "stale-token")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = worker_admin.drop_experts(address, [(1, 7)], 21, TOKEN)
    assert info.epoch == 21 and (1, 7) not in {(x.layer, x.expert) for x in info.experts}


def test_a_worker_started_with_no_token_leaves_admin_open(served: Served) -> None:
    workers = BackgroundWorkers(admin_token=None)  # explicit: there is no default
    try:
        worker = workers.start(served.path, [(0, 0)])
        with grpc.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
            info = expert_pb2_grpc.ExpertServiceStub(channel).LoadExperts(_admin_request("LoadExperts"), timeout=30)
        assert info.epoch == 99
    finally:
        workers.close()
    empty = BackgroundWorkers(admin_token="")
    try:
        with pytest.raises(ValueError, match="admin token is empty"):
            empty.start(served.path, [(0, 0)])
    finally:
        empty.close()


def test_worker_cli_refuses_to_start_without_a_token_choice(served: Served,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m nextserve.experts.server` (its `main`, here in-process: argparse exits before anything
    starts) needs --admin-token-env or --no-admin-token, and the named variable set. A worker process
    started with its token refuses calls without it: tests/grpc/test_remote_failover.py, on its processes."""
    base = ["--model", str(served.path), "--experts", "0:0"]
    with pytest.raises(SystemExit) as refused:
        server_main(base)
    stderr = capsys.readouterr().err
    assert refused.value.code == 2 and "one of the arguments --admin-token-env --no-admin-token" in stderr
    assert "NEXTSERVE_TEST_UNSET_TOKEN" not in os.environ
    with pytest.raises(SystemExit) as refused:
        server_main(base + ["--admin-token-env", "NEXTSERVE_TEST_UNSET_TOKEN"])
    assert refused.value.code == 2
    assert "NEXTSERVE_TEST_UNSET_TOKEN: that environment variable is not set" in capsys.readouterr().err


def test_parse_experts() -> None:
    assert parse_experts("0:1,2; 3:4;") == [(0, 1), (0, 2), (3, 4)]


def test_drain_returns_once_no_call_of_an_older_epoch_is_in_flight(served: Served) -> None:
    """The controller drains a placement change on the workers' own count of calls in flight per epoch
    (InfoReply.inflight_by_epoch), not on a timer."""
    address = f"127.0.0.1:{served.worker.port}"
    request, _ = good_request(12_000, seed=5)  # large (3 MB, under the channel's 4 MB): computed on the pool
    futures: list = []
    deadline = time.monotonic() + 20
    while not served.stub.Info(expert_pb2.InfoRequest()).inflight_by_epoch.get(request.epoch):
        assert time.monotonic() < deadline, "never saw a call in flight"
        futures.append(served.stub.Dispatch.future(request, timeout=60))
    reshard.drain([address], request.epoch + 1, TOKEN)
    assert not served.stub.Info(expert_pb2.InfoRequest()).inflight_by_epoch.get(request.epoch)
    assert all(f.result().num_tokens == 12_000 for f in futures)
    assert dict(served.stub.Info(expert_pb2.InfoRequest()).inflight_by_epoch) == {}


@pytest.mark.parametrize("field,value,message", BAD[:6], ids=[f"{f}={str(v)[:12]}" for f, v, _ in BAD[:6]])
def test_a_bad_message_on_a_dispatch_stream_fails_only_its_reply(served: Served, field: str, value: object,
                                                                  message: str) -> None:
    """On a head's DispatchStream a bad request gets a reply with INVALID_ARGUMENT naming the field; the
    stream goes on and answers the next request, each reply with its request's call_id."""
    good, (hidden, ids, weights) = good_request(4, seed=2)
    bad = _bad(field, value)
    good.call_id, bad.call_id = 7, 8
    second = expert_pb2.DispatchRequest()
    second.CopyFrom(good)
    second.call_id = 9
    replies = list(served.stub.DispatchStream(iter([good, bad, second]), timeout=10))
    assert [r.call_id for r in replies] == [7, 8, 9]
    assert replies[1].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and not replies[1].partial
    assert re.search(message, replies[1].error), replies[1].error
    want = load_local_backend(served.path).forward(0, hidden, ids, weights)
    for reply in (replies[0], replies[2]):
        assert reply.error_code == 0
        got = torch.frombuffer(bytearray(reply.partial), dtype=torch.float32).view(4, 64)
        assert (got - want).abs().max().item() <= 1e-6


async def one_request(stream: WorkerStream, request: expert_pb2.DispatchRequest,
                      timeout: float) -> expert_pb2.DispatchReply:
    """One request and its reply on `stream`, as a round of one (the dispatcher sends several and waits
    once for all: router/dispatcher.py)."""
    future = await stream.send(request, asyncio.get_running_loop().time() + timeout)
    done, _ = await asyncio.wait((future,), timeout=timeout)
    if not done:
        stream.expire(future, timeout)
    return reply_of(future)


def test_worker_stream_keeps_its_stream_across_a_failed_reply(served: Served) -> None:
    """router/worker_stream.py on a real worker: a reply's error fails only that request (as a
    WorkerCallError with its status), the next request goes on the same stream; a deadline resets it."""
    channels = WorkerChannels([f"127.0.0.1:{served.worker.port}"], admin_token=TOKEN)
    stream = channels.streams[0]
    try:
        bad = _bad("counts", [2, 2])
        with pytest.raises(WorkerCallError, match="counts has 8 bytes") as err:
            channels.run(one_request(stream, bad, timeout=10)).result()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        opened = stream._call
        request, _ = good_request(3, seed=4)
        assert len(channels.run(one_request(stream, request, timeout=10)).result().partial) == 3 * 64 * 4
        assert stream._call is opened is not None  # one stream for both
        with pytest.raises(WorkerCallError) as err:
            channels.run(one_request(stream, good_request(3000, seed=5)[0], timeout=0.001)).result()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and stream._call is None
        assert len(channels.run(one_request(stream, request, timeout=10)).result().partial) == 3 * 64 * 4  # reopened
    finally:
        channels.close()
