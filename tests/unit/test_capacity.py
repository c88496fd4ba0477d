"""The capacity planner against hand arithmetic for the published Qwen3-Coder-Next config (sizes from
shared/MODEL.md §11), against the placement it stands for, and the gpu overlay against the planner."""

from __future__ import annotations

import json
import shlex
from collections import Counter
from pathlib import Path

import pytest

from nextserve.cluster.cli.main import main
from nextserve.model.capacity import GPUS, CapacityError, GiB, MiB, plan_capacity
from nextserve.model.config import PUBLISHED_CONFIGS, Qwen3NextConfig
from nextserve.model.sizes import model_sizes
from nextserve.router.placement import build_placement

CONFIG = Qwen3NextConfig.from_dict(PUBLISHED_CONFIGS["qwen3-coder-next"])
SIZES = model_sizes(CONFIG)
K8S = Path(__file__).resolve().parents[2] / "k8s"
OVERLAY_PATCH = K8S / "overlays" / "gpu" / "capacity-patch.yaml"

# MODEL.md §11, bf16: one routed expert 3·2048·512·2 B; 512 × 48 of them; head (non-routed) params × 2 B;
# KV 12 layers × 2 × 2 heads × 256 × 2 B per token; DeltaNet state 36 × (32·128·128·4 + 8192·4·2) B.
EXPERT_BYTES = 6_291_456
ROW_BYTES = 48 * EXPERT_BYTES  # one expert index across the 48 MoE layers = 301,989,888
HEAD_BYTES = 2 * 2_364_979_968  # 4,729,959,936
KV_PER_TOKEN = 24_576
DELTANET_PER_SEQ = 77_856_768


def test_sizes_are_model_md_numbers() -> None:
    assert SIZES.bytes_per_routed_expert == EXPERT_BYTES
    assert SIZES.bytes_all_routed_experts == 154_618_822_656 == 512 * ROW_BYTES
    assert (SIZES.bytes_per_head_replica, SIZES.kv_bytes_per_token) == (HEAD_BYTES, KV_PER_TOKEN)
    assert SIZES.deltanet_state_bytes_per_sequence == DELTANET_PER_SEQ


def test_h100_plan_by_hand() -> None:
    plan = plan_capacity(CONFIG, SIZES, GPUS["h100-80gb"], concurrency=256, context_tokens=32_768)
    assert plan.gpu_total_bytes == 81_559 * MiB == 85_520_809_984
    assert plan.usable_bytes_per_gpu == 76_968_728_985  # 85,520,809,984 × 0.9, floored
    # 254 × 301,989,888 = 76,705,431,552 fits; 255 × = 77,007,421,440 does not
    assert plan.max_experts_per_layer_per_worker == 254
    assert plan.num_expert_workers == 3  # ceil(512 / 254)
    assert plan.experts_per_layer_per_worker == 171  # ceil(512 / 3)
    assert plan.bytes_per_expert_worker == 171 * ROW_BYTES == 51_640_270_848
    assert plan.kv_bytes_per_sequence == 24_576 * 32_768 == 805_306_368
    assert plan.bytes_per_sequence == 805_306_368 + 77_856_768 == 883_163_136
    # cache_memory = 76,968,728,985 − 4,729,959,936 = 72,238,769,049; the prefix cache's 20 % share,
    # 14,447,753,809 B, holds 185 snapshots of 77,856,768 B (14,403,502,080 B); the rest, 57,835,266,969 B,
    # holds 65 sequences of 883,163,136 B (57,405,603,840 B; 66 would be 58,288,766,976)
    assert plan.cache_memory_bytes_per_head == 72_238_769_049 and plan.cache_num_snapshots == 185
    assert plan.max_sequences_per_head == plan.cache_num_slots == 65
    assert plan.cache_num_blocks == 65 * 2048  # each slot's 32,768 tokens in blocks of 16
    assert plan.num_head_replicas == 4  # ceil(256 / 65)
    assert plan.dispatch_bytes_per_token_deduped == 48 * 3 * 2048 * 2 * 2 == 1_179_648
    assert SIZES.dispatch_bytes_per_token == 48 * 10 * 2048 * 2 * 2 == 3_932_160  # no dedup
    assert plan.host_memory_bytes_expert == 57 * GiB  # 51,640,270,848 + 8 GiB = 56.09 GiB, rounded up


def test_h200_and_a100_plans_by_hand() -> None:
    h200 = plan_capacity(CONFIG, SIZES, GPUS["h200"], concurrency=256, context_tokens=32_768)
    assert h200.usable_bytes_per_gpu == 143_771 * MiB * 9 // 10 == 135_679_338_086
    assert h200.max_experts_per_layer_per_worker == 449  # 449 × 301,989,888 = 135,593,459,712
    assert (h200.num_expert_workers, h200.experts_per_layer_per_worker) == (2, 256)
    assert h200.bytes_per_expert_worker == 72 * GiB
    # 130,949,378,150 B of cache: 336 snapshots (26,159,874,048 B, within 20 %), then the rest
    # 104,789,504,102 // 883,163,136 = 118 sequences
    assert (h200.cache_num_snapshots, h200.max_sequences_per_head) == (336, 118)
    assert h200.num_head_replicas == 3
    a100 = plan_capacity(CONFIG, SIZES, GPUS["a100-80gb"], concurrency=1, context_tokens=1)
    assert a100.usable_bytes_per_gpu == 72 * GiB == 256 * ROW_BYTES  # exactly two workers' worth
    assert (a100.num_expert_workers, a100.bytes_per_expert_worker) == (2, 72 * GiB)


def test_replication_multiplies_the_expert_bytes() -> None:
    plan = plan_capacity(CONFIG, SIZES, GPUS["h200"], concurrency=1, context_tokens=1024, expert_replicas=2)
    assert plan.num_expert_workers == 3  # ceil(1024 / 449)
    assert plan.experts_per_layer_per_worker == 342  # ceil(1024 / 3)


@pytest.mark.parametrize("gpu,replication", [("h100-80gb", 1), ("l40s", 1), ("h200", 2)])
def test_plan_matches_the_placement_it_stands_for(gpu: str, replication: int) -> None:
    plan = plan_capacity(CONFIG, SIZES, GPUS[gpu], concurrency=1, context_tokens=1024, expert_replicas=replication)
    placement = build_placement(CONFIG.moe_layers, CONFIG.num_experts, plan.num_expert_workers, replication)
    per_worker_layer = Counter((w, layer) for layer in placement.layers
                               for workers in placement.layer_to_expert_workers[layer] for w in workers)
    assert max(per_worker_layer.values()) == plan.experts_per_layer_per_worker
    assert max(per_worker_layer.values()) * ROW_BYTES <= plan.usable_bytes_per_gpu


def test_too_long_a_context_is_a_typed_error_with_the_fix() -> None:
    with pytest.raises(CapacityError, match="lower --context"):
        plan_capacity(CONFIG, SIZES, GPUS["a10g"], concurrency=1, context_tokens=10_000_000)


def test_gpu_overlay_patch_is_what_the_planner_emits(capsys: pytest.CaptureFixture[str]) -> None:
    first_line = OVERLAY_PATCH.read_text().splitlines()[0]
    command = shlex.split(first_line.removeprefix("# Generated by: "))
    assert command[:2] == ["nextserve", "plan"] and "--emit-overlay" in command
    assert main(command[1:]) == 0
    stale = f"stale: rerun `{shlex.join(command)} > {OVERLAY_PATCH}`"
    assert capsys.readouterr().out == OVERLAY_PATCH.read_text(), stale


def test_plan_json_with_a_gpu_adds_the_capacity(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--gpu", "h200", "--concurrency", "256", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bytes_all_routed_experts"] == 154_618_822_656
    assert (out["capacity"]["num_expert_workers"], out["capacity"]["num_head_replicas"]) == (2, 3)


def test_emit_overlay_needs_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--emit-overlay"]) == 2
    assert "--emit-overlay needs --gpu" in capsys.readouterr().err


FP8_CONFIG = Qwen3NextConfig.from_dict(PUBLISHED_CONFIGS["qwen3-coder-next-fp8"])


def test_an_fp8_routed_expert_counts_its_fp8_bytes_and_scales() -> None:
    """1 B per weight + float32 scales per 128 x 128 block (gate, up: 4 x 16 blocks; down: 16 x 4) = 0.500x."""
    fp8 = model_sizes(FP8_CONFIG)
    assert fp8.routed_expert_scale_bytes == (4 * 16 + 4 * 16 + 16 * 4) * 4 == 768
    assert fp8.bytes_per_routed_expert == 3 * 2048 * 512 + 768 == 3_146_496
    assert fp8.bytes_per_routed_expert <= 0.55 * SIZES.bytes_per_routed_expert
    assert fp8.bytes_per_head_replica == SIZES.bytes_per_head_replica  # heads dequantize at load: bf16
    for gpu, bf16_workers, fp8_workers in (("h100-80gb", 3, 2), ("h200", 2, 1)):
        plans = [plan_capacity(c, model_sizes(c), GPUS[gpu], concurrency=256, context_tokens=32768)
                 for c in (CONFIG, FP8_CONFIG)]
        assert [p.num_expert_workers for p in plans] == [bf16_workers, fp8_workers]


def test_fp8_overlay_shows_the_fp8_arithmetic(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--config", "qwen3-coder-next-fp8", "--gpu", "h100-80gb", "--emit-overlay"]) == 0
    out = capsys.readouterr().out
    assert "x 3,146,496 B (3 x 2048 x 512 x 1 B FP8 + 768 B of block scales)" in out
    assert "expert_workers: 2" in out
