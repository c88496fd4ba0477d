"""`nextserve bench engine` on the tiny checkpoint: a row per batch size with both sides measured, and the
engine's decode step issuing the same number of torch operator calls whatever the batch (a count, not
a timing: the step batches every sequence instead of looping over them)."""

from __future__ import annotations

import json
from pathlib import Path

from nextserve.bench.engine_bench import format_table, run_engine_bench
from nextserve.cluster.cli.main import main


def test_engine_bench_rows_and_a_flat_operator_count(tiny_dir: Path) -> None:
    result = run_engine_bench(tiny_dir, [1, 5], context=20, steps=2, dtype="float32", seed=0)
    rows = result["batches"]
    assert [r["batch"] for r in rows] == [1, 5]
    for r in rows:
        assert r["step_ms"] > 0 and r["transformers_step_ms"] > 0 and r["ops_per_step"] > 0
        assert r["tok_s"] == r["batch"] / r["step_ms"] * 1e3
    assert rows[1]["ops_per_step"] <= 1.05 * rows[0]["ops_per_step"]
    json.dumps(result)
    assert "tok/s vs hf" in format_table(result)


def test_engine_bench_from_the_cli(tiny_dir: Path, tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "engine.json"
    assert main(["bench", "engine", "--model", str(tiny_dir), "--batches", "2", "--context", "8", "--steps", "1",
                 "--pressure-requests", "8", "--pressure-prompt", "24", "--pressure-max-tokens", "16",
                 "--json", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    pressure = result["pressure"]  # 8 requests in a quarter of their cache: all complete, exactly, preempting
    assert pressure["completed"] == pressure["equal_to_transformers"] == 8 and pressure["preemptions"] > 0
    assert pressure["rss_mib_peak"] > 0
    assert set(result["batches"][0]) >= {"batch", "step_ms", "tok_s", "ops_per_step", "transformers_step_ms"}
