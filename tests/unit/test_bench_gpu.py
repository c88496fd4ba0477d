"""`nextserve bench gpu` in its CPU mode (tiny shapes): the JSON has a row per batch size and the check
against the CPU float32 reference passes; a broken bench model fails the check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nextserve.bench.gpu_bench import bench_config, build_models, check
from nextserve.cluster.cli.main import main


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_gpu_on_cpu_writes_rows_and_passes_the_check(tmp_path: Path, dtype: str) -> None:
    out = tmp_path / "gpu.json"
    rc = main(["bench", "gpu", "--device", "cpu", "--dtype", dtype, "--tiny-shapes", "--batches", "1,3",
               "--prompt-len", "8", "--steps", "2", "--json-out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0, result["check"]
    assert result["check"]["passed"] and result["check"]["token_agreement"] >= 0.5
    if dtype == "float32":  # the same arithmetic on the same device: bitwise equal
        assert result["check"]["max_abs_diff"] == 0.0
    assert result["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert [r["batch"] for r in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert row["step_ms"] > 0 and row["head_ms"] > 0 and row["experts_ms"] > 0
        assert row["step_tok_s"] == pytest.approx(row["batch"] / row["step_ms"] * 1e3)
        assert row["peak_mem_gib"] is None  # CUDA only


def test_published_shapes_come_from_the_published_config() -> None:
    config = bench_config(4, tiny_shapes=False)
    assert (config.hidden_size, config.num_experts, config.num_experts_per_tok) == (2048, 512, 10)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (16, 2, 256)
    assert config.moe_layers == (0, 1, 2, 3)


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_broken_bench_model_fails_the_check(dtype: torch.dtype) -> None:
    """float32 on the CPU too: the reference must hold tensors of its own, not the bench model's."""
    config = bench_config(4, tiny_shapes=True)
    bench, ref = build_models(config, torch.device("cpu"), dtype, seed=0)
    assert check(bench, ref, dtype, None, seed=0).passed
    bench.head.lm_head.weight.copy_(bench.head.lm_head.weight.roll(1, dims=0))  # logits of the wrong tokens
    result = check(bench, ref, dtype, None, seed=0)
    assert not result.passed and result.rel_l2 > 1.0
