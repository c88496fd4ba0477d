"""`nextserve bench dispatch`: its byte floor comes from the placement, not from the dispatcher's plan
(so a plan that sent a token twice to one worker would show as bytes over the floor), and a short run
against real worker processes reports the round, the echo floor and the bytes."""

from __future__ import annotations

import json

import torch

from nextserve.bench.dispatch import main, min_bytes_per_token
from nextserve.router.placement import Placement


def test_the_byte_floor_counts_each_token_once_per_distinct_owner() -> None:
    placement = Placement(3, 1, {0: ((0,), (0,), (1,), (2,))})  # experts 0, 1 on worker 0
    ids = torch.tensor([[0, 1], [0, 2], [2, 3]])  # workers {0}, {0, 1}, {1, 2}: 5 visits for 3 tokens
    assert min_bytes_per_token(placement, 0, ids, hidden_size=8, dtype_bytes=4) == 5 / 3 * 8 * 4 * 2


def test_a_short_run_reports_the_round_against_its_floors(capsys: object) -> None:
    assert main(["--workers", "2", "--tokens", "16", "--rounds", "20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # type: ignore[attr-defined]
    assert result["dispatch_ms_p50"] > 0 and result["echo_ms_p50"] > 0
    assert 1.0 <= result["bytes_ratio_to_min"] < 1.2  # the payload above the floor: ids, weights, framing
