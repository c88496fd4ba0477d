"""The perimeter from outside, against real servers on real ports: every ExpertService call without the
cluster token is UNAUTHENTICATED (unary and streaming, before the request is decoded or counted), the
health service stays open, a message past the worker's limit (sized from the model's largest Dispatch)
is RESOURCE_EXHAUSTED and so is an oversized Echo; a head with the wrong token is told so, not failed
over. The local redis-server refuses a client without its password (NOAUTH) and never shows it; a
placement epoch lower than the one in use is refused (heads) or does not move a worker's epoch back;
`up`'s state file is its owner's only."""

from __future__ import annotations

import os
import re
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.backoff import NoBackoff
from redis.retry import Retry

from nextserve.cluster.app_args import AppArgs
from nextserve.cluster.cli.state_file import write_state
from nextserve.router.epoch_follower import EpochFollowingBackend
from nextserve.cluster.control.redis_server import LocalRedis
from nextserve.cluster.control.registry import Registry
from nextserve.experts.server import BackgroundWorkers, Worker
from nextserve.model.config import Qwen3NextConfig
from nextserve.model.layers.experts import Assignments
from nextserve.proto import expert_pb2, expert_pb2_grpc
from nextserve.proto.admin_auth import SERVICE, admin_metadata
from nextserve.proto.codec import DEFAULT_MAX_DISPATCH_TOKENS, MESSAGE_SIZE_OPTIONS, dispatch_message_limit
from nextserve.router.dispatcher import DispatchError, ExpertsUnavailableError, RemoteExpertBackend
from nextserve.router.placement import build_placement
from nextserve.router.plan import WorkerBatch
from nextserve.router.wire import encode_request

pytestmark = pytest.mark.grpc
TOKEN = "perimeter-test-token"
MiB = 1024 * 1024
NO_TOKEN = [(), (("authorization", "Bearer not-the-token"),), (("authorization", TOKEN),)]
"""No metadata, a wrong token, the right token without 'Bearer '."""


@dataclass
class Served:
    path: Path
    worker: Worker
    channel: grpc.Channel
    stub: expert_pb2_grpc.ExpertServiceStub


@pytest.fixture(scope="module")
def served(reference: dict) -> Iterator[Served]:
    path = reference["small"][1]
    workers = BackgroundWorkers(admin_token=TOKEN)
    worker = workers.start(path, [(0, e) for e in range(16)])
    channel = grpc.insecure_channel(f"127.0.0.1:{worker.port}", options=MESSAGE_SIZE_OPTIONS)
    yield Served(path, worker, channel, expert_pb2_grpc.ExpertServiceStub(channel))
    channel.close()
    workers.close()


def dispatch_request(num_tokens: int, epoch: int = 0, seed: int = 0) -> expert_pb2.DispatchRequest:
    """A valid Dispatch of `num_tokens` tokens of the small model's layer 0 (H = 64, top-4 of 16 experts)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, 64, generator=g)  # [t, H]
    ids = torch.rand(num_tokens, 16, generator=g).argsort(dim=1)[:, :4]  # [t, 4] distinct experts per token
    pairs = Assignments.from_topk(ids, torch.rand(num_tokens, 4, generator=g))
    batch = WorkerBatch(0, torch.arange(pairs.token.numel()), torch.arange(num_tokens), torch.full((num_tokens,), 4),
                        pairs.expert, pairs.weight)
    return encode_request(0, epoch, hidden, batch, torch.float32)


def _requests() -> dict[str, expert_pb2.DispatchRequest | list]:
    key = [expert_pb2.ExpertKey(layer=0, expert=3)]
    huge_echo = expert_pb2.EchoRequest(reply_bytes=200 * MiB)
    return {"Dispatch": dispatch_request(2, epoch=777), "DispatchStream": [dispatch_request(2, epoch=777)],
            "Info": expert_pb2.InfoRequest(), "Echo": huge_echo, "EchoStream": [huge_echo],
            "LoadExperts": expert_pb2.LoadExpertsRequest(experts=key, epoch=900),
            "DropExperts": expert_pb2.DropExpertsRequest(experts=key, epoch=900)}


def call(stub: expert_pb2_grpc.ExpertServiceStub, method: str, request: object, metadata: tuple) -> object:
    """One call of `method`, unary or streaming (a stream's replies read to the end)."""
    if isinstance(request, list):
        return list(getattr(stub, method)(iter(request), timeout=30, metadata=metadata))
    return getattr(stub, method)(request, timeout=30, metadata=metadata)


def _info(served: Served) -> expert_pb2.InfoReply:
    return served.stub.Info(expert_pb2.InfoRequest(), timeout=30, metadata=admin_metadata(TOKEN))


def test_every_method_is_checked_here() -> None:
    """A new ExpertService method must be added to _requests (and so to the test below)."""
    assert set(_requests()) == {m.name for m in SERVICE.methods}


@pytest.mark.parametrize("metadata", NO_TOKEN, ids=["none", "wrong", "no-bearer"])
@pytest.mark.parametrize("method", sorted(_requests()))
def test_every_call_without_the_token_is_unauthenticated_and_counts_nothing(
        served: Served, method: str, metadata: tuple) -> None:
    before = _info(served)
    with pytest.raises(grpc.RpcError) as err:
        call(served.stub, method, _requests()[method], metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    assert err.value.details().startswith(method) and TOKEN not in err.value.details()
    after = _info(served)
    assert after.dispatch_calls == before.dispatch_calls and after.epoch == before.epoch == 0
    assert dict(after.inflight_by_epoch) == {} and list(after.experts) == list(before.experts)  # loads unchanged


def test_with_the_token_the_same_calls_are_served(served: Served) -> None:
    """The refusals above are the token's doing: the same data-plane calls with it are answered."""
    token = admin_metadata(TOKEN)
    before = _info(served).dispatch_calls
    assert call(served.stub, "Dispatch", dispatch_request(2), token).num_tokens == 2
    (reply,) = call(served.stub, "DispatchStream", [dispatch_request(3)], token)
    assert reply.error_code == 0 and reply.num_tokens == 3
    assert _info(served).dispatch_calls == before + 2
    assert len(call(served.stub, "Echo", expert_pb2.EchoRequest(reply_bytes=1000), token).payload) == 1000


def test_the_health_service_stays_open_for_probes(served: Served) -> None:
    health = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", SERVICE.full_name):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_message_limit_is_the_models_largest_dispatch_with_margin(served: Served) -> None:
    config = Qwen3NextConfig.from_json(served.path)
    limit = served.worker.servicer.max_message_bytes
    assert limit == dispatch_message_limit(DEFAULT_MAX_DISPATCH_TOKENS, config.hidden_size,
                                           config.num_experts_per_tok, 4)
    assert dispatch_request(DEFAULT_MAX_DISPATCH_TOKENS).ByteSize() <= limit / 2 < limit < 64 * MiB
    # Qwen3-Next (H = 2048, 10 of 512 experts per token) at a 512-token step in bfloat16: 2.1 MB, so a limit
    # of 4.3 MB (not 256 MiB); a 16384-token prefill step in float32: 134 MB -> 276 MB.
    assert 4 * MiB < dispatch_message_limit(512, 2048, 10, 2) < 4.1e6 * 1.05
    assert 2.7e8 < dispatch_message_limit(16384, 2048, 10, 4) < 2.8e8


@pytest.mark.parametrize("metadata", [admin_metadata(TOKEN), ()], ids=["token", "none"])
def test_an_oversized_message_is_refused(served: Served, metadata: tuple) -> None:
    """Past the limit: RESOURCE_EXHAUSTED with the token; without it the call is refused either way."""
    oversized = dispatch_request(2)
    oversized.hidden = bytes(served.worker.servicer.max_message_bytes + 1)
    refused = {grpc.StatusCode.RESOURCE_EXHAUSTED} if metadata else \
        {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED}
    for method, request in (("Dispatch", oversized), ("DispatchStream", [oversized])):
        with pytest.raises(grpc.RpcError) as err:
            call(served.stub, method, request, metadata)
        assert err.value.code() in refused, (method, err.value.code(), err.value.details())
    assert _info(served).dispatch_calls >= 0  # the worker still serves


def test_an_echo_past_the_limit_is_refused_before_allocating(served: Served) -> None:
    token = admin_metadata(TOKEN)
    for method, request in _requests().items():
        if method.startswith("Echo"):  # reply_bytes = 200 MiB
            with pytest.raises(grpc.RpcError) as err:
                call(served.stub, method, request, token)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"limit {served.worker.servicer.max_message_bytes}" in err.value.details()


def test_a_cluster_sized_worker_takes_its_largest_dispatch_and_nothing_much_larger(reference: dict) -> None:
    """max_dispatch_tokens (a cluster: the heads' max_tokens_per_step) sizes the limit above gRPC's 4 MiB."""
    tokens = 3 * DEFAULT_MAX_DISPATCH_TOKENS // 2
    workers = BackgroundWorkers(admin_token=TOKEN)
    try:
        worker = workers.start(reference["small"][1], [(0, e) for e in range(16)], max_dispatch_tokens=tokens)
        assert worker.servicer.max_message_bytes > 4 * MiB
        with grpc.insecure_channel(f"127.0.0.1:{worker.port}", options=MESSAGE_SIZE_OPTIONS) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            assert stub.Dispatch(dispatch_request(tokens), timeout=120,
                                 metadata=admin_metadata(TOKEN)).num_tokens == tokens
            with pytest.raises(grpc.RpcError) as err:
                stub.Dispatch(dispatch_request(3 * tokens), timeout=120, metadata=admin_metadata(TOKEN))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        workers.close()


def test_a_head_with_the_wrong_token_gets_no_result(served: Served) -> None:
    """Refused: named UNAUTHENTICATED when gRPC reports the refusal as such; when the refusal races the
    stream's first write, grpc-python reports INTERNAL, which fails over like a lost stream (experts
    unavailable). Either way, never a result."""
    placement = build_placement((0,), 16, 1, 1)
    hidden, ids = torch.randn(3, 64), torch.tensor([[0, 1, 2, 3]] * 3)
    weights = torch.full((3, 4), 0.25)
    address = [f"127.0.0.1:{served.worker.port}"]
    with RemoteExpertBackend(address, placement, deadline_s=10.0, admin_token=TOKEN) as backend:
        assert backend.submit(0, hidden, ids, weights).result(timeout=30).shape == (3, 64)
    with RemoteExpertBackend(address, placement, deadline_s=10.0, admin_token="stale") as backend:
        with pytest.raises((DispatchError, ExpertsUnavailableError)) as err:
            backend.submit(0, hidden, ids, weights).result(timeout=30)
        if isinstance(err.value, DispatchError):
            assert re.search("UNAUTHENTICATED.*does not match this worker's", str(err.value))


def test_a_workers_epoch_does_not_move_back(served: Served) -> None:
    token = admin_metadata(TOKEN)
    key = [expert_pb2.ExpertKey(layer=2, expert=5)]
    store = served.worker.store
    start = _info(served).epoch
    refused = store.epochs_refused
    assert served.stub.LoadExperts(expert_pb2.LoadExpertsRequest(experts=key, epoch=start + 5), timeout=30,
                                   metadata=token).epoch == start + 5
    info = served.stub.DropExperts(expert_pb2.DropExpertsRequest(experts=key, epoch=start + 2), timeout=30,
                                   metadata=token)
    assert info.epoch == start + 5 and (2, 5) not in {(x.layer, x.expert) for x in info.experts}  # dropped still
    assert store.epochs_refused == refused + 1


@pytest.fixture
def local_redis() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server


def test_local_redis_refuses_a_client_without_the_password(local_redis: LocalRedis) -> None:
    with socket.create_connection((local_redis.host, local_redis.port), timeout=5) as raw:  # what any local user sees
        raw.sendall(b"PING\r\n")
        assert raw.recv(256).startswith(b"-NOAUTH")
        raw.sendall(b"HSET nextserve:default:placement epoch 1\r\n")
        assert raw.recv(256).startswith(b"-NOAUTH")
    # No client-side retries: redis-py retries an AuthenticationError (a ConnectionError) with a backoff of
    # seconds by default; the server's answer is the same on the first try.
    once = Retry(NoBackoff(), 0)
    bare = redis.Redis(host=local_redis.host, port=local_redis.port, socket_timeout=5, retry=once)
    with pytest.raises(redis.exceptions.AuthenticationError):
        bare.ping()
    wrong = redis.Redis(host=local_redis.host, port=local_redis.port, password="guess", socket_timeout=5, retry=once)
    with pytest.raises(redis.exceptions.AuthenticationError):
        wrong.ping()
    client = redis.Redis.from_url(local_redis.url)
    assert client.ping() and client.config_get("protected-mode") == {"protected-mode": "yes"}
    assert client.config_get("requirepass")["requirepass"] == local_redis.password


def test_local_redis_never_shows_its_password(local_redis: LocalRedis) -> None:
    password = local_redis.password
    assert len(password) >= 32 and password in local_redis.url
    assert password not in repr(local_redis) and password not in local_redis.public_url
    assert "***" in local_redis.public_url and password not in local_redis.address_url
    assert password not in Path(f"/proc/{local_redis.process.pid}/cmdline").read_text()  # what `ps` shows
    config = Path(local_redis.workdir) / "redis.conf"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


def _inputs(config: Qwen3NextConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(config.num_experts, generator=g)[:config.num_experts_per_tok]
                       for _ in range(5)])
    return torch.randn(5, config.hidden_size, generator=g), ids, torch.rand(ids.shape, generator=g)


def test_a_head_refuses_a_lower_epoch_from_redis(reference: dict, local_redis: LocalRedis) -> None:
    path = reference["small"][1]
    config = Qwen3NextConfig.from_json(path)
    registry = Registry(local_redis.url, "perimeter")
    workers = BackgroundWorkers(admin_token=TOKEN)
    backend = None
    try:
        placement = build_placement(config.moe_layers, config.num_experts, 1, 1)
        worker = workers.start(path, placement.experts_of(0))
        addresses = [f"127.0.0.1:{worker.port}"]
        registry.publish_placement(placement, addresses)
        assert registry.publish_placement(placement, addresses) == 2
        backend = EpochFollowingBackend(registry, torch.float32, 10.0, config.num_experts, admin_token=TOKEN)
        backend._stop.set()  # refresh by hand below, not from the watcher thread
        assert backend.epoch == 2
        stale = {"epoch": 1, "placement": placement.to_json(), "addresses": '["127.0.0.1:1"]'}
        registry.client.hset(registry.key("placement"), mapping=stale)  # a rewrite to an older placement
        for _ in range(3):
            assert backend.refresh()
        assert backend.epoch == 2 and backend.epochs_refused == 1  # refused, and counted once
        layer = config.moe_layers[0]
        assert backend.submit(layer, *_inputs(config)).result(timeout=30).shape == (5, config.hidden_size)
        registry.client.hset(registry.key("placement"), "epoch", 2)  # back to the current one
        assert registry.publish_placement(placement, addresses) == 3  # a newer one is adopted
        assert backend.refresh() and backend.epoch == 3 and backend.epochs_refused == 1
    finally:
        if backend is not None:
            backend.close()
        workers.close()


def test_state_file_is_its_owners_only(tmp_path: Path) -> None:
    state = tmp_path / "cache" / "cluster-default.json"
    state.parent.mkdir()
    state.write_text("{}")
    state.chmod(0o644)  # left by an older `up`
    write_state(state, {"redis_url": "redis://:secret@127.0.0.1:1/0", "admin_token": "t"})
    assert stat.S_IMODE(state.stat().st_mode) == 0o600 and "secret" in state.read_text()
    fresh = tmp_path / "new" / "cluster-x.json"
    old_umask = os.umask(0)
    try:
        write_state(fresh, {"redis_url": "redis://127.0.0.1:1/0"})
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600


def test_app_args_never_show_the_redis_password(tiny_dir: Path) -> None:
    args = AppArgs(model=str(tiny_dir), redis_url="redis://127.0.0.1:1/0", redis_password_env="PW",
                   admin_token="tok-secret").with_redis_password({"PW": "pw-secret"})
    assert "pw-secret" in args.redis_url  # what the app connects with
    for shown in (repr(args), str(args)):
        assert "pw-secret" not in shown and "tok-secret" not in shown and ":***@127.0.0.1:1" in shown
