"""`nextserve bench dispatch`: its byte floor comes from the placement and its byte count from the
workers, neither from the dispatcher's plan (a plan that sends a token twice shows, below, measured on
workers in this process on real ports), and a short run of the command against real worker processes
reports the round, the echo floor and the bytes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from nextserve.bench.dispatch import TINY_SHAPES, main, measure, min_bytes_per_token, write_random_experts
from nextserve.experts.server import BackgroundWorkers
from nextserve.model.config import Qwen3NextConfig
from nextserve.router import dispatcher
from nextserve.router.dispatcher import RemoteExpertBackend
from nextserve.router.placement import Placement, build_placement
from nextserve.router.plan import WorkerBatch, plan_batches

TOKEN = "test-admin-token"


def test_the_byte_floor_counts_each_token_once_per_distinct_owner() -> None:
    placement = Placement(3, 1, {0: ((0,), (0,), (1,), (2,))})  # experts 0, 1 on worker 0
    ids = torch.tensor([[0, 1], [0, 2], [2, 3]])  # workers {0}, {0, 1}, {1, 2}: 5 visits for 3 tokens
    assert min_bytes_per_token(placement, 0, ids, hidden_size=8, dtype_bytes=4) == 5 / 3 * 8 * 4 * 2


def test_a_short_run_reports_the_round_against_its_floors(capsys: object) -> None:
    assert main(["--workers", "2", "--tokens", "16", "--rounds", "100", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # type: ignore[attr-defined]
    assert result["dispatch_ms_p50"] > 0 and result["echo_ms_p50"] > 0
    assert result["bytes_ratio_to_min"] == pytest.approx(1.0)  # each token's hidden state once per owner
    assert result["wire_bytes_per_token"] > result["bytes_per_token"]  # + ids, weights, framing
    assert result["unary_echo_ms_p50"] > 0 and result["ratio_to_unary_echo"] > 0
    # /proc counts CPU in 10 ms ticks: only the order is checked, over 100 rounds (the workers spend some
    # 2-3.5 ms a round on a dispatch, 0-1 ms on an echo: 20 rounds were 4-7 ticks against 0-2, close to a tie)
    assert result["dispatch_workers_cpu_ms_per_round"] >= result["echo_workers_cpu_ms_per_round"] >= 0


def test_a_plan_that_sends_tokens_twice_fails_the_byte_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each worker batch sent as two calls of half the weight: the sums stay right, the bytes double, and
    the bench's measurement (counting at the workers against the placement's floor) reports it. The
    workers are in this process (the run above covers the command and its worker processes)."""

    def duplicating(*args: object, **kwargs: object) -> list[WorkerBatch]:
        halves = [dataclasses.replace(b, weights=b.weights / 2) for b in plan_batches(*args, **kwargs)]
        return halves + halves

    monkeypatch.setattr(dispatcher, "plan_batches", duplicating)
    model_dir = write_random_experts(tmp_path / "experts", **TINY_SHAPES)  # what the command serves
    config = Qwen3NextConfig.from_json(model_dir)
    placement = build_placement(config.moe_layers[:1], config.num_experts, 2, 1)
    workers = BackgroundWorkers(admin_token=TOKEN)
    try:
        addresses = [f"127.0.0.1:{workers.start(model_dir, placement.experts_of(w)).port}" for w in range(2)]
        with RemoteExpertBackend(addresses, placement, torch.float32, deadline_s=10.0, admin_token=TOKEN) as backend:
            result = measure(backend, 16, config.num_experts_per_tok, config.num_experts, config.hidden_size, 10)
    finally:
        workers.close()
    assert result["bytes_ratio_to_min"] == pytest.approx(2.0)
