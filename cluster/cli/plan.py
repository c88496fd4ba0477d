"""`nextserve plan`: parameter counts and bytes computed from a config, and with --gpu the capacity plan
(and with --emit-overlay the GPU overlay's patch). Imported by the CLI only when `plan` runs; it needs
torch (the counts are the head model's own parameters, built on the meta device) but no transformers
and no Ray."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nextserve.cluster.cli.k8s_overlay import gpu_overlay_patch
from nextserve.model.capacity import GPUS, plan_capacity
from nextserve.model.checkpoint import parse_dtype
from nextserve.model.config import PUBLISHED_CONFIGS, ConfigError, Qwen3NextConfig
from nextserve.model.sizes import model_sizes


def load_plan_config(name: str) -> Qwen3NextConfig:
    if name in PUBLISHED_CONFIGS:
        return Qwen3NextConfig.from_dict(PUBLISHED_CONFIGS[name])
    if Path(name).exists():
        return Qwen3NextConfig.from_json(name)
    raise ConfigError(f"--config {name!r} is neither a known config ({', '.join(PUBLISHED_CONFIGS)}) "
                      f"nor a config.json path / checkpoint dir")


def cmd_plan(args: argparse.Namespace) -> int:
    config = load_plan_config(args.config)
    sizes = model_sizes(config, parse_dtype(args.dtype))
    if args.gpu is None:
        if args.emit_overlay:
            raise ConfigError("--emit-overlay needs --gpu (the GPU type the overlay is for)")
        rows: dict[str, int | str] = dict(sizes.as_dict())
    else:
        plan = plan_capacity(config, sizes, GPUS[args.gpu], concurrency=args.concurrency,
                             context_tokens=args.context, expert_replicas=args.expert_replicas)
        if args.emit_overlay:
            command = (f"nextserve plan --config {args.config} --gpu {args.gpu} --dtype {args.dtype} "
                       f"--concurrency {args.concurrency} --context {args.context} "
                       f"--expert-replicas {args.expert_replicas} --emit-overlay")
            name = args.config if args.config in PUBLISHED_CONFIGS else Path(args.config).resolve().name
            name = Path(args.config).resolve().parent.name if name == "config.json" else name
            print(gpu_overlay_patch(plan, config, sizes, gpu=GPUS[args.gpu], model_dir_name=name,
                                    dtype=args.dtype, command=command), end="")
            return 0
        rows = {**sizes.as_dict(), **plan.as_dict()}
    if args.json:
        print(json.dumps(rows if args.gpu is None else {**sizes.as_dict(), "capacity": plan.as_dict()}))
        return 0
    for name, value in rows.items():
        is_bytes = name.startswith(("bytes", "host_memory")) or name.endswith("_bytes_per_sequence") \
            or name in ("gpu_total_bytes", "usable_bytes_per_gpu", "head_weight_bytes")
        human = f"  ({value / 2**30:.2f} GiB)" if is_bytes and isinstance(value, int) else ""
        print(f"{name:<36}{value:>20,}{human}" if isinstance(value, int) else f"{name:<36}{value:>20}")
    return 0
