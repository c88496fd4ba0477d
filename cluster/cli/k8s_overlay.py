"""The GPU overlay's capacity patch (k8s/overlays/gpu/capacity-patch.yaml), rendered from a capacity plan
(model/capacity.py, pure arithmetic): the RayService's serveConfigV2, the worker groups' sizes, memory and
node selectors, with the plan's arithmetic, in numbers, in its comments. `nextserve plan --gpu G
--emit-overlay` writes it; tests/test_capacity.py checks the checked-in file is what the command makes.
"""

from __future__ import annotations

from nextserve.cluster.app_args import AppArgs
from nextserve.model.capacity import HOST_OVERHEAD_BYTES, CapacityPlan, GiB, GpuSpec
from nextserve.model.config import Qwen3NextConfig
from nextserve.model.sizes import ModelSizes

# Where the gpu overlay puts things (k8s/base): tests/test_capacity.py checks these against the manifests.
MODEL_MOUNT = "/models"
REGISTRY_REDIS_URL = "redis://redis:6379/1"
"""The registry's Redis (the `redis` Service); db 1, so Ray's GCS fault tolerance keeps db 0 to itself."""
REDIS_PASSWORD_ENV = "NEXTSERVE_REDIS_PASSWORD"
"""Set on every Ray pod from the `nextserve-redis` Secret (not REDIS_PASSWORD: KubeRay reserves that
name on the head pod when gcsFaultToleranceOptions is set)."""
ADMIN_TOKEN_ENV = "NEXTSERVE_ADMIN_TOKEN"
"""Set on every Ray pod from the `nextserve-admin` Secret: the expert workers' admin token (AppArgs.admin_token_env)."""
HEADS_GROUP, EXPERTS_GROUP = 0, 1
"""Indices of the `heads` and `experts` worker groups in the RayService's workerGroupSpecs."""


def _gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB"


def _scales(sizes: ModelSizes) -> str:
    return f" FP8 + {sizes.routed_expert_scale_bytes:,} B of block scales" if sizes.routed_expert_scale_bytes else ""


def _arithmetic(plan: CapacityPlan, config: Qwen3NextConfig, sizes: ModelSizes) -> list[str]:
    E, L, R, N = config.num_experts, len(config.expert_layers), plan.expert_replicas, plan.num_expert_workers
    rounds = len(config.moe_layers)
    k, H, nbytes = config.num_experts_per_tok, config.hidden_size, sizes.dtype_bytes
    return [
        f"GPU {plan.gpu}: {plan.gpu_total_bytes:,} B as the driver reports it; {plan.reserve_percent}% reserved "
        f"(CUDA context, activations, allocator slack) -> usable {plan.usable_bytes_per_gpu:,} B per GPU.",
        f"Experts: {E} per layer x {L} MoE layers ({len(config.mtp_layers)} of them MTP) x "
        f"{sizes.bytes_per_routed_expert:,} B "
        f"(3 x {H} x {config.moe_intermediate_size} x {sizes.routed_expert_weight_bytes} B{_scales(sizes)}) "
        f"= {sizes.bytes_all_routed_experts:,} B "
        f"({_gib(sizes.bytes_all_routed_experts)}), R = {R}.",
        f"  N must satisfy ceil({E} x {R} / N) x {L} x {sizes.bytes_per_routed_expert:,} <= "
        f"{plan.usable_bytes_per_gpu:,}: at most {plan.max_experts_per_layer_per_worker} experts per layer per worker",
        f"  -> N = ceil({E * R} / {plan.max_experts_per_layer_per_worker}) = {N} expert workers, "
        f"{plan.experts_per_layer_per_worker} per layer each = {plan.bytes_per_expert_worker:,} B "
        f"({_gib(plan.bytes_per_expert_worker)}).",
        f"  Live moves: at most {plan.usable_bytes_per_gpu:,} // {sizes.bytes_per_routed_expert:,} = "
        f"{plan.max_experts_per_worker:,} (layer, expert) pairs on a worker at any moment "
        f"(max_experts_per_worker): a scale or rebalance moves in waves within it.",
        f"Heads: weights {plan.head_weight_bytes:,} B; a sequence of {plan.context_tokens:,} tokens holds KV "
        f"{sizes.kv_bytes_per_token:,} B x {plan.cache_block_size} x ceil({plan.context_tokens:,} / "
        f"{plan.cache_block_size}) = {plan.kv_bytes_per_sequence:,} B",
        f"  + DeltaNet state {plan.deltanet_state_bytes_per_sequence:,} B = {plan.bytes_per_sequence:,} B",
        f"  cache_memory = {plan.usable_bytes_per_gpu:,} - {plan.head_weight_bytes:,} = "
        f"{plan.cache_memory_bytes_per_head:,} B, of which {plan.cache_num_snapshots} prefix-cache snapshots x "
        f"{plan.deltanet_state_bytes_per_sequence:,} B (its share)",
        f"  -> the rest // {plan.bytes_per_sequence:,} = {plan.max_sequences_per_head} sequences per head replica "
        f"(max_num_seqs): {plan.cache_num_blocks:,} KV blocks of {plan.cache_block_size} tokens + "
        f"{plan.cache_num_slots} state slots",
        f"  -> concurrency {plan.concurrency} needs M = ceil({plan.concurrency} / {plan.max_sequences_per_head}) = "
        f"{plan.num_head_replicas} head replicas.",
        f"Dispatch: {rounds} layers x min({k}, {N}) workers x {H} x {nbytes} B x 2 = "
        f"{plan.dispatch_bytes_per_token_deduped:,} B per token (no-dedup bound {sizes.dispatch_bytes_per_token:,} B).",
        f"Host memory: GPU-side bytes + {_gib(HOST_OVERHEAD_BYTES)}, rounded up to GiB: experts "
        f"{plan.host_memory_bytes_expert // GiB}Gi, heads {plan.host_memory_bytes_head // GiB}Gi.",
    ]


def _serve_config(plan: CapacityPlan, model_dir_name: str, dtype: str) -> list[str]:
    return [
        "applications:",
        "  - name: nextserve",
        "    import_path: nextserve.cluster.app:build_app",
        "    route_prefix: /",
        "    args:",
        f"      model: {MODEL_MOUNT}/{model_dir_name}",
        f"      model_name: {model_dir_name}",
        f"      dtype: {dtype}",
        f"      expert_workers: {plan.num_expert_workers}",
        f"      expert_replicas: {plan.expert_replicas}",
        f"      max_experts_per_worker: {plan.max_experts_per_worker}",
        f"      head_replicas: {plan.num_head_replicas}",
        # Serve adds head replicas past M on load, the experts pool grows on measured busy time; the
        # groups' min/max replicas below are the same ranges, so KubeRay's autoscaler gives them pods
        f"      autoscale_heads: '{plan.num_head_replicas}:{2 * plan.num_head_replicas}'",
        f"      autoscale_expert_workers: '{plan.num_expert_workers}:{2 * plan.num_expert_workers}'",
        f"      max_num_seqs: {plan.max_sequences_per_head}",
        f"      cache_memory: '{plan.cache_memory_bytes_per_head}'",
        f"      block_size: {plan.cache_block_size}",
        # at least the default, and a full decode batch fits a step
        f"      max_tokens_per_step: {max(AppArgs.model_fields['max_tokens_per_step'].default, plan.max_sequences_per_head)}",
        "      head_num_gpus: 1",  # each heads pod has one GPU (gpu-patch.yaml); the replica takes it
        "      micro_batches: 2",  # ping-pong: the head's GPU computes while the expert round flies
        f"      redis_url: {REGISTRY_REDIS_URL}",
        f"      redis_password_env: {REDIS_PASSWORD_ENV}",
        f"      admin_token_env: {ADMIN_TOKEN_ENV}",
    ]


def _group_ops(index: int, name: str, replicas: int, max_replicas: int, memory_bytes: int,
               product_label: str) -> list[str]:
    group = f"/spec/rayClusterConfig/workerGroupSpecs/{index}"
    container = f"{group}/template/spec/containers/0/resources"
    ops = [(f"{group}/replicas", replicas), (f"{group}/minReplicas", replicas),
           (f"{group}/maxReplicas", max_replicas), (f"{container}/requests/memory", f"{memory_bytes // GiB}Gi"),
           (f"{container}/limits/memory", f"{memory_bytes // GiB}Gi")]
    lines = [f"- op: replace\n  path: {path}\n  value: {value}" for path, value in ops]
    lines.append(f"- op: add\n  path: {group}/template/spec/nodeSelector\n  value:\n"
                 f"    nvidia.com/gpu.product: {product_label}\n    nextserve.io/pool: {name}")
    return lines


def gpu_overlay_patch(plan: CapacityPlan, config: Qwen3NextConfig, sizes: ModelSizes, *, gpu: GpuSpec,
                      model_dir_name: str, dtype: str, command: str) -> str:
    """The JSON 6902 patch of k8s/overlays/gpu/capacity-patch.yaml: serveConfigV2, group sizes, memory,
    node selectors. Head replicas autoscale within M:2M and expert workers within N:2N (one per pod, N the
    fewest that hold the experts), the groups' minReplicas / maxReplicas the same ranges."""
    header = [f"# Generated by: {command}", "# Do not edit: rerun the command (tests/test_capacity.py compares).",
              "#"] + [f"# {line}" for line in _arithmetic(plan, config, sizes)]
    serve = "\n".join(f"    {line}" for line in _serve_config(plan, model_dir_name, dtype))
    ops = [f"- op: replace\n  path: /spec/serveConfigV2\n  value: |\n{serve}"]
    ops += _group_ops(HEADS_GROUP, "heads", plan.num_head_replicas, 2 * plan.num_head_replicas,
                      plan.host_memory_bytes_head, gpu.product_label)
    ops += _group_ops(EXPERTS_GROUP, "experts", plan.num_expert_workers, 2 * plan.num_expert_workers,
                      plan.host_memory_bytes_expert, gpu.product_label)
    return "\n".join(header + ops) + "\n"
