"""`nextserve bench step`: where one decode step's time goes, head and experts apart, in one run.

Flow: load the head (float32) and start W `python -m nextserve.experts.server` processes holding all routed
experts (balanced placement) -> prefill B sequences of `prompt_len` tokens -> time `steps` greedy
decode steps of the whole batch with each expert backend in turn, interleaved so drift hits all:

    null      the head alone (the routed experts return zeros): head math + Python
    local     the head with the experts in this process (what transformers also does)
    remote    the head with the experts over gRPC (1 micro-batch, and 2 in ping-pong)

and, for the remote runs, the head's wait on the experts, the CPU seconds of the head's step thread,
its dispatch thread and each worker. Besides: one layer's serialisation (plan + encode + decode of a
round's messages, in process) and the gRPC floor (an Echo of the same bytes to the same workers), and
transformers' own decode step on the same checkpoint and batch. Letters: B = batch, W = workers.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm
from transformers import AutoModelForCausalLM, DynamicCache

from nextserve.bench.head_batch import HeadBatch
from nextserve.bench.prompt_ids import checkpoint_prompt_token_ids, random_prompts
from nextserve.bench.dispatch import echo_requests, echo_round, plan_all_alive, worker_processes
from nextserve.bench.process_cpu import process_cpu_s, thread_cpu_s
from nextserve.model.config import Qwen3NextConfig
from nextserve.model.expert_backend import ExpertBackend
from nextserve.router.local_backend import ZeroExperts, load_local_backend
from nextserve.model.loader import load_head
from nextserve.proto import expert_pb2
from nextserve.router.dispatcher import RemoteExpertBackend
from nextserve.router.placement import build_placement
from nextserve.model.layers.experts import Assignments
from nextserve.router.wire import decode_partial, encode_request


class TimedBackend:
    """Counts the seconds the head spends blocked on the routed experts' results."""

    def __init__(self, inner: ExpertBackend) -> None:
        self.inner, self.wait_s = inner, 0.0

    def submit(self, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor) -> "TimedResult":
        return TimedResult(self, self.inner.submit(layer, hidden, ids, weights))


@dataclass
class TimedResult:
    """The head only calls `result()` on what a backend returns."""
    backend: TimedBackend
    future: "Future[Tensor]"

    def result(self) -> Tensor:  # [T, H]
        start = time.perf_counter()
        try:
            return self.future.result()
        finally:
            self.backend.wait_s += time.perf_counter() - start


@dataclass
class Decoder:
    batch: HeadBatch
    logits: Tensor  # [B, V]

    def step(self, experts: ExpertBackend, micro_batches: int) -> None:
        self.logits = self.batch.decode(self.logits.argmax(-1), experts, micro_batches)


def time_step(decoder: Decoder, experts: ExpertBackend, micro_batches: int, steps: int,
              workers: list[int], dispatch_thread: int | None) -> dict[str, float]:
    timed = TimedBackend(experts)
    cpu0 = {"head_thread": time.thread_time(), "dispatch_thread": thread_cpu_s(dispatch_thread),
            **{f"worker{i}": process_cpu_s(pid) for i, pid in enumerate(workers)}}
    times: list[float] = []
    waits: list[float] = []  # the head's wait on the experts, per step
    for _ in range(steps):
        start, waited = time.perf_counter(), timed.wait_s
        decoder.step(timed, micro_batches)
        times.append(time.perf_counter() - start)
        waits.append(timed.wait_s - waited)
    cpu1 = {"head_thread": time.thread_time(), "dispatch_thread": thread_cpu_s(dispatch_thread),
            **{f"worker{i}": process_cpu_s(pid) for i, pid in enumerate(workers)}}
    # medians, as docs/BENCHMARKS.md reports them: a step in which the OS preempted the head (a loaded machine)
    # moves neither; a mean would charge a null backend's microsecond waits with the whole preemption
    row = {"step_ms": statistics.median(times) * 1e3, "wait_ms": statistics.median(waits) * 1e3}
    row.update({f"{k}_cpu_ms": (cpu1[k] - cpu0[k]) / steps * 1e3 for k in cpu0})
    return row


def time_serialisation(backend: RemoteExpertBackend, layer: int, hidden: Tensor, ids: Tensor,
                       weights: Tensor, rounds: int = 50) -> float:
    """ms per layer round spent planning, encoding the requests and decoding the replies (no I/O)."""
    H = hidden.shape[1]

    def one() -> None:
        out = torch.zeros_like(hidden)
        for b in plan_all_alive(backend.placement, layer, Assignments.from_topk(ids, weights)):
            request = encode_request(layer, backend.placement.epoch, hidden, b, torch.float32)
            wire = expert_pb2.DispatchRequest.FromString(request.SerializeToString())  # the bytes a worker parses
            reply = expert_pb2.DispatchReply(num_tokens=wire.num_tokens, hidden_size=H, dtype=wire.dtype,
                                             partial=wire.hidden)  # a reply's size: [t, H]
            reply = expert_pb2.DispatchReply.FromString(reply.SerializeToString())
            out.index_add_(0, b.tokens, decode_partial(reply, b.tokens.numel(), H, torch.float32))

    return _median_ms(one, rounds)


def _median_ms(fn: Callable[[], object], rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_echo(backend: RemoteExpertBackend, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor,
              rounds: int = 50) -> float:
    """ms of one layer round's gRPC floor: an Echo of the same request and reply sizes to each worker, on
    a stream like the dispatch's."""
    return _median_ms(echo_round(backend, echo_requests(backend, layer, hidden, ids, weights)[0]), rounds)


@torch.inference_mode()
def time_transformers_step(path: Path, prompts: Tensor, steps: int) -> float:
    """ms of one batched decode step of transformers' Qwen3NextForCausalLM ([B, 1] with its cache)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = model(prompts, cache=DynamicCache(config=model.config), use_cache=True)
    times = []
    for _ in range(steps):
        ids = out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        out = model(ids, cache=out.past_key_values, use_cache=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run_step_bench(path: Path, batch: int, prompt_len: int, steps: int, workers: int, seed: int) -> dict[str, object]:
    config = Qwen3NextConfig.from_json(path)
    prompts = random_prompts(checkpoint_prompt_token_ids(path), (batch, prompt_len), seed)
    head, local = load_head(path), load_local_backend(path)
    placement = build_placement(config.moe_layers, config.num_experts, workers, 1)
    admin_token = secrets.token_urlsafe()  # every call carries it, as a cluster's heads' do
    with worker_processes(path, placement, "float32", admin_token) as (procs, addresses), \
            RemoteExpertBackend(addresses, placement, torch.float32, deadline_s=30.0, admin_token=admin_token) as remote, \
            torch.inference_mode():
        head_batch = HeadBatch(head, batch, torch.device("cpu"))
        decoder = Decoder(head_batch, head_batch.prefill(prompts, local))
        pids = [p.pid for p in procs]
        runs = {"null": (ZeroExperts(), 1), "local": (local, 1), "remote": (remote, 1),
                "remote_ping_pong": (remote, 2)}
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
        with tqdm(total=2 * len(runs), desc="bench step", file=sys.stderr) as bar:
            for _ in range(2):  # interleaved, twice: drift hits every kind alike
                for name, (experts, micro) in runs.items():
                    bar.set_postfix_str(name)
                    rows[name].append(time_step(decoder, experts, micro, steps, pids,
                                                remote.channels.thread_id))
                    bar.update()
        table = {name: {k: statistics.fmean(r[k] for r in rs) for k in rs[0]} for name, rs in rows.items()}
        hidden = torch.randn(batch, config.hidden_size, generator=torch.Generator().manual_seed(seed))
        ids, weights = head.model.layers[config.moe_layers[0]].mlp.gate(hidden)
        layer = config.moe_layers[0]
        per_round = {"serialisation_ms": time_serialisation(remote, layer, hidden, ids, weights),
                     "grpc_echo_ms": time_echo(remote, layer, hidden, ids, weights)}
    hf_ms = time_transformers_step(path, prompts, steps)
    moe_layers = len(config.moe_layers)
    return {"batch": batch, "prompt_len": prompt_len, "workers": workers, "moe_layers": moe_layers,
            "steps": table, "per_round": per_round, "transformers_step_ms": hf_ms,
            "head_torch_threads": torch.get_num_threads()}


def format_report(r: dict[str, object]) -> str:
    steps, per_round = r["steps"], r["per_round"]  # type: ignore[index]
    lines = [f"decode step, batch {r['batch']}, {r['workers']} expert workers, {r['moe_layers']} MoE rounds "
             f"per step, head torch threads {r['head_torch_threads']}",
             f"{'experts':<18}{'step ms':>9}{'wait ms':>9}{'head cpu':>10}{'dispatch':>10}"
             + "".join(f"{'w' + str(i) + ' cpu':>9}" for i in range(int(r['workers']))),  # type: ignore[call-overload]
             ]
    for name, row in steps.items():  # type: ignore[union-attr]
        lines.append(f"{name:<18}{row['step_ms']:>9.1f}{row['wait_ms']:>9.1f}{row['head_thread_cpu_ms']:>10.1f}"
                     f"{row['dispatch_thread_cpu_ms']:>10.1f}"
                     + "".join(f"{row[f'worker{i}_cpu_ms']:>9.1f}" for i in range(int(r['workers']))))  # type: ignore[call-overload]
    lines.append(f"{'transformers':<18}{r['transformers_step_ms']:>9.1f}")
    lines.append(f"one round: serialisation (plan, encode, parse, decode, combine) {per_round['serialisation_ms']:.2f} ms, "
                 f"gRPC echo of the same bytes {per_round['grpc_echo_ms']:.2f} ms")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("step", help="where a decode step's time goes: head, experts local and over gRPC")
    p.add_argument("--model", default="tiny", help="checkpoint dir, or 'tiny'")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per kind and pass")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--head-threads", type=int, default=1, help="torch threads of the head (this process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--out", type=Path, help="also write the JSON result to this file")


def run(args: argparse.Namespace, model_dir: Path) -> int:
    torch.set_num_threads(args.head_threads)
    result = run_step_bench(model_dir, args.batch, args.prompt_len, args.steps, args.workers, args.seed)
    line = json.dumps(result)
    if args.out:
        args.out.write_text(line + "\n")
    print(line if args.json else format_report(result))
    return 0
