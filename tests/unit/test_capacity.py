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

# MODEL.md §11, bf16, plus the one MTP layer the checkpoint ships (a full-attention MoE layer, layer 48):
# one routed expert 3·2048·512·2 B; 512 × (48 + 1) of them; head (non-routed) params × 2 B, the MTP layer's
# 39,858,688 included; KV (12 + 1) layers × 2 × 2 heads × 256 × 2 B per token; DeltaNet state
# 36 × (32·128·128·4 + 8192·4·2) B.
EXPERT_BYTES = 6_291_456
ROW_BYTES = 49 * EXPERT_BYTES  # one expert index across the 48 MoE layers + the MTP layer = 308,281,344
HEAD_BYTES = 2 * (2_364_979_968 + 39_858_688)  # 4,809,677,312
KV_PER_TOKEN = 26_624
DELTANET_PER_SEQ = 77_856_768


def test_sizes_are_model_md_numbers() -> None:
    assert SIZES.bytes_per_routed_expert == EXPERT_BYTES
    assert SIZES.bytes_all_routed_experts == 157_840_048_128 == 512 * ROW_BYTES
    assert (SIZES.bytes_per_head_replica, SIZES.kv_bytes_per_token) == (HEAD_BYTES, KV_PER_TOKEN)
    assert SIZES.deltanet_state_bytes_per_sequence == DELTANET_PER_SEQ


def test_h100_plan_by_hand() -> None:
    plan = plan_capacity(CONFIG, SIZES, GPUS["h100-80gb"], concurrency=256, context_tokens=32_768)
    assert plan.gpu_total_bytes == 81_559 * MiB == 85_520_809_984
    assert plan.usable_bytes_per_gpu == 76_968_728_985  # 85,520,809,984 × 0.9, floored
    # 249 × 308,281,344 = 76,762,054,656 fits; 250 × = 77,070,336,000 does not
    assert plan.max_experts_per_layer_per_worker == 249
    assert plan.num_expert_workers == 3  # ceil(512 / 249)
    assert plan.experts_per_layer_per_worker == 171  # ceil(512 / 3)
    assert plan.bytes_per_expert_worker == 171 * ROW_BYTES == 52_716_109_824
    assert plan.kv_bytes_per_sequence == 26_624 * 32_768 == 872_415_232
    assert plan.bytes_per_sequence == 872_415_232 + 77_856_768 == 950_272_000
    # cache_memory = 76,968,728,985 − 4,809,677,312 = 72,159,051,673; the prefix cache's 20 % share,
    # 14,431,810,334 B, holds 185 snapshots of 77,856,768 B (14,403,502,080 B); the rest, 57,755,549,593 B,
    # holds 60 sequences of 950,272,000 B (57,016,320,000 B; 61 would be 57,966,592,000)
    assert plan.cache_memory_bytes_per_head == 72_159_051_673 and plan.cache_num_snapshots == 185
    assert plan.max_sequences_per_head == plan.cache_num_slots == 60
    assert plan.cache_num_blocks == 60 * 2048  # each slot's 32,768 tokens in blocks of 16
    assert plan.num_head_replicas == 5  # ceil(256 / 60)
    assert plan.dispatch_bytes_per_token_deduped == 48 * 3 * 2048 * 2 * 2 == 1_179_648
    assert SIZES.dispatch_bytes_per_token == 48 * 10 * 2048 * 2 * 2 == 3_932_160  # no dedup
    assert plan.host_memory_bytes_expert == 58 * GiB  # 52,716,109,824 + 8 GiB = 57.10 GiB, rounded up


def test_h200_and_a100_plans_by_hand() -> None:
    h200 = plan_capacity(CONFIG, SIZES, GPUS["h200"], concurrency=256, context_tokens=32_768)
    assert h200.usable_bytes_per_gpu == 143_771 * MiB * 9 // 10 == 135_679_338_086
    assert h200.max_experts_per_layer_per_worker == 440  # 440 × 308,281,344 = 135,643,791,360
    assert (h200.num_expert_workers, h200.experts_per_layer_per_worker) == (2, 256)
    assert h200.bytes_per_expert_worker == 256 * ROW_BYTES == 73.5 * GiB
    # 130,869,660,774 B of cache: 336 snapshots (26,159,874,048 B, within 20 %), then the rest
    # 104,709,786,726 // 950,272,000 = 110 sequences
    assert (h200.cache_num_snapshots, h200.max_sequences_per_head) == (336, 110)
    assert h200.num_head_replicas == 3
    a100 = plan_capacity(CONFIG, SIZES, GPUS["a100-80gb"], concurrency=1, context_tokens=1)
    # 72 GiB held exactly 256 experts of 48 layers (two workers); with the MTP layer's 49th, 250 fit
    assert a100.usable_bytes_per_gpu == 72 * GiB and a100.max_experts_per_layer_per_worker == 250
    assert (a100.num_expert_workers, a100.bytes_per_expert_worker) == (3, 171 * ROW_BYTES)


def test_replication_multiplies_the_expert_bytes() -> None:
    plan = plan_capacity(CONFIG, SIZES, GPUS["h200"], concurrency=1, context_tokens=1024, expert_replicas=2)
    assert plan.num_expert_workers == 3  # ceil(1024 / 449)
    assert plan.experts_per_layer_per_worker == 342  # ceil(1024 / 3)


@pytest.mark.parametrize("gpu,replication", [("h100-80gb", 1), ("l40s", 1), ("h200", 2)])
def test_plan_matches_the_placement_it_stands_for(gpu: str, replication: int) -> None:
    plan = plan_capacity(CONFIG, SIZES, GPUS[gpu], concurrency=1, context_tokens=1024, expert_replicas=replication)
    placement = build_placement(CONFIG.expert_layers, CONFIG.num_experts, plan.num_expert_workers, replication)
    assert placement.layers == tuple(range(49))  # the MTP layer's experts are placed like any layer's
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
    assert out["bytes_all_routed_experts"] == 157_840_048_128
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
