"""The `nextserve` command line: the entrypoint, and the only place that reads the environment.

    nextserve up [--model DIR|tiny] [--expert-workers N] …  serve the model: Redis, Ray, workers, heads, HTTP
    nextserve status [--json]                    workers (pid, address, experts, alive), heads, epoch
    nextserve make-tiny DIR                      write the tiny default checkpoint
    nextserve generate --model DIR|tiny PROMPT…  one-process generation (head + local experts)
    nextserve plan --config qwen3-coder-next     parameter counts and bytes, computed from a config
    nextserve bench model|dispatch …             benchmarks (see bench/)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError
from transformers import AutoTokenizer

from bench import dispatch as dispatch_bench
from bench import model_bench
from model.config import PUBLISHED_CONFIGS, ConfigError, Qwen3NextConfig
from model.checkpoint import CheckpointError, parse_dtype
from model.generate import generate
from model.loader import load_head, load_local_backend
from model.sampling import SamplingError, SamplingParams
from model.sizes import model_sizes
from model.tiny import ensure_tiny, make_tiny
from cluster.app_args import AppArgs
from cluster.registry import Registry
from cluster.up import UpOptions, read_state, run_up

log = logging.getLogger("nextserve")


def cache_dir() -> Path:
    """Where `--model tiny` lives: $NEXTSERVE_CACHE, else $XDG_CACHE_HOME/nextserve, else ~/.cache/nextserve."""
    if os.environ.get("NEXTSERVE_CACHE"):
        return Path(os.environ["NEXTSERVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nextserve"


def resolve_model(name: str) -> Path:
    if name == "tiny":
        return ensure_tiny(cache_dir())
    path = Path(name)
    if not (path / "config.json").exists():
        raise CheckpointError(f"--model {name!r} is not a checkpoint directory (no config.json); "
                              f"pass a Hugging Face checkpoint dir or 'tiny'")
    return path


def state_file(cluster: str) -> Path:
    return cache_dir() / f"cluster-{cluster}.json"


def cmd_up(args: argparse.Namespace) -> int:
    app = AppArgs(model=str(resolve_model(args.model)), model_name=args.model_name or ("tiny" if args.model == "tiny" else None),
                  expert_workers=args.expert_workers, expert_replicas=args.expert_replicas,
                  head_replicas=args.head_replicas, dtype=args.dtype, redis_url=args.redis_url or "",
                  cluster=args.cluster, api_key=args.api_key or os.environ.get("NEXTSERVE_API_KEY"))
    return run_up(UpOptions(app=app, host=args.host, port=args.port, ray_address=os.environ.get("RAY_ADDRESS"),
                            state_file=state_file(args.cluster)))


def cmd_status(args: argparse.Namespace) -> int:
    redis_url = args.redis_url or read_state(state_file(args.cluster))["redis_url"]
    registry = Registry(redis_url, args.cluster)
    record = registry.placement()
    status = {"epoch": record.epoch if record else 0, "spec": registry.spec(),
              "workers": [w.as_dict() for w in registry.workers()], "heads": [h.as_dict() for h in registry.heads()]}
    if args.json:
        print(json.dumps(status))
        return 0
    print(f"placement epoch {status['epoch']}  spec {status['spec']}")
    for w in status["workers"]:
        print(f"worker {w['index']:>3}  pid {w['pid']:>7}  {w['address']:<22} experts {w['num_experts']:>5}  "
              f"{'alive' if w['alive'] else 'DEAD'}")
    for h in status["heads"]:
        print(f"head {h['id']}  pid {h['pid']}  epoch {h.get('epoch', '-')}  running {h.get('num_running', 0)}  "
              f"waiting {h.get('num_waiting', 0)}  {'alive' if h['alive'] else 'DEAD'}")
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    print(make_tiny(args.dir))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    path = resolve_model(args.model)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    head, experts = load_head(path, args.dtype), load_local_backend(path, args.dtype)
    prompt_ids = [tokenizer(p)["input_ids"] for p in args.prompts]
    outputs = generate(head, experts, prompt_ids, params)
    for prompt, out in zip(args.prompts, outputs):
        text = tokenizer.decode(out, skip_special_tokens=True)
        print(json.dumps({"prompt": prompt, "text": text, "token_ids": out}) if args.json else prompt + text)
    return 0


def load_plan_config(name: str) -> Qwen3NextConfig:
    if name in PUBLISHED_CONFIGS:
        return Qwen3NextConfig.from_dict(PUBLISHED_CONFIGS[name])
    if Path(name).exists():
        return Qwen3NextConfig.from_json(name)
    raise ConfigError(f"--config {name!r} is neither a known config ({', '.join(PUBLISHED_CONFIGS)}) "
                      f"nor a config.json path / checkpoint dir")


def cmd_plan(args: argparse.Namespace) -> int:
    sizes = model_sizes(load_plan_config(args.config), parse_dtype(args.dtype))
    if args.json:
        print(json.dumps(sizes.as_dict()))
        return 0
    for name, value in sizes.as_dict().items():
        human = f"  ({value / 2**30:.2f} GiB)" if name.startswith("bytes") or name.endswith("_bytes_per_sequence") else ""
        print(f"{name:<36}{value:>20,}{human}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "model":
        return model_bench.run(args, resolve_model(args.model))
    if args.bench == "dispatch":
        return dispatch_bench.run(args)
    raise SystemExit(f"unknown benchmark {args.bench!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextserve", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="start the cluster and serve the model over HTTP until SIGINT/SIGTERM")
    p.add_argument("--model", default="tiny", help="checkpoint dir, or 'tiny'")
    p.add_argument("--model-name", help="name clients pass as `model` (default: the directory's name)")
    p.add_argument("--expert-workers", type=int, default=2)
    p.add_argument("--expert-replicas", type=int, default=1, help="replicas of every expert (R)")
    p.add_argument("--head-replicas", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--redis-url", help="an existing Redis (default: start a local redis-server)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` (or set NEXTSERVE_API_KEY)")
    p.add_argument("--cluster", default="default", help="registry namespace in Redis")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("status", help="workers, heads and the placement epoch, from the Redis registry")
    p.add_argument("--redis-url", help="default: the cluster `nextserve up` started")
    p.add_argument("--cluster", default="default")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("make-tiny", help="write the tiny default checkpoint to DIR")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=cmd_make_tiny)
    p = sub.add_parser("generate", help="generate in one process (head model + local experts)")
    p.add_argument("--model", default="tiny", help="checkpoint dir, or 'tiny' (made on first use)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", action="store_true", help="one JSON line per prompt")
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("plan", help="parameter counts and bytes computed from a config")
    p.add_argument("--config", default="qwen3-coder-next", help=f"{' | '.join(PUBLISHED_CONFIGS)} | config.json | DIR")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("bench", help="benchmarks")
    bench_sub = p.add_subparsers(dest="bench", required=True)
    model_bench.add_parser(bench_sub)
    dispatch_bench.add_parser(bench_sub)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("NEXTSERVE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, SamplingError, FileNotFoundError, ValidationError) as exc:
        print(f"nextserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
