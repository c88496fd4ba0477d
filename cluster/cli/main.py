"""The `nextserve` command line: the entrypoint, and the only place that reads the environment.

    nextserve up [--model DIR|tiny] [--expert-workers N] …  serve the model: Redis, Ray, workers, heads, HTTP
    nextserve status [--json]                    workers (pid, address, experts, load, alive), heads, epoch
    nextserve scale --expert-workers N           re-shard the experts live onto N workers
    nextserve rebalance                          re-place experts for the measured load (EPLB), live
    nextserve make-tiny DIR                      write the tiny default checkpoint
    nextserve quantize-fp8 SRC DST [--twin DIR]  a fine-grained FP8 checkpoint (and its dequantized twin)
    nextserve generate --model DIR|tiny PROMPT…  one-process generation (the engine, experts in-process)
    nextserve plan --config qwen3-coder-next     parameter counts and bytes, computed from a config
    nextserve bench model|step|dispatch|serve|gpu|engine …  benchmarks (see bench/)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from nextserve.cluster.cli.cluster_parsers import add_cluster_commands
from nextserve.cluster.cli.lazy_command import LazyCommand
from nextserve.cluster.cli.model_paths import resolve_model
from nextserve.cluster.cli.usage import UsageError
from nextserve.cluster.control.registry import RegistryUnreachableError
from nextserve.model.capacity import GPUS
from nextserve.model.checkpoint import CheckpointError
from nextserve.model.config import PUBLISHED_CONFIGS, ConfigError
from nextserve.model.fp8_checkpoint import DEFAULT_NOT_CONVERTED
from nextserve.model.sampling import SamplingError

log = logging.getLogger("nextserve")


def parse_block(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '128x64' -> (128, 64)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--block {text!r}: give ROWS or ROWSxCOLS, positive integers (e.g. 128)")
    return int(parts[0]), int(parts[-1])


@dataclass(frozen=True)
class BenchCommand:
    """One `nextserve bench NAME`: the module that defines it (`add_parser(subparsers)` and `run`), and
    how its `run` gets the checkpoint: "argument" = run(args, resolve_model(args.model)), "in_args" =
    args.model resolved in place then run(args), "none" = run(args)."""
    module: str
    help: str
    model: Literal["argument", "in_args", "none"]


BENCHES: dict[str, BenchCommand] = {
    "model": BenchCommand("nextserve.bench.model_bench", "prefill/decode tokens/s of the one-process model "
                          "vs transformers", "argument"),
    "step": BenchCommand("nextserve.bench.step_bench", "where a decode step's time goes: head, experts local "
                         "and over gRPC", "argument"),
    "dispatch": BenchCommand("nextserve.bench.dispatch", "time one MoE layer's dispatch round against its "
                             "echo floor", "none"),
    "serve": BenchCommand("nextserve.bench.serve_bench", "throughput/TTFT/TPOT through the gateway, optionally "
                          "vs transformers", "in_args"),
    "gpu": BenchCommand("nextserve.bench.gpu_bench", "published layer shapes at random weights on one GPU: "
                        "check vs CPU, decode tok/s", "none"),
    "engine": BenchCommand("nextserve.bench.engine_bench", "steady decode step of the head engine per batch "
                           "size vs transformers", "argument"),
    "spec": BenchCommand("nextserve.bench.spec_bench", "rewrite workload with and without speculative decoding "
                         "(tokens/s, TPOT, acceptance), one request at a time", "in_args"),
    "fairness": BenchCommand("nextserve.bench.fairness_bench", "one tenant's short request latency idle vs "
                             "while another tenant floods the gateway", "none"),
    "grammar": BenchCommand("nextserve.bench.grammar_bench", "TPOT of JSON-schema-constrained vs free "
                            "decoding in one engine run", "argument"),
}


def cmd_bench(args: argparse.Namespace) -> int:
    """Import the named bench and parse its own arguments. Benches are a tool beside the product (they
    import the engine, the router, the workers, transformers baselines), and the product must not import
    bench/ (tests/process/test_package_layout.py), so `nextserve up` or a head never load them; only the
    bench being run is imported, when it runs (as every command's implementation: LazyCommand)."""
    bench = BENCHES[args.bench]
    module = importlib.import_module(bench.module)
    parser = argparse.ArgumentParser(prog="nextserve bench")
    module.add_parser(parser.add_subparsers(dest="bench", required=True))
    bench_args = parser.parse_args([args.bench, *args.bench_args])
    if bench.model == "argument":
        return int(module.run(bench_args, resolve_model(bench_args.model)))
    if bench.model == "in_args":
        bench_args.model = resolve_model(str(bench_args.model))
    return int(module.run(bench_args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextserve", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_cluster_commands(sub)
    p = sub.add_parser("make-tiny", help="write the tiny default checkpoint to DIR")
    p.add_argument("dir", type=Path)
    p.add_argument("--pad-vocab", type=int, default=0, metavar="ROWS",
                   help="embedding rows past the tokenizer (Qwen3-Coder-Next has 267), for testing padded vocabularies")
    p.set_defaults(func=LazyCommand("nextserve.cluster.cli.checkpoint_commands", "cmd_make_tiny"))
    p = sub.add_parser("quantize-fp8", help="write SRC as a fine-grained FP8 checkpoint (the Qwen/DeepSeek FP8 "
                       "release layout) to DST")
    p.add_argument("src", help="an unquantized checkpoint dir, or 'tiny'")
    p.add_argument("dst", type=Path)
    p.add_argument("--block", type=parse_block, default=(128, 128), metavar="ROWS[xCOLS]",
                   help="weight_block_size (default 128: 128 x 128, as the published releases)")
    p.add_argument("--not-convert", action="append", metavar="MODULE",
                   help=f"modules_to_not_convert (repeatable; default {' '.join(DEFAULT_NOT_CONVERTED)})")
    p.add_argument("--twin", type=Path, metavar="DIR", help="also write the dequantized twin (fp8 x scale_inv per "
                   "block) to DIR: the unquantized checkpoint the FP8 one means")
    p.add_argument("--twin-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the twin's dtype (float32 holds fp8 x scale exactly)")
    p.set_defaults(func=LazyCommand("nextserve.cluster.cli.checkpoint_commands", "cmd_quantize_fp8"))
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
    p.set_defaults(func=LazyCommand("nextserve.cluster.cli.generate", "cmd_generate"))
    p = sub.add_parser("plan", help="parameter counts and bytes computed from a config")
    p.add_argument("--config", default="qwen3-coder-next", help=f"{' | '.join(PUBLISHED_CONFIGS)} | config.json | DIR")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--gpu", choices=list(GPUS), help="plan expert workers and head replicas for this GPU type")
    p.add_argument("--concurrency", type=int, default=128, help="sequences served at once (with --gpu)")
    p.add_argument("--context", type=int, default=32768, help="tokens per sequence to hold (with --gpu)")
    p.add_argument("--expert-replicas", type=int, default=1, help="replicas of every expert, R (with --gpu)")
    p.add_argument("--emit-overlay", action="store_true",
                   help="print the k8s/overlays/gpu capacity patch (JSON 6902) for this plan")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=LazyCommand("nextserve.cluster.cli.plan", "cmd_plan"))
    p = sub.add_parser("bench", help="benchmarks (see bench/); `nextserve bench NAME --help` for a bench's options",
                       description="\n".join(f"{name:<10}{b.help}" for name, b in BENCHES.items()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=list(BENCHES), metavar="NAME", help=" | ".join(BENCHES))
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="ARGS", help="the bench's own options")
    p.set_defaults(func=cmd_bench)
    return parser


def error_line(exc: Exception) -> str:
    """What `main` prints for a known error: one line. A pydantic ValidationError (AppArgs) reads
    'field=value: problem; ...', or the validator's own message for a rule across fields."""
    if not isinstance(exc, ValidationError):
        return " ".join(str(exc).splitlines())
    parts = []
    for error in exc.errors(include_url=False):
        cause = error.get("ctx", {}).get("error")
        problem = str(cause) if error["type"] == "value_error" and cause is not None else error["msg"]
        field = ".".join(map(str, error["loc"]))
        parts.append(f"{field}={error['input']!r}: {problem}" if field else problem)
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("NEXTSERVE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, SamplingError, FileNotFoundError, ValidationError, TimeoutError,
            RegistryUnreachableError, UsageError) as exc:
        print(f"nextserve: error: {error_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
