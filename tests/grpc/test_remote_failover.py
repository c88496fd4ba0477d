"""Real worker processes (`python -m nextserve.experts.server`, one set for the module): the admin
token each was started with, and failure handling: SIGKILL and SIGSTOP (a hung worker).

A worker process refuses an admin or data-plane call without its token and serves it with the token.
With R = 2 a dead or hung worker changes no result; with R = 1 `ExpertsUnavailableError` names the
experts and arrives within the deadline (plus slack), never hangs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from nextserve.bench.dispatch import worker_processes
from nextserve.cluster.control import worker_admin
from nextserve.model.config import Qwen3NextConfig
from nextserve.proto import expert_pb2, expert_pb2_grpc
from nextserve.proto.admin_auth import admin_metadata
from nextserve.router.local_backend import LocalExpertBackend, load_local_backend
from nextserve.router.dispatcher import ExpertsUnavailableError, RemoteExpertBackend
from nextserve.router.placement import Placement, build_placement

pytestmark = pytest.mark.grpc
DEADLINE_S = 2.0
"""The backends' round deadline: a healthy worker's round (300 tokens, milliseconds idle) must fit in it on a
loaded 2-core machine too, or R = 1 fails a call the test expects to succeed (1 s was close there)."""
ADMIN_TOKEN = "test-admin-token"
SLACK_S = 3.0
"""What the error may take past the deadline (a loaded machine's scheduling): 2.5 deadlines in all, as with
the 1 s + 1.5 s before, so a backend that waits on the hung worker a third time still fails the check."""


@dataclass
class Procs:
    path: Path
    config: Qwen3NextConfig
    local: LocalExpertBackend
    placement: Placement  # R = 2
    addresses: list[str]
    procs: list[subprocess.Popen]

    def primaries_only(self) -> Placement:
        """The same workers as R = 1: each expert on its primary only."""
        mapping = {layer: tuple(ws[:1] for ws in experts) for layer, experts in
                   self.placement.layer_to_expert_workers.items()}
        return Placement(self.placement.num_workers, 1, mapping)


@pytest.fixture(scope="module")
def procs(reference: dict) -> Iterator[Procs]:
    path = reference["small"][1]
    config = Qwen3NextConfig.from_json(path)
    placement = build_placement(config.moe_layers, config.num_experts, 3, 2)
    with worker_processes(path, placement, "float32", ADMIN_TOKEN) as (started, addresses):  # CPU: to 1e-6
        yield Procs(path, config, load_local_backend(path), placement, addresses, started)
        for p in started:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)  # a stopped worker would not act on the SIGTERM


def batch(config: Qwen3NextConfig, seed: int = 0, num_tokens: int = 300) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, config.hidden_size, generator=g)
    ids = torch.rand(num_tokens, config.num_experts, generator=g).topk(config.num_experts_per_tok, dim=1).indices
    return hidden, ids, torch.rand(ids.shape, generator=g).softmax(dim=1)


def assert_equal_to_local(procs: Procs, backend: RemoteExpertBackend) -> None:
    for layer in procs.config.moe_layers:
        hidden, ids, weights = batch(procs.config, seed=layer)
        got = backend.submit(layer, hidden, ids, weights).result(timeout=30)
        assert (got - procs.local.forward(layer, hidden, ids, weights)).abs().max().item() <= 1e-6


def assert_unavailable_names(procs: Procs, backend: RemoteExpertBackend, worker: int) -> None:
    layer = procs.config.moe_layers[1]
    hidden, ids, weights = batch(procs.config, seed=5)
    start = time.monotonic()
    with pytest.raises(ExpertsUnavailableError) as err:
        backend.submit(layer, hidden, ids, weights).result(timeout=DEADLINE_S + 10)
    elapsed = time.monotonic() - start
    assert elapsed <= DEADLINE_S + SLACK_S, f"error after {elapsed:.2f}s, deadline {DEADLINE_S}s"
    lost = sorted(e for e in set(ids.reshape(-1).tolist()) if procs.placement.workers_of(layer, e)[0] == worker)
    assert err.value.pairs == [(layer, e) for e in lost]
    assert f"layer {layer} experts {lost}" in str(err.value)


def test_a_worker_process_requires_the_token_it_was_started_with(procs: Procs) -> None:
    """Worker 2 (the tests below restore what they change on it and never stop it): without the token an
    admin call and a data-plane call are UNAUTHENTICATED; with it both are served (a LoadExperts of what
    it holds, at the placement's epoch: nothing changes for the other tests)."""
    held = procs.placement.experts_of(2)
    load = expert_pb2.LoadExpertsRequest(experts=[expert_pb2.ExpertKey(layer=layer, expert=e) for layer, e in held],
                                         epoch=procs.placement.epoch)
    with grpc.insecure_channel(procs.addresses[2]) as channel:
        stub = expert_pb2_grpc.ExpertServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.LoadExperts(load, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "admin token" in err.value.details()
        info = stub.LoadExperts(load, timeout=30, metadata=admin_metadata(ADMIN_TOKEN))
        assert info.epoch == procs.placement.epoch and {(x.layer, x.expert) for x in info.experts} == set(held)
        with pytest.raises(grpc.RpcError) as err:
            stub.Echo(expert_pb2.EchoRequest(reply_bytes=3), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the data plane too
        reply = stub.Echo(expert_pb2.EchoRequest(reply_bytes=3), timeout=30, metadata=admin_metadata(ADMIN_TOKEN))
        assert reply.payload == bytes(3)


def test_a_worker_out_of_step_with_the_placement_is_failed_over(procs: Procs) -> None:
    """A worker that does not hold what the placement says (Ray restarted it with an older assignment)
    answers FAILED_PRECONDITION: with R = 2 its pairs go to the other replica and nothing changes; with
    R = 1 it is ExpertsUnavailableError (which the epoch follower waits out), never a DispatchError."""
    stale = procs.placement.experts_of(2)
    worker_admin.drop_experts(procs.addresses[2], stale, 0, ADMIN_TOKEN)
    try:
        with RemoteExpertBackend(procs.addresses, procs.placement, deadline_s=DEADLINE_S, admin_token=ADMIN_TOKEN) as r2, \
                RemoteExpertBackend(procs.addresses, procs.primaries_only(), deadline_s=DEADLINE_S, admin_token=ADMIN_TOKEN) as r1:
            assert_equal_to_local(procs, r2)
            assert_unavailable_names(procs, r1, worker=2)
    finally:
        worker_admin.load_experts(procs.addresses[2], stale, 0, ADMIN_TOKEN)


def test_hung_then_killed_worker(procs: Procs) -> None:
    with RemoteExpertBackend(procs.addresses, procs.placement, deadline_s=DEADLINE_S, admin_token=ADMIN_TOKEN) as r2, \
            RemoteExpertBackend(procs.addresses, procs.primaries_only(), deadline_s=DEADLINE_S, admin_token=ADMIN_TOKEN) as r1:
        assert_equal_to_local(procs, r2)
        assert_equal_to_local(procs, r1)

        os.kill(procs.procs[0].pid, signal.SIGSTOP)  # hung: accepts nothing, answers nothing
        try:
            assert_unavailable_names(procs, r1, worker=0)
            assert_equal_to_local(procs, r2)
        finally:
            os.kill(procs.procs[0].pid, signal.SIGCONT)

    with RemoteExpertBackend(procs.addresses, procs.placement, deadline_s=DEADLINE_S, admin_token=ADMIN_TOKEN) as r2, \
            RemoteExpertBackend(procs.addresses, procs.primaries_only(), deadline_s=DEADLINE_S, admin_token=ADMIN_TOKEN) as r1:
        assert_equal_to_local(procs, r2)  # worker 0 serves again
        procs.procs[1].kill()  # SIGKILL
        procs.procs[1].wait()
        assert_equal_to_local(procs, r2)
        assert_unavailable_names(procs, r1, worker=1)


def test_the_last_worker_failing_raises_instead_of_dropping_its_tokens(reference: dict) -> None:
    """With one worker (N = 1), its failure in the only round must surface, not return zeros."""
    config = Qwen3NextConfig.from_json(reference["small"][1])
    placement = build_placement(config.moe_layers, config.num_experts, 1, 1)
    layer = config.moe_layers[0]
    hidden, ids, weights = batch(config, seed=3, num_tokens=8)
    # a port this test holds bound and never listens on: connections are refused, and no other process's
    # server (a port found free and closed again could be) takes it meanwhile
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{held.getsockname()[1]}"
        with RemoteExpertBackend([address], placement, deadline_s=DEADLINE_S, admin_token=ADMIN_TOKEN) as backend:
            with pytest.raises(ExpertsUnavailableError) as err:  # nothing listens there: UNAVAILABLE
                backend.submit(layer, hidden, ids, weights).result(timeout=DEADLINE_S + 10)
    assert err.value.pairs == [(layer, e) for e in sorted(set(ids.reshape(-1).tolist()))]
