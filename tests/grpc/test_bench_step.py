"""`bench step`: one run on the tiny checkpoint with real expert-worker processes over gRPC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nextserve.bench.step_bench import format_report, run_step_bench

pytestmark = pytest.mark.grpc


def test_step_bench_measures_every_backend_and_the_floor(tiny_dir: Path) -> None:
    result = run_step_bench(tiny_dir, batch=4, prompt_len=8, steps=3, workers=2, seed=0)
    steps = result["steps"]
    assert set(steps) == {"null", "local", "remote", "remote_ping_pong"}
    for row in steps.values():
        assert row["step_ms"] > 0 and {"wait_ms", "head_thread_cpu_ms", "dispatch_thread_cpu_ms",
                                       "worker0_cpu_ms", "worker1_cpu_ms"} <= row.keys()
    # Only the gRPC backend makes the head wait for the experts: a round trip per MoE layer.
    assert steps["remote"]["wait_ms"] > 10 * steps["null"]["wait_ms"]
    assert steps["remote_ping_pong"]["wait_ms"] > 10 * steps["local"]["wait_ms"]
    assert result["per_round"]["grpc_echo_ms"] > 0 and result["per_round"]["serialisation_ms"] > 0
    assert result["transformers_step_ms"] > 0
    json.dumps(result)  # what --json prints
    report = format_report(result)
    assert "remote_ping_pong" in report and "transformers" in report and "gRPC echo" in report
