"""`nextserve bench dispatch`: one MoE layer's dispatch round against W local expert workers, and the
floor, a raw gRPC echo of the same request and reply bytes to the same servers.

Flow: write a random-weight checkpoint of the tiny model's expert shapes (or use --model DIR) ->
start W `python -m nextserve.experts.server` subprocesses with a balanced placement -> random top-k routing
for T tokens -> alternate dispatch rounds and echo rounds (same channels, same event-loop thread,
same bytes per worker) -> medians, ratio, bytes per token.

Bytes are checked without trusting the dispatcher: the hidden-state bytes the workers counted as
received over the timed rounds (their Info), twice (the partial sums come back in the same shape),
against a floor from the placement alone (`min_bytes_per_token`). A plan that sent a token twice would
show as `bytes_ratio_to_min` above 1.

The floor is an Echo of the same bytes on a stream, like the round's DispatchStream messages
(`echo_ms_p50`, `ratio_to_echo`); a unary Echo per worker (what a round cost as unary calls before)
is timed beside it (`unary_echo_ms_p50`, `ratio_to_unary_echo`).

Run:  python -m bench.dispatch --workers 4 --tokens 64 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from nextserve.bench.process_cpu import process_cpu_s
from nextserve.model.config import Qwen3NextConfig
from nextserve.model.tiny import TINY_CONFIG
from nextserve.proto import expert_pb2
from nextserve.proto.codec import DEFAULT_MAX_DISPATCH_TOKENS
from nextserve.router.dispatcher import RemoteExpertBackend
from nextserve.router.placement import Placement, build_placement
from nextserve.model.layers.experts import Assignments
from nextserve.router.plan import WorkerBatch, alive_replicas, plan_batches, replica_table
from nextserve.router.wire import encode_request

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_SHAPES = {k: TINY_CONFIG[k] for k in ("hidden_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size")}
"""The tiny model's expert shapes (random weights: dispatch cost does not depend on their values)."""


def write_random_experts(path: Path, hidden_size: int, num_experts: int, num_experts_per_tok: int,
                         moe_intermediate_size: int, seed: int = 0) -> Path:
    """A one-layer checkpoint dir holding only routed experts (all a worker reads)."""
    config = Qwen3NextConfig(num_hidden_layers=1, hidden_size=hidden_size, num_experts=num_experts,
                             num_experts_per_tok=num_experts_per_tok, moe_intermediate_size=moe_intermediate_size,
                             vocab_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                             torch_dtype="float32")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    g = torch.Generator().manual_seed(seed)
    H, I = hidden_size, moe_intermediate_size
    tensors = {}
    for e in range(num_experts):
        prefix = f"model.layers.0.mlp.experts.{e}"
        tensors[f"{prefix}.gate_proj.weight"] = torch.randn(I, H, generator=g) * H ** -0.5
        tensors[f"{prefix}.up_proj.weight"] = torch.randn(I, H, generator=g) * H ** -0.5
        tensors[f"{prefix}.down_proj.weight"] = torch.randn(H, I, generator=g) * I ** -0.5
    save_file(tensors, str(path / "model.safetensors"))
    return path


ADMIN_TOKEN_ENV = "NEXTSERVE_ADMIN_TOKEN"
"""Where worker_processes hands the workers their admin token: the environment, not argv (`ps` shows argv)."""


@contextmanager
def worker_processes(model_dir: Path, placement: Placement, dtype: str, admin_token: str,
                     max_dispatch_tokens: int = DEFAULT_MAX_DISPATCH_TOKENS) -> Iterator[tuple[list[subprocess.Popen], list[str]]]:
    """`python -m nextserve.experts.server` per worker of `placement` on the CPU (one torch thread each),
    every call only with `admin_token`, messages sized for `max_dispatch_tokens`, ready; -> (processes,
    addresses); all terminated on exit, also when one of them fails to start."""
    procs, addresses = [], []
    env = {**os.environ, ADMIN_TOKEN_ENV: admin_token}
    try:
        for w in range(placement.num_workers):
            spec = ";".join(f"{layer}:{e}" for layer, e in placement.experts_of(w))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "nextserve.experts.server", "--model", str(model_dir), "--port", "0",
                 "--dtype", dtype, "--experts", spec, "--torch-threads", "1", "--epoch", str(placement.epoch),
                 "--device", "cpu", "--admin-token-env", ADMIN_TOKEN_ENV,
                 "--max-dispatch-tokens", str(max_dispatch_tokens)],
                cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        for proc in procs:
            ready = json.loads(proc.stdout.readline() or "{}")
            if ready.get("event") != "ready":
                raise RuntimeError(f"expert worker pid {proc.pid} did not start (exit code {proc.poll()})")
            addresses.append(f"127.0.0.1:{ready['port']}")
        yield procs, addresses
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


def plan_all_alive(placement: Placement, layer: int, pairs: Assignments) -> list[WorkerBatch]:
    """The batches the dispatcher sends in its first round, with every worker alive."""
    replicas = alive_replicas(replica_table(placement, layer), torch.ones(placement.num_workers, dtype=torch.bool))
    return plan_batches(pairs, torch.arange(pairs.token.numel()), replicas, placement.num_workers)


def echo_requests(backend: RemoteExpertBackend, layer: int, hidden: torch.Tensor, ids: torch.Tensor,
                  weights: torch.Tensor) -> tuple[list[tuple[int, expert_pb2.EchoRequest]], float]:
    """Per worker, an Echo of its first-round Dispatch's exact request/reply sizes; and the min bytes per token."""
    batches = plan_all_alive(backend.placement, layer, Assignments.from_topk(ids, weights.to(backend.dtype)))
    H, size = hidden.shape[1], backend.dtype.itemsize
    out = []
    for b in batches:
        request = encode_request(layer, backend.placement.epoch, hidden.to(backend.dtype), b, backend.dtype)
        reply_size = expert_pb2.DispatchReply(num_tokens=b.tokens.numel(), hidden_size=H, dtype=request.dtype,
                                              partial=bytes(b.tokens.numel() * H * size)).ByteSize()
        out.append((b.worker, expert_pb2.EchoRequest(payload=bytes(request.ByteSize()), reply_bytes=reply_size)))
    return out, min_bytes_per_token(backend.placement, layer, ids, H, size)


def echo_round(backend: RemoteExpertBackend,
               echoes: list[tuple[int, expert_pb2.EchoRequest]]) -> Callable[[], None]:
    """A blocking echo round: each worker's Echo on an EchoStream opened once (the floor of the
    DispatchStream messages a round sends), concurrently, like a dispatch round."""
    calls = {w: backend.channels.run(_open_echo_stream(backend.channels.stubs[w], backend.channels.metadata)).result()
             for w, _ in echoes}

    async def one(w: int, request: expert_pb2.EchoRequest) -> None:
        await calls[w].write(request)
        await calls[w].read()

    async def round_() -> None:
        await asyncio.gather(*(one(w, req) for w, req in echoes))

    return lambda: backend.channels.run(round_()).result()


async def _open_echo_stream(stub: Any, metadata: Any) -> Any:
    return stub.EchoStream(metadata=metadata)


def min_bytes_per_token(placement: Placement, layer: int, ids: torch.Tensor, hidden_size: int, dtype_bytes: int) -> float:
    """The floor of a round's hidden-state payload, from the placement alone (not the dispatcher's plan):
    each token's hidden state goes once to every distinct worker owning one of its experts (the first
    replica: the floor for R = 1, what the bench runs) and comes back once from each as a partial sum.
    ids [T, k]."""
    owner = torch.tensor([placement.workers_of(layer, e)[0] for e in range(placement.num_experts)])  # [E]
    workers = owner[ids]  # [T, k]
    distinct = sum(len(set(row)) for row in workers.tolist())
    return distinct / ids.shape[0] * hidden_size * dtype_bytes * 2


def time_rounds(fn: Callable[[], object], rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure(backend: RemoteExpertBackend, tokens: int, top_k: int, num_experts: int, hidden_size: int,
            rounds: int, seed: int = 0, worker_pids: Sequence[int] = ()) -> dict[str, float]:
    """Medians of interleaved dispatch and echo rounds, bytes, and (with `worker_pids`) the CPU each kind
    of round costs this process (all its threads) and the workers (summed)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=g)
    ids = torch.rand(tokens, num_experts, generator=g).topk(top_k, dim=1).indices
    weights = torch.rand(tokens, top_k, generator=g).softmax(dim=1)
    layer = backend.placement.layers[0]
    echoes, min_bytes = echo_requests(backend, layer, hidden, ids, weights)
    dispatch = lambda: backend.submit(layer, hidden, ids, weights).result()  # noqa: E731
    echo = echo_round(backend, echoes)
    stubs = backend.channels.stubs

    async def unary_round() -> None:
        await asyncio.gather(*(stubs[w].Echo(req, timeout=backend.deadline_s, metadata=backend.channels.metadata)
                               for w, req in echoes))

    unary = lambda: backend.channels.run(unary_round()).result()  # noqa: E731
    for _ in range(20):  # warm up channels, allocators, caches
        dispatch(), echo(), unary()
    wire = sum(len(req.payload) + req.reply_bytes for _, req in echoes)  # a Dispatch round's message sizes
    received = workers_hidden_bytes(backend)
    d_ms, e_ms, u_ms = [], [], []
    cpu = {kind: [0.0, 0.0] for kind in ("dispatch", "echo")}  # kind -> [client s, workers s]

    def timed(kind: str, fn: Callable[[], object], into: list[float]) -> None:
        client, workers = time.process_time(), sum(map(process_cpu_s, worker_pids))
        into += time_rounds(fn, 10)
        cpu[kind][0] += time.process_time() - client
        cpu[kind][1] += sum(map(process_cpu_s, worker_pids)) - workers

    for _ in range(rounds // 10):  # interleave so drift hits every kind alike
        timed("dispatch", dispatch, d_ms)
        timed("echo", echo, e_ms)
        u_ms += time_rounds(unary, 10)
    hidden_bytes = (workers_hidden_bytes(backend) - received) * 2 / len(d_ms)  # per round, sent and returned
    d50, e50, u50 = statistics.median(d_ms), statistics.median(e_ms), statistics.median(u_ms)
    return {"dispatch_ms_p50": round(d50, 4), "echo_ms_p50": round(e50, 4), "ratio_to_echo": round(d50 / e50, 3),
            "unary_echo_ms_p50": round(u50, 4), "ratio_to_unary_echo": round(d50 / u50, 3),
            "bytes_per_token": round(hidden_bytes / max(tokens, 1), 1), "min_bytes_per_token": round(min_bytes, 1),
            "bytes_ratio_to_min": round(hidden_bytes / max(tokens, 1) / min_bytes, 4),
            "wire_bytes_per_token": round(wire / max(tokens, 1), 1),
            **({f"{kind}_{side}_cpu_ms_per_round": round(cpu[kind][i] * 1e3 / len(d_ms), 3)
                for kind in cpu for i, side in enumerate(("client", "workers"))} if worker_pids else {})}


def workers_hidden_bytes(backend: RemoteExpertBackend) -> int:
    """Hidden-state bytes all workers have received in Dispatch calls so far (their own count)."""
    return sum(info.hidden_bytes for info in backend.channels.run(backend.fetch_info()).result())


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("dispatch", help="time one MoE layer's dispatch round against its echo floor")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=200, help="timed rounds of each kind (median reported)")
    p.add_argument("--model", type=Path, help="checkpoint dir (default: random tiny-shaped experts)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", action="store_true", help="print one JSON line")


def run(args: argparse.Namespace) -> int:
    # The client only plans and copies small tensors; idle OpenMP threads spinning after each op
    # would steal the cores the workers need (measured: 23 ms instead of 2 ms for T = 1 on 2 cores).
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="nextserve-bench-") as tmp:
        model_dir = args.model or write_random_experts(Path(tmp) / "experts", **TINY_SHAPES)
        config = Qwen3NextConfig.from_json(model_dir)
        placement = build_placement(config.moe_layers[:1], config.num_experts, args.workers, 1)
        admin_token = secrets.token_urlsafe()  # every call carries it, as a cluster's heads' do
        max_tokens = max(args.tokens, DEFAULT_MAX_DISPATCH_TOKENS)
        with worker_processes(Path(model_dir), placement, args.dtype, admin_token, max_tokens) as (procs, addresses), \
                RemoteExpertBackend(addresses, placement, getattr(torch, args.dtype), deadline_s=10.0,
                                    admin_token=admin_token) as backend:
            result = measure(backend, args.tokens, config.num_experts_per_tok, config.num_experts,
                             config.hidden_size, args.rounds, worker_pids=[p.pid for p in procs])
    result = {"workers": args.workers, "tokens": args.tokens, "dtype": args.dtype, **result}
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        sys.stdout.write("  ".join(f"{k}={v}" for k, v in result.items()) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextserve bench dispatch", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
