"""Capacity planning: expert workers and head replicas for a model on a GPU type, from its sizes.

Pure arithmetic over `ModelSizes` (computed from the config) and the GPU table below; no torch, no I/O.
Letters: E = routed experts per layer, L = MoE layers, R = replicas of every expert, N = expert
workers (one GPU each), M = head replicas (one GPU each), k = top-k, H = hidden size.

    usable    = total * (100 - reserve_percent) // 100                      bytes per GPU
    experts   N = smallest N >= R with ceil(E * R / N) * L * bytes_per_expert <= usable
              max_experts_per_worker = (usable // bytes_per_expert): what a worker may hold at any moment,
              so a live scale or rebalance moves in waves within it (cluster/control/reshard.py)
    heads     cache_memory = usable - head_weights: each head's --cache-memory, of which the prefix cache's
                             snapshot pool takes its share (snapshot_count, model/cache/budget.py)
              per_sequence = kv_bytes_per_token * block_size * ceil(context / block_size)
                             + deltanet_state_bytes_per_sequence
              seqs = (cache_memory - snapshots * state_bytes) // per_sequence;   M = ceil(concurrency / seqs)
              the engine turns cache_memory into KV blocks, seqs state slots and the snapshots with the
              same `cache_capacity`, given max_num_seqs = seqs
    dispatch  L * min(k, N) * H * dtype_bytes * 2 per token (each distinct worker once, out and back)
    host      what the process holds on its GPU + HOST_OVERHEAD_BYTES, rounded up to GiB

cluster/cli/k8s_overlay.py renders a plan as the JSON 6902 patch that k8s/overlays/gpu applies to the
RayService, with this arithmetic, in numbers, in its comments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from nextserve.model.cache.budget import CacheConfig, cache_capacity, snapshot_count
from nextserve.model.config import ConfigError, Qwen3NextConfig
from nextserve.model.sizes import ModelSizes

MiB = 2**20
GiB = 2**30

HOST_OVERHEAD_BYTES = 8 * GiB
"""Host memory of a pod beyond its GPU-side bytes: Ray's raylet and worker processes, Python + torch
(~2 GiB per process), gRPC buffers, the safetensors read path. Weights pass through host memory on
load, and today's code keeps them there (it computes on the CPU), so the host sizes to the GPU-side
bytes plus this."""


class CapacityError(ConfigError):
    """A plan that cannot fit: the message names the sizes and what to change."""


@dataclass(frozen=True)
class GpuSpec:
    name: str
    total_bytes: int
    """Device memory as the driver reports it (nvidia-smi memory.total, MiB), not the marketed GB."""
    product_label: str
    """Value of the `nvidia.com/gpu.product` node label (NVIDIA GPU feature discovery)."""


GPUS: dict[str, GpuSpec] = {gpu.name: gpu for gpu in (
    # memory.total as nvidia-smi prints it on these boards (public nvidia-smi output; not measured here).
    GpuSpec("h100-80gb", 81_559 * MiB, "NVIDIA-H100-80GB-HBM3"),  # 79.6 GiB; marketed "80 GB"
    GpuSpec("h200", 143_771 * MiB, "NVIDIA-H200"),  # 140.4 GiB; marketed "141 GB"
    GpuSpec("a100-80gb", 81_920 * MiB, "NVIDIA-A100-SXM4-80GB"),  # 80.0 GiB
    GpuSpec("l40s", 46_068 * MiB, "NVIDIA-L40S"),  # 45.0 GiB; marketed "48 GB"
    GpuSpec("a10g", 23_028 * MiB, "NVIDIA-A10G"),  # 22.5 GiB; marketed "24 GB"
)}


@dataclass(frozen=True)
class CapacityPlan:
    gpu: str
    gpu_total_bytes: int
    reserve_percent: int
    """Held back on every GPU for the CUDA context, activations and allocator slack (vLLM's
    gpu_memory_utilization=0.9 default makes the same bet)."""
    usable_bytes_per_gpu: int
    expert_replicas: int
    num_expert_workers: int
    max_experts_per_layer_per_worker: int
    """The most experts of one layer a worker can hold within usable memory."""
    experts_per_layer_per_worker: int
    """What each worker holds with N workers: ceil(E * R / N) (the placement balances within one)."""
    max_experts_per_worker: int
    """(layer, expert) pairs that fit a worker's usable memory: the bound live moves keep (AppArgs)."""
    bytes_per_expert_worker: int
    head_weight_bytes: int
    context_tokens: int
    kv_bytes_per_sequence: int
    deltanet_state_bytes_per_sequence: int
    bytes_per_sequence: int
    max_sequences_per_head: int
    cache_memory_bytes_per_head: int
    """The head's --cache-memory (AppArgs.cache_memory): its sequences' KV blocks and state slots."""
    cache_block_size: int
    cache_num_blocks: int
    cache_num_slots: int
    cache_num_snapshots: int
    """What the head's engine allocates from cache_memory_bytes_per_head (the same cache_capacity call)."""
    concurrency: int
    num_head_replicas: int
    dispatch_bytes_per_token_deduped: int
    """With N workers a token reaches at most min(k, N) of them per MoE layer (ModelSizes'
    dispatch_bytes_per_token is the bound with no dedup: k per layer)."""
    host_memory_bytes_expert: int
    host_memory_bytes_head: int

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up_gib(nbytes: int) -> int:
    return _ceil_div(nbytes, GiB) * GiB


def plan_capacity(config: Qwen3NextConfig, sizes: ModelSizes, gpu: GpuSpec, *, concurrency: int,
                  context_tokens: int, expert_replicas: int = 1, reserve_percent: int = 10,
                  block_size: int = CacheConfig.block_size) -> CapacityPlan:
    """Expert workers and head replicas (one GPU each) for `concurrency` sequences of `context_tokens`."""
    if concurrency < 1 or context_tokens < 1 or expert_replicas < 1 or not 0 <= reserve_percent < 100:
        raise CapacityError(f"need concurrency >= 1 ({concurrency}), context >= 1 ({context_tokens}), "
                            f"expert replicas >= 1 ({expert_replicas}), 0 <= reserve% < 100 ({reserve_percent})")
    usable = gpu.total_bytes * (100 - reserve_percent) // 100
    num_layers, num_experts = len(config.expert_layers), config.num_experts  # the MTP layers' experts too
    bytes_per_expert_row = num_layers * sizes.bytes_per_routed_expert  # one expert index across all layers
    max_per_worker = min(usable // bytes_per_expert_row, num_experts)
    if max_per_worker < 1:
        raise CapacityError(f"one expert across {num_layers} layers is {bytes_per_expert_row:,} B, more than the "
                            f"{usable:,} B usable on {gpu.name}; pick a larger GPU")
    num_workers = max(_ceil_div(num_experts * expert_replicas, max_per_worker), expert_replicas)
    per_worker = _ceil_div(num_experts * expert_replicas, num_workers)
    kv = sizes.kv_bytes_per_token * block_size * _ceil_div(context_tokens, block_size)
    per_sequence = kv + sizes.deltanet_state_bytes_per_sequence
    cache_memory = usable - sizes.bytes_per_head_replica
    snapshots = snapshot_count(sizes, CacheConfig(max(cache_memory, 1), block_size))
    max_seqs = (cache_memory - snapshots * sizes.deltanet_state_bytes_per_sequence) // per_sequence
    if max_seqs < 1:
        raise CapacityError(f"a head replica on {gpu.name} has {usable:,} B usable: head weights "
                            f"{sizes.bytes_per_head_replica:,} B + one sequence of {context_tokens:,} tokens "
                            f"({per_sequence:,} B) do not fit; lower --context or pick a larger GPU")
    cache = cache_capacity(sizes, CacheConfig(cache_memory, block_size), max_seqs, context_tokens)
    dispatch_per_worker = len(config.moe_layers) * config.hidden_size * sizes.dtype_bytes * 2  # target rounds
    return CapacityPlan(
        gpu=gpu.name, gpu_total_bytes=gpu.total_bytes, reserve_percent=reserve_percent,
        usable_bytes_per_gpu=usable, expert_replicas=expert_replicas, num_expert_workers=num_workers,
        max_experts_per_layer_per_worker=max_per_worker, experts_per_layer_per_worker=per_worker,
        max_experts_per_worker=usable // sizes.bytes_per_routed_expert,
        bytes_per_expert_worker=per_worker * bytes_per_expert_row, head_weight_bytes=sizes.bytes_per_head_replica,
        context_tokens=context_tokens, kv_bytes_per_sequence=kv,
        deltanet_state_bytes_per_sequence=sizes.deltanet_state_bytes_per_sequence, bytes_per_sequence=per_sequence,
        max_sequences_per_head=max_seqs, cache_memory_bytes_per_head=cache_memory,
        cache_block_size=block_size, cache_num_blocks=cache.num_blocks, cache_num_slots=cache.num_slots,
        cache_num_snapshots=cache.num_snapshots,
        concurrency=concurrency, num_head_replicas=_ceil_div(concurrency, max_seqs),
        dispatch_bytes_per_token_deduped=dispatch_per_worker * min(config.num_experts_per_tok, num_workers),
        host_memory_bytes_expert=_round_up_gib(per_worker * bytes_per_expert_row + HOST_OVERHEAD_BYTES),
        host_memory_bytes_head=_round_up_gib(sizes.bytes_per_head_replica + cache_memory
                                             + HOST_OVERHEAD_BYTES),
    )
