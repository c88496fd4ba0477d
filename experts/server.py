"""The expert worker process: holds some (layer, expert) weights and serves ExpertService over gRPC.

Flow: parse args -> load the worker's experts from the checkpoint (only those tensors are read) onto
the worker's device (`--device auto`: CUDA when torch sees a GPU) ->
start a grpc.aio server (+ the standard health service) on host:port -> print one ready line
`{"event": "ready", "port": P, ...}` on stdout -> serve until SIGINT/SIGTERM.

Run:
    NEXTSERVE_ADMIN_TOKEN=... python -m nextserve.experts.server --model DIR --port 0 \
        --experts '0:0,1,2;1:5' --admin-token-env NEXTSERVE_ADMIN_TOKEN [--device auto|cpu|cuda]
    python -m nextserve.experts.server --model DIR --port 0 @args.txt      # arguments read from a file

The controller (cluster/) turns a router.placement.Placement into each worker's --experts. Every
ExpertService call (Dispatch and DispatchStream included) needs the cluster's admin token
(proto/admin_auth.py); a worker leaves them open only when started with --no-admin-token (or
admin_token=None), never by default. The health service stays open (probes). A worker receives no
message larger than the largest legitimate Dispatch of --max-dispatch-tokens tokens for its model
(proto/codec.py:dispatch_message_limit; RESOURCE_EXHAUSTED past it), serves at most
MAX_CONCURRENT_RPCS calls at once (a stream counts as one for its life), and binds --host only.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nextserve.experts.service import ExpertServicer
from nextserve.experts.store import ExpertStore
from nextserve.model.device import DEVICE_CHOICES, resolve_device
from nextserve.proto import expert_pb2, expert_pb2_grpc
from nextserve.proto.admin_auth import TokenInterceptor
from nextserve.proto.codec import DEFAULT_MAX_DISPATCH_TOKENS, dispatch_message_limit

log = logging.getLogger(__name__)

SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name
MAX_CONCURRENT_RPCS = 256
"""Calls a worker serves at once; more are refused with RESOURCE_EXHAUSTED. A head holds one
DispatchStream per worker (a retired epoch's stream for CLOSE_GRACE_S more); the controller's Info and
admin calls are brief."""


def server_options(message_limit: int) -> list[tuple[str, int]]:
    """A worker's gRPC options: both directions bounded by `message_limit` bytes."""
    return [("grpc.max_receive_message_length", message_limit), ("grpc.max_send_message_length", message_limit),
            ("grpc.so_reuseport", 0)]  # port 0 must give this server a port of its own


@dataclass
class Worker:
    server: grpc.aio.Server
    port: int
    store: ExpertStore
    servicer: ExpertServicer

    async def stop(self, grace_s: float | None = None) -> None:
        await self.server.stop(grace_s)
        self.servicer.executor.shutdown(wait=False)


async def start_worker(model_dir: str | Path, pairs: Iterable[tuple[int, int]], dtype: str = "float32",
                       host: str = "127.0.0.1", port: int = 0, epoch: int = 0,
                       compute_threads: int = 4, device: str = "cpu", *, admin_token: str | None,
                       max_dispatch_tokens: int = DEFAULT_MAX_DISPATCH_TOKENS,
                       max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS) -> Worker:
    """Load `pairs` from the checkpoint onto `device` (see model.device.resolve_device) and serve them on
    `host` only; port 0 lets the OS pick (see Worker.port). Every ExpertService call needs `admin_token` in
    its metadata; `admin_token=None` (explicit, no default) leaves them open. Messages are bounded by the
    largest Dispatch of `max_dispatch_tokens` tokens of this model."""
    store = ExpertStore(model_dir, dtype, resolve_device(device))
    executor = ThreadPoolExecutor(compute_threads, thread_name_prefix="expert-compute")
    await asyncio.get_running_loop().run_in_executor(executor, store.load, list(pairs), epoch)
    config = store.config
    limit = dispatch_message_limit(max_dispatch_tokens, config.hidden_size, config.num_experts_per_tok,
                                   store.dtype.itemsize)
    servicer = ExpertServicer(store, executor, limit)
    interceptors = None if admin_token is None else [TokenInterceptor(admin_token)]
    server = grpc.aio.server(options=server_options(limit), interceptors=interceptors,
                             maximum_concurrent_rpcs=max_concurrent_rpcs)
    expert_pb2_grpc.add_ExpertServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind an expert worker to {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    freeze_startup_objects()
    log.info("expert worker on %s:%d holds %d experts (%s on %s, %d weight bytes); messages up to %d bytes", host,
             bound, len(store.pairs()), store.dtype, store.device, store.weight_bytes(), limit)
    return Worker(server, bound, store, servicer)


def freeze_startup_objects() -> None:
    """Move everything alive after start-up (modules, weights' Python objects, gRPC machinery) out of
    the garbage collector's reach, as vLLM and Ray Serve do once a server is up. Each Dispatch allocates
    messages and tensors; without this, the collections those allocations trigger re-scan the whole
    start-up heap (measured here: 18 % of a worker's CPU samples in gc_collect_main)."""
    gc.collect()
    gc.freeze()


class BackgroundWorkers:
    """Workers served from one event-loop thread of this process (tests, benchmarks, notebooks), all with
    `admin_token` (None: every call open)."""

    def __init__(self, admin_token: str | None) -> None:
        self.admin_token = admin_token
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="expert-workers", daemon=True)
        self._thread.start()
        self.workers: list[Worker] = []

    def start(self, model_dir: str | Path, pairs: Iterable[tuple[int, int]], dtype: str = "float32",
              epoch: int = 0, max_dispatch_tokens: int = DEFAULT_MAX_DISPATCH_TOKENS) -> Worker:
        coro = start_worker(model_dir, list(pairs), dtype, epoch=epoch, admin_token=self.admin_token,
                            max_dispatch_tokens=max_dispatch_tokens)
        worker = asyncio.run_coroutine_threadsafe(coro, self.loop).result()
        self.workers.append(worker)
        return worker

    def stop(self, worker: Worker) -> None:
        asyncio.run_coroutine_threadsafe(worker.stop(None), self.loop).result()

    def close(self) -> None:
        for worker in self.workers:
            self.stop(worker)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def parse_experts(spec: str) -> list[tuple[int, int]]:
    """'0:1,2;3:4' -> [(0, 1), (0, 2), (3, 4)]."""
    pairs = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        layer, _, experts = part.partition(":")
        try:
            pairs += [(int(layer), int(e)) for e in experts.split(",") if e.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad --experts entry {part!r}; expected 'layer:e1,e2'") from None
    return pairs


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nextserve.experts.server", description=__doc__.split("\n")[0],
                                fromfile_prefix_chars="@")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (a cluster: its node's IP)")
    p.add_argument("--port", type=int, default=0, help="0 lets the OS pick; the ready line reports it")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                   help="where the experts compute; auto: cuda when torch sees a GPU, else cpu")
    p.add_argument("--experts", type=parse_experts, required=True, help="'layer:e1,e2;layer:e3' pairs to hold")
    p.add_argument("--epoch", type=int, default=0, help="placement epoch these experts belong to")
    p.add_argument("--compute-threads", type=int, default=4)
    p.add_argument("--max-dispatch-tokens", type=int, default=DEFAULT_MAX_DISPATCH_TOKENS,
                   help="tokens in the largest Dispatch taken; sizes the message limit (RESOURCE_EXHAUSTED past it)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    admin = p.add_mutually_exclusive_group(required=True)
    admin.add_argument("--admin-token-env", metavar="VAR",
                       help="environment variable holding the cluster's admin token (every ExpertService call needs it)")
    admin.add_argument("--no-admin-token", action="store_true",
                       help="leave every ExpertService call open to anyone who reaches the port")
    args = p.parse_args(argv)
    args.admin_token = None if args.no_admin_token else os.environ.get(args.admin_token_env)
    if not args.no_admin_token and not args.admin_token:
        p.error(f"--admin-token-env {args.admin_token_env}: that environment variable is not set or empty; "
                f"export the cluster's admin token in it, or pass --no-admin-token")
    return args


async def serve(args: argparse.Namespace) -> None:
    worker = await start_worker(args.model, args.experts, args.dtype, args.host, args.port, args.epoch,
                                args.compute_threads, args.device, admin_token=args.admin_token,
                                max_dispatch_tokens=args.max_dispatch_tokens)
    # The ready line is the subprocess protocol (stdout); logs go to stderr.
    sys.stdout.write(json.dumps({"event": "ready", "host": args.host, "port": worker.port,
                                 "num_experts_held": len(worker.store.pairs()), "epoch": args.epoch}) + "\n")
    sys.stdout.flush()
    stopped = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stopped.set)
    await stopped.wait()
    await worker.stop(grace_s=2.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
