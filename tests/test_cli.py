"""The CLI as a user runs it: make-tiny, generate, plan and bench model, in subprocesses."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nextserve.model.tiny import TINY_VERSION
from nextserve.model.tiny import TINY_CONFIG

NEXTSERVE = [sys.executable, "-m", "nextserve.cluster.cli"]
ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(NEXTSERVE + args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_make_tiny_is_deterministic_and_loads_in_transformers(tiny_dir: Path, tmp_path: Path) -> None:
    result = _run(["make-tiny", str(tmp_path / "again")])
    assert result.returncode == 0, result.stderr
    assert _digest(tmp_path / "again") == _digest(tiny_dir)
    assert (tiny_dir / "model.safetensors.index.json").exists()
    assert len(list(tiny_dir.glob("model-*.safetensors"))) > 1
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Qwen3NextForCausalLM"
    assert model.config.num_experts == 64 and model.config.num_hidden_layers == 8
    assert [t == "full_attention" for t in model.config.layer_types] == [False, False, False, True] * 2
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert len(tok) == TINY_CONFIG["vocab_size"] and tok.eos_token_id == TINY_CONFIG["eos_token_id"]


def test_generate_json_matches_transformers(tiny_dir: Path) -> None:
    prompts = ["def fibonacci(n):", "The quick brown fox"]
    result = _run(["generate", "--model", str(tiny_dir), "--max-tokens", "12", "--json", *prompts])
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == prompts
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    for line in lines:
        ids = tok(line["prompt"], return_tensors="pt")["input_ids"]
        want = ref.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
        assert line["token_ids"] == want
        assert line["text"] == tok.decode(want, skip_special_tokens=True)


def test_generate_tiny_is_made_on_first_use(tmp_path: Path) -> None:
    result = _run(["generate", "--model", "tiny", "--max-tokens", "3", "--json", "hi"],
                  env={"NEXTSERVE_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["token_ids"]) == 3
    assert (tmp_path / f"tiny-{TINY_VERSION}" / "config.json").exists()


def test_generate_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    result = _run(["generate", "--model", str(tmp_path), "x"])
    assert result.returncode == 2 and "no config.json" in result.stderr
    result = _run(["generate", "--model", "tiny", "--top-p", "0", "x"], env={"NEXTSERVE_CACHE": str(tmp_path)})
    assert result.returncode == 2 and "top_p" in result.stderr


def test_plan_prints_the_published_counts() -> None:
    result = _run(["plan", "--config", "qwen3-coder-next", "--json"])
    assert result.returncode == 0, result.stderr
    sizes = json.loads(result.stdout)
    assert sizes["total_params"] == 79_674_391_296 and sizes["active_params"] == 3_874_929_408
    table = _run(["plan"]).stdout
    assert "79,674,391,296" in table


@pytest.mark.slow
def test_bench_model_reports_both_sides(tiny_dir: Path) -> None:
    result = _run(["bench", "model", "--model", str(tiny_dir), "--batch", "2", "--prompt-len", "16",
                   "--decode-tokens", "4", "--repeats", "1", "--json"])
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout.splitlines()[-1])
    for key in ("prefill_tok_s", "decode_tok_s", "hf_prefill_tok_s", "hf_decode_tok_s", "prefill_ratio", "decode_ratio"):
        assert r[key] > 0
