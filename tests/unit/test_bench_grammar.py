"""`nextserve bench grammar` on the tiny checkpoint, from the CLI: both phases measured, their ratio and
each round's written to the JSON (a record of what ran, not a speed assertion)."""

from __future__ import annotations

import json
from pathlib import Path

from nextserve.cluster.cli.main import main


def test_grammar_bench_from_the_cli(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "grammar.json"
    assert main(["bench", "grammar", "--model", str(tiny_dir), "--batch", "2", "--max-tokens", "8", "--rounds", "2",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["free_tpot_ms_p50"] > 0 and result["constrained_tpot_ms_p50"] > 0
    # ratio is constrained / free of the unrounded p50s (then rounded to 0.001); the JSON's p50s are rounded to
    # 0.01 ms, so their quotient may differ in the last digit (0.945 against 15.73 / 16.66 = 0.944, seen)
    c, f = result["constrained_tpot_ms_p50"], result["free_tpot_ms_p50"]
    assert (c - 0.005) / (f + 0.005) - 5e-4 <= result["ratio"] <= (c + 0.005) / (f - 0.005) + 5e-4
    assert len(result["round_ratios"]) == 2 and 1 <= result["constrained_tokens_mean"] <= 8
