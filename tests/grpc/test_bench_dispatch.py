"""`nextserve bench dispatch`: its byte floor comes from the placement and its byte count from the
workers, neither from the dispatcher's plan (a plan that sends a token twice shows, below), and a short
run against real worker processes reports the round, the echo floor and the bytes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from nextserve.bench.dispatch import main, min_bytes_per_token
from nextserve.router import dispatcher
from nextserve.router.placement import Placement
from nextserve.router.plan import WorkerBatch, plan_batches


def test_the_byte_floor_counts_each_token_once_per_distinct_owner() -> None:
    placement = Placement(3, 1, {0: ((0,), (0,), (1,), (2,))})  # experts 0, 1 on worker 0
    ids = torch.tensor([[0, 1], [0, 2], [2, 3]])  # workers {0}, {0, 1}, {1, 2}: 5 visits for 3 tokens
    assert min_bytes_per_token(placement, 0, ids, hidden_size=8, dtype_bytes=4) == 5 / 3 * 8 * 4 * 2


def test_a_short_run_reports_the_round_against_its_floors(capsys: object) -> None:
    assert main(["--workers", "2", "--tokens", "16", "--rounds", "20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # type: ignore[attr-defined]
    assert result["dispatch_ms_p50"] > 0 and result["echo_ms_p50"] > 0
    assert result["bytes_ratio_to_min"] == pytest.approx(1.0)  # each token's hidden state once per owner
    assert result["wire_bytes_per_token"] > result["bytes_per_token"]  # + ids, weights, framing
    assert result["unary_echo_ms_p50"] > 0 and result["ratio_to_unary_echo"] > 0
    # /proc counts CPU in 10 ms ticks: over 20 short rounds only the order is safe to check
    assert result["dispatch_workers_cpu_ms_per_round"] >= result["echo_workers_cpu_ms_per_round"] >= 0


def test_a_plan_that_sends_tokens_twice_fails_the_byte_check(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Each worker batch sent as two calls of half the weight: the sums stay right, the bytes double, and
    the bench (counting at the workers against the placement's floor) reports it."""

    def duplicating(*args: object, **kwargs: object) -> list[WorkerBatch]:
        halves = [dataclasses.replace(b, weights=b.weights / 2) for b in plan_batches(*args, **kwargs)]
        return halves + halves

    monkeypatch.setattr(dispatcher, "plan_batches", duplicating)
    assert main(["--workers", "2", "--tokens", "16", "--rounds", "20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes_ratio_to_min"] == pytest.approx(2.0)
