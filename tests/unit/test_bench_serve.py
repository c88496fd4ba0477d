"""`bench serve`: the workload and statistics (pure), then one run end to end through the real gateway
(the real engine on the tiny checkpoint, in-process) against transformers' generate."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from nextserve.bench.prompt_ids import checkpoint_prompt_token_ids
from nextserve.bench.serve_bench import (MIN_OUTPUT_TOKENS, BenchError, RequestResult, add_parser, cold_twin,
                                         left_pad, make_workload, percentile, run,
                                         summarize, time_per_output_token_s)
from gateway_local_engine import Server

IDS = list(range(3, 2048))


def test_workload_is_reproducible_from_its_seed() -> None:
    a = make_workload(50, 64, 32, IDS, seed=7)
    assert a == make_workload(50, 64, 32, IDS, seed=7)
    assert a != make_workload(50, 64, 32, IDS, seed=8)


@pytest.mark.parametrize("prompt_len, max_tokens", [(1, 8), (11, 9), (127, 64)])
def test_workload_lengths_and_ids_stay_in_bounds(prompt_len: int, max_tokens: int) -> None:
    workload = make_workload(400, prompt_len, max_tokens, IDS, seed=0)
    prompt_lens = {len(r.prompt_ids) for r in workload}
    outputs = {r.max_tokens for r in workload}
    assert min(prompt_lens) >= 1 and max(prompt_lens) == prompt_len
    assert min(outputs) >= MIN_OUTPUT_TOKENS and max(outputs) == max_tokens
    assert len(prompt_lens) >= min(prompt_len, 10)  # spread over the range, not one length
    ids = [t for r in workload for t in r.prompt_ids]
    assert set(ids) <= set(IDS)


def test_fixed_lengths_make_every_request_the_worst_case() -> None:
    workload = make_workload(20, 33, 5, IDS, seed=1, fixed_lengths=True)
    assert all(len(r.prompt_ids) == 33 and r.max_tokens == 5 for r in workload)
    assert len({r.prompt_ids for r in workload}) == 20  # the ids still vary


@pytest.mark.parametrize("kwargs", [dict(num_requests=0), dict(prompt_len=0), dict(max_tokens=7),
                                    dict(token_ids=[])])
def test_bad_workload_is_a_typed_error(kwargs: dict[str, object]) -> None:
    args = dict(num_requests=4, prompt_len=8, max_tokens=16, token_ids=IDS, seed=0) | kwargs
    with pytest.raises(BenchError):
        make_workload(**args)


@pytest.mark.parametrize("n", [1, 2, 11, 100])
@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
def test_percentile_matches_numpy(n: int, q: float) -> None:
    values = list(np.random.default_rng(n).exponential(size=n))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_refuses_nothing_and_bad_q() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_skips_errors_and_single_token_tpot() -> None:
    assert time_per_output_token_s(1.0, 1.9, 10) == pytest.approx(0.1)
    assert time_per_output_token_s(1.0, 1.0, 1) is None
    results = [RequestResult(10, 0.2, 0.01), RequestResult(1, 0.4, None), RequestResult(0, None, None, "boom")]
    row = summarize(4, results, duration_s=2.0)
    assert (row.requests, row.errors, row.output_tokens, row.throughput_tok_s) == (3, 1, 11, 5.5)
    assert row.ttft_ms_p50 == pytest.approx(300) and row.tpot_ms_p50 == pytest.approx(10)


def test_left_pad_puts_the_padding_and_mask_on_the_left() -> None:
    ids, mask = left_pad([(5, 6, 7), (9,)])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="bench", required=True))
    return parser.parse_args(["serve", *argv])


@pytest.mark.timeout(60)
def test_end_to_end_through_the_gateway_vs_transformers(server: Server, tiny_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "curve.png"
    args = parse(["--url", server.url, "--model", str(tiny_dir), "--requests", "6", "--concurrency", "2",
                  "--prompt-len", "16", "--max-tokens", "12", "--vs-transformers", "--json", "--plot", str(png)])
    assert run(args) == 0
    (line,) = capsys.readouterr().out.splitlines()
    row = json.loads(line)
    assert {"throughput_tok_s", "ttft_ms_p50", "tpot_ms_p50", "baseline_throughput_tok_s", "ratio", "errors"} <= set(row)
    assert row["errors"] == 0 and row["requests"] == 6
    workload = make_workload(6, 16, 12, checkpoint_prompt_token_ids(tiny_dir), seed=0)  # the one run() sent
    expected_tokens = sum(r.max_tokens for r in workload)
    assert row["output_tokens"] == expected_tokens  # ignore_eos: each request delivered exactly what it asked
    assert row["throughput_tok_s"] > 0 and row["ratio"] > 0 and row["ttft_ms_p50"] > 0 and row["tpot_ms_p50"] > 0
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert json.loads(png.with_suffix(".json").read_text()) == row


def test_prompts_use_only_the_tokenizers_regular_ids_when_the_embedding_is_padded(tiny_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """Qwen3-Coder-Next's config says vocab_size 151,936, its tokenizer has 151,669 tokens, and the server
    refuses ids in between: a checkpoint whose config pads past its tokenizer gets prompts below len(tokenizer)."""
    padded = tmp_path / "padded"
    shutil.copytree(tiny_dir, padded, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    config = json.loads((padded / "config.json").read_text())
    config["vocab_size"] += 267
    (padded / "config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(padded)
    assert len(tokenizer) < config["vocab_size"]
    drawn = {t for r in make_workload(300, 64, 8, checkpoint_prompt_token_ids(padded), seed=0) for t in r.prompt_ids}
    assert max(drawn) < len(tokenizer) and not drawn & set(tokenizer.all_special_ids)
    assert len(drawn) > 1000  # spread over the vocabulary


def test_unreachable_gateway_is_a_clear_error(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["--url", "http://127.0.0.1:9", "--model", str(tiny_dir), "--requests", "2"])
    assert run(args) == 2
    assert "is `nextserve up` running" in capsys.readouterr().err


def test_shared_prefix_workload_and_its_cold_twin(tiny_dir: Path) -> None:
    ids = checkpoint_prompt_token_ids(tiny_dir)
    shared = make_workload(8, 16, 12, ids, seed=4, shared_prefix=40)
    prefix = shared[0].prompt_ids[:40]
    assert all(r.prompt_ids[:40] == prefix and 41 <= len(r.prompt_ids) <= 56 for r in shared)
    cold = cold_twin(shared, ids, seed=4)
    assert [len(r.prompt_ids) for r in cold] == [len(r.prompt_ids) for r in shared]
    assert [r.max_tokens for r in cold] == [r.max_tokens for r in shared]
    assert len({r.prompt_ids[:40] for r in cold}) == 8  # nothing shared


@pytest.mark.timeout(60)
def test_shared_prefix_runs_the_shared_and_the_cold_workload(server: Server, tiny_dir: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["--url", server.url, "--model", str(tiny_dir), "--requests", "4", "--concurrency", "2",
                  "--prompt-len", "8", "--max-tokens", "8", "--shared-prefix", "48", "--json"])
    assert run(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["workload"] for r in rows] == ["shared-prefix", "cold"]
    assert all(r["errors"] == 0 and r["requests"] == 4 and r["ttft_ms_p50"] > 0 for r in rows)
    assert rows[1]["cached_tokens_mean"] == 0  # the cold twin shares nothing


@pytest.mark.timeout(120)
def test_in_process_peer_and_cpu_table(server: Server, tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--in-process runs the same workload on the same engine with in-process experts (the tax is the ratio);
    --cpu adds the per-token CPU table (roles of this machine's cluster processes; none run for this
    in-process test server, so the served side reads 0 and only the table's shape is checked here)."""
    args = parse(["--url", server.url, "--model", str(tiny_dir), "--requests", "4", "--concurrency", "2",
                  "--prompt-len", "8", "--max-tokens", "8", "--in-process", "--cpu"])
    assert run(args) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()[:2]
    cells = dict(zip(header.split(), row.split()))
    assert float(cells["in_process_tok/s"]) > 0 and float(cells["tax"]) > 0
    assert "CPU ms per output token" in out and "head" in out and "in_process" in out
    args = parse(["--url", server.url, "--model", str(tiny_dir), "--in-process", "--shared-prefix", "8"])
    assert run(args) == 2
    assert "--in-process runs the default workload" in capsys.readouterr().err
