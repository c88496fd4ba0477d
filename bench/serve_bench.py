"""`nextserve bench serve`: a seeded, traffic-like workload sent through the OpenAI gateway, next to
transformers' own `generate` serving the same requests the way a transformers user would, in the same run.

    make_workload (seeded) -> C streaming /v1/completions in flight -> tok/s, TTFT, TPOT (p50, p99), errors
                           -> transformers generate, batches of C, left-padded -> baseline tok/s, ratio

Workload: token-id prompts drawn from the checkpoint's tokenizer (bench/prompt_ids.py: its ids but the special ones; not
config.vocab_size, which a checkpoint pads past its tokenizer), lengths uniform in [1, L]; outputs uniform in
[8, M] (`--fixed-lengths`: all L in, M out, a server's worst case); greedy with `ignore_eos`, so both sides
produce exactly max_tokens. Throughput = output tokens per second of wall time: the server's
usage.completion_tokens (an SSE event may carry several tokens); for the baseline only the tokens each
request asked for, though a batch runs until its longest request is done. TPOT = (last token time - first
token time) / (tokens - 1). A warm-up request (and generate) precedes timing; the baseline runs after.
Exit status 1 when any request failed (the rows are printed all the same), 2 for a bad command line.

    nextserve bench serve --url http://127.0.0.1:8000 --model ~/.cache/nextserve/tiny-v1 \
        --concurrency 1,4,16,32 --vs-transformers --plot curve.png   # also writes curve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import openai
import torch
from matplotlib.figure import Figure
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from nextserve.bench.process_cpu import ROLES, cluster_processes, cpu_by_role, cpu_snapshot
from nextserve.bench.prompt_ids import checkpoint_prompt_token_ids
from nextserve.cluster.app_args import AppArgs
from nextserve.cluster.engine.contract import EngineRequest
from nextserve.cluster.engine.engine import Engine
from nextserve.model.loader import load_head
from nextserve.router.local_backend import load_local_backend
from nextserve.model.sampling import SamplingParams
from nextserve.model.checkpoint import parse_dtype
from nextserve.model.config import ConfigError

MIN_OUTPUT_TOKENS = 8  # outputs are drawn from [8, M]: a TPOT needs a few tokens to mean anything
PAD_ID = 0  # the baseline's left padding, masked out by attention_mask
REQUEST_TIMEOUT_S = 600.0
"""Per request; a 32-way run on 2 CPU cores can take minutes, and a timeout is counted as an error."""


class BenchError(ConfigError):
    """A command line that cannot make a workload or reach the server; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True, slots=True)
class RequestResult:
    output_tokens: int
    ttft_s: float | None
    tpot_s: float | None
    error: str | None = None
    cached_tokens: int = 0
    """usage.prompt_tokens_details.cached_tokens: prompt tokens the server took from its prefix cache."""


@dataclass(frozen=True)
class ServeBenchRow:
    concurrency: int
    requests: int
    errors: int
    output_tokens: int
    duration_s: float
    throughput_tok_s: float
    ttft_ms_p50: float | None
    ttft_ms_p99: float | None
    tpot_ms_p50: float | None
    tpot_ms_p99: float | None
    baseline_throughput_tok_s: float | None = None
    ratio: float | None = None  # throughput_tok_s / baseline_throughput_tok_s
    workload: str = "mixed"
    """"mixed" (the default workload); with --shared-prefix, "shared-prefix" and its "cold" twin."""
    cached_tokens_mean: float = 0.0
    """Mean prompt tokens per request the server served from its prefix cache."""
    in_process_tok_s: float | None = None
    """--in-process: the same engine with its experts in the benchmark's process, on the same workload."""
    tax: float | None = None  # throughput_tok_s / in_process_tok_s: what the distribution costs (< 1)
    cpu_ms_per_token: dict[str, float] | None = None
    """--cpu: CPU of this machine's cluster processes per output token, by role (process_cpu.ROLES) and
    "total"; "client": this benchmark's own (the HTTP clients), not in the total."""
    in_process_cpu_ms_per_token: float | None = None
    """--in-process with --cpu: the benchmark process's CPU per token while the in-process engine ran."""


def make_workload(num_requests: int, prompt_len: int, max_tokens: int, token_ids: Sequence[int], seed: int,
                  fixed_lengths: bool = False, shared_prefix: int = 0, prefix_seed: int | None = None) -> list[BenchRequest]:
    """`num_requests` requests: prompts of [1, prompt_len] ids drawn from `token_ids`, outputs of
    [8, max_tokens] tokens (exactly prompt_len and max_tokens with `fixed_lengths`); same seed, same list.
    `shared_prefix` > 0: every prompt starts with the same `shared_prefix` ids (drawn once, from
    `prefix_seed`, default `seed`), then its own."""
    shortest = 1 if fixed_lengths else MIN_OUTPUT_TOKENS
    if min(num_requests, prompt_len) < 1 or max_tokens < shortest or not token_ids:
        raise BenchError(f"need --requests >= 1 (got {num_requests}), --prompt-len >= 1 ({prompt_len}), --max-tokens "
                         f">= {shortest} ({max_tokens}; outputs are drawn from [{MIN_OUTPUT_TOKENS}, M] unless "
                         f"--fixed-lengths) and regular tokens to draw prompts from ({len(token_ids)})")
    rng = random.Random(seed)
    prefix_rng = rng if prefix_seed is None else random.Random(prefix_seed)
    prefix = tuple(prefix_rng.choice(token_ids) for _ in range(shared_prefix))
    workload = []
    for _ in range(num_requests):
        num_in = prompt_len if fixed_lengths else rng.randint(1, prompt_len)
        num_out = max_tokens if fixed_lengths else rng.randint(MIN_OUTPUT_TOKENS, max_tokens)
        prompt = tuple(rng.choice(token_ids) for _ in range(num_in))
        workload.append(BenchRequest(prefix + prompt, num_out))
    return workload


def cold_twin(workload: Sequence[BenchRequest], token_ids: Sequence[int], seed: int) -> list[BenchRequest]:
    """The same lengths with every prompt drawn afresh: nothing shared, so nothing to find in a prefix cache."""
    rng = random.Random(seed + 1)
    return [BenchRequest(tuple(rng.choice(token_ids) for _ in r.prompt_ids), r.max_tokens) for r in workload]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]), interpolating linearly between closest ranks (numpy's default)."""
    if not values or not 0 <= q <= 100:
        raise ValueError(f"percentile needs values and q in [0, 100]; got {len(values)} values, q={q}")
    ordered, pos = sorted(values), (len(values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_per_output_token_s(first_token_s: float, last_token_s: float, num_tokens: int) -> float | None:
    """(last - first) / (tokens - 1); None for a single token, which has no gap to measure."""
    return (last_token_s - first_token_s) / (num_tokens - 1) if num_tokens > 1 else None


def _ms_percentile(values_s: list[float], q: float) -> float | None:
    return percentile(values_s, q) * 1e3 if values_s else None


def summarize(concurrency: int, results: Sequence[RequestResult], duration_s: float,
              workload: str = "mixed") -> ServeBenchRow:
    """One row from the per-request results of a run that took `duration_s` of wall time."""
    ok = [r for r in results if r.error is None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    tokens = sum(r.output_tokens for r in ok)
    return ServeBenchRow(concurrency, len(results), len(results) - len(ok), tokens, duration_s,
                         tokens / duration_s if duration_s > 0 else 0.0, _ms_percentile(ttft, 50),
                         _ms_percentile(ttft, 99), _ms_percentile(tpot, 50), _ms_percentile(tpot, 99),
                         workload=workload, cached_tokens_mean=sum(r.cached_tokens for r in ok) / max(len(ok), 1))


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T]), T = the longest prompt, pads on the left."""
    pads = [max(len(p) for p in prompts) - len(p) for p in prompts]
    ids = [[pad_id] * n + list(p) for n, p in zip(pads, prompts)]
    return torch.tensor(ids), torch.tensor([[0] * n + [1] * len(p) for n, p in zip(pads, prompts)])


async def _send(client: openai.AsyncOpenAI, model_name: str, req: BenchRequest) -> RequestResult:
    """One greedy streaming completion; tokens from usage, times from the chunks' arrival."""
    start, first, last, tokens, cached = time.perf_counter(), None, 0.0, None, 0
    try:
        stream = await client.completions.create(
            model=model_name, prompt=list(req.prompt_ids), max_tokens=req.max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                first = now if first is None else first
                last = now
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
                details = chunk.usage.prompt_tokens_details
                cached = details.cached_tokens or 0 if details is not None else 0
    except openai.OpenAIError as e:
        return RequestResult(0, None, None, f"{type(e).__name__}: {e}")
    if first is None or tokens is None:
        return RequestResult(0, None, None, "the stream ended without tokens or usage")
    return RequestResult(tokens, first - start, time_per_output_token_s(first, last, tokens), None, cached)


async def _run_served(client: openai.AsyncOpenAI, model_name: str, workload: list[BenchRequest],
                      concurrency: int, name: str = "mixed", measure_cpu: bool = False,
                      cpu_root: int | None = None) -> ServeBenchRow:
    processes = cluster_processes(cpu_root) if measure_cpu else {}
    cpu_before, client_before = cpu_snapshot(processes), time.process_time()
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(workload), desc=f"served c={concurrency}", unit="req", file=sys.stderr)

    async def limited(req: BenchRequest) -> RequestResult:
        async with gate:
            result = await _send(client, model_name, req)
        bar.update()
        return result

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(r) for r in workload))
    bar.close()
    row = summarize(concurrency, results, time.perf_counter() - start, name)
    if not measure_cpu:
        return row
    processes = cluster_processes(cpu_root)  # again: a process started during the run counts from 0
    spent = cpu_by_role(processes, cpu_before, cpu_snapshot(processes))
    per_token = {role: s * 1e3 / max(row.output_tokens, 1) for role, s in spent.items()}
    client = (time.process_time() - client_before) * 1e3 / max(row.output_tokens, 1)
    return replace(row, cpu_ms_per_token={**per_token, "total": sum(per_token.values()), "client": client})


async def _served_sweep(url: str, api_key: str, model_name: str | None, workload: list[BenchRequest],
                        concurrencies: list[int],
                        fresh: Callable[[int], tuple[list[BenchRequest], list[BenchRequest]]] | None = None,
                        measure_cpu: bool = False, cpu_root: int | None = None) -> list[ServeBenchRow]:
    """The workload at each concurrency, after one warm-up request; the served name defaults to /v1/models'.
    With `fresh` (--shared-prefix): for the i-th concurrency, fresh(i) gives a shared-prefix workload (the
    one prefix, new suffixes) and its cold twin, each never sent before, run one after the other."""
    async with openai.AsyncOpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=api_key, max_retries=0,
                                  timeout=REQUEST_TIMEOUT_S) as client:
        try:
            model_name = model_name or (await client.models.list()).data[0].id
        except openai.OpenAIError as e:
            raise BenchError(f"cannot list models at {url}/v1/models ({e}); is `nextserve up` running there?") from e
        warmup = await _send(client, model_name, workload[0])
        if warmup.error is not None:
            raise BenchError(f"the warm-up request to {url} failed: {warmup.error}")
        if fresh is None:
            return [await _run_served(client, model_name, workload, c, measure_cpu=measure_cpu, cpu_root=cpu_root)
                    for c in concurrencies]
        rows = []
        for i, c in enumerate(concurrencies):
            shared, cold = fresh(i)
            rows.append(await _run_served(client, model_name, shared, c, "shared-prefix", measure_cpu, cpu_root))
            rows.append(await _run_served(client, model_name, cold, c, "cold", measure_cpu, cpu_root))
        return rows


def load_transformers(model_dir: Path, dtype: str) -> PreTrainedModel:
    """transformers' own model on the checkpoint, generating to max_new_tokens (no EOS stop, like ignore_eos)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=parse_dtype(dtype)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID
    return model


@torch.inference_mode()
def transformers_throughput(model: PreTrainedModel, workload: list[BenchRequest], concurrency: int) -> float:
    """Requested output tokens/s of `generate` on the workload in batches of `concurrency`, left-padded,
    each batch greedy until its longest request is done."""
    model.generate(input_ids=torch.tensor([workload[0].prompt_ids[:1]]), max_new_tokens=2, do_sample=False)  # warm-up
    batches = [workload[i:i + concurrency] for i in range(0, len(workload), concurrency)]
    start = time.perf_counter()
    for batch in tqdm(batches, desc=f"transformers c={concurrency}", unit="batch", file=sys.stderr):
        ids, mask = left_pad([r.prompt_ids for r in batch])
        num_new = max(r.max_tokens for r in batch)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=num_new, do_sample=False)
        assert out.shape[1] == ids.shape[1] + num_new, "generate stopped early: eos_token_id is not disabled"
    return sum(r.max_tokens for r in workload) / (time.perf_counter() - start)


def in_process_engine(model_dir: Path, dtype: str) -> Engine:
    """The served head engine (nextserve up's default scheduler and cache settings) with every routed
    expert in this process: the cluster's work without its distribution."""
    args = AppArgs(model=str(model_dir), dtype=dtype)
    return Engine(load_head(model_dir, dtype, mtp=args.head_loads_mtp()), load_local_backend(model_dir, dtype), None, args.scheduler_config(),
                  args.context_length(), args.cache_config())


def in_process_throughput(engine: Engine, workload: list[BenchRequest], concurrency: int) -> tuple[float, float]:
    """(output tokens/s, CPU ms per token of this process) of `engine` serving the workload greedily with
    `concurrency` requests in flight, like the served run (ignore_eos, exactly max_tokens each), on one
    torch thread like a head replica (measured on 2 cores: 533 tok/s with 1 thread, 219 with 2, whose
    idle OpenMP threads spin against the engine's own)."""

    async def serve_all(requests: list[BenchRequest]) -> int:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int, req: BenchRequest) -> int:
            params = SamplingParams(temperature=0.0, max_tokens=req.max_tokens, ignore_eos=True)
            async with gate:
                request = EngineRequest(f"peer-{i}", tuple(req.prompt_ids), params)
                return sum([len(out.token_ids) async for out in engine.generate(request)])

        return sum(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a head replica computes (cluster/deployments/actor_threads.py)
    try:
        asyncio.run(serve_all(workload[:1]))  # warm-up, like the served run's (a whole pass would fill the prefix cache)
        cpu0, start = time.process_time(), time.perf_counter()
        tokens = asyncio.run(serve_all(workload))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    finally:
        torch.set_num_threads(threads)
    return tokens / wall, cpu * 1e3 / max(tokens, 1)


def plot_curve(rows: Sequence[ServeBenchRow], path: Path) -> None:
    """Throughput (served, and transformers when measured) and p50/p99 TTFT and TPOT against concurrency."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_tok, ax_lat = fig.subplots(1, 2)
    xs = [r.concurrency for r in rows]
    ax_tok.plot(xs, [r.throughput_tok_s for r in rows], "C0o-", label="nextserve (gateway)")
    if any(r.baseline_throughput_tok_s is not None for r in rows):
        ax_tok.plot(xs, [r.baseline_throughput_tok_s or math.nan for r in rows], "C2s--", label="transformers generate")
    ax_tok.set(title="throughput", xlabel="concurrency", ylabel="output tokens / s", ylim=(0, None))
    for name, style in (("ttft", "C0o"), ("tpot", "C1s")):
        for q, line in (("p50", "-"), ("p99", ":")):
            values = [getattr(r, f"{name}_ms_{q}") for r in rows]
            ax_lat.plot(xs, [math.nan if v is None else v for v in values], style + line, label=f"{name.upper()} {q}")
    ax_lat.set(title="latency (served)", xlabel="concurrency", ylabel="ms", ylim=(0, None))
    for ax in (ax_tok, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.savefig(path, format="png", dpi=110)


def format_table(rows: Sequence[ServeBenchRow]) -> str:
    """A readable table, "-" where not measured; with --cpu, a second one: CPU ms per token by role."""
    columns = [("conc", "concurrency"), ("reqs", "requests"), ("errors", "errors"), ("out_tok", "output_tokens"),
               ("tok/s", "throughput_tok_s"), ("ttft_p50_ms", "ttft_ms_p50"), ("ttft_p99_ms", "ttft_ms_p99"),
               ("tpot_p50_ms", "tpot_ms_p50"), ("tpot_p99_ms", "tpot_ms_p99"),
               ("transformers_tok/s", "baseline_throughput_tok_s"), ("ratio", "ratio"),
               ("in_process_tok/s", "in_process_tok_s"), ("tax", "tax"), ("workload     ", "workload"),
               ("cached_mean", "cached_tokens_mean")]
    lines = ["  ".join(name for name, _ in columns)]
    for r in rows:
        cells = []
        for name, field in columns:
            v = getattr(r, field)
            cells.append("-" if v is None else str(v) if isinstance(v, (int, str)) else
                         f"{v:.{2 if field in ('ratio', 'tax') else 1}f}")
        lines.append("  ".join(c.rjust(len(n)) for c, (n, _) in zip(cells, columns)))
    if any(r.cpu_ms_per_token for r in rows):
        names = ["conc", *ROLES, "total", "in_process", "total/in_process", "bench_client"]
        lines += ["", "CPU ms per output token (this machine's cluster processes):", "  ".join(names)]
        for r in rows:
            cpu = r.cpu_ms_per_token or {}
            peer = r.in_process_cpu_ms_per_token
            cells = [str(r.concurrency), *(f"{cpu.get(k, 0.0):.2f}" for k in (*ROLES, "total")),
                     "-" if peer is None else f"{peer:.2f}", "-" if peer is None else f"{cpu['total'] / peer:.2f}",
                     f"{cpu.get('client', 0.0):.2f}"]
            lines.append("  ".join(c.rjust(len(n)) for c, n in zip(cells, names)))
    return "\n".join(lines)


def _concurrency_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma list like 1,4,16; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrencies must be >= 1; got {text!r}")
    return values


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="throughput/TTFT/TPOT through the gateway, optionally vs transformers")
    p.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, type=Path, help="the checkpoint dir the server runs (vocab, baseline)")
    p.add_argument("--model-name", help="the served model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default="EMPTY", help="the gateway's key, if it was started with one")
    p.add_argument("--concurrency", type=_concurrency_list, default=[8], help="in flight; a comma list sweeps")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-len", type=int, default=128, help="longest prompt (every prompt's with --fixed-lengths)")
    p.add_argument("--max-tokens", type=int, default=64, help="longest output (every output's with --fixed-lengths)")
    p.add_argument("--fixed-lengths", action="store_true", help="every request L in and M out (worst case)")
    p.add_argument("--shared-prefix", type=int, default=0, metavar="TOKENS",
                   help="every prompt starts with the same TOKENS ids (then its own); each concurrency also runs "
                        "a cold twin of the same lengths, sharing nothing: TTFT with and without prefix-cache hits")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the baseline's; match the server")
    p.add_argument("--vs-transformers", action="store_true", help="also run transformers' generate as the baseline")
    p.add_argument("--in-process", action="store_true",
                   help="also run the same engine (nextserve up's default settings) with its experts in this process "
                        "(the distribution tax: tok/s ratio)")
    p.add_argument("--cpu", action="store_true",
                   help="CPU per output token of this machine's cluster processes by role (a local server only)")
    p.add_argument("--cpu-root", type=int, metavar="PID",
                   help="with --cpu: count only PID (the `nextserve up` process) and its descendants, when other "
                        "clusters run on this machine (default: every cluster process of this user)")
    p.add_argument("--json", action="store_true", help="one JSON line per concurrency")
    p.add_argument("--plot", type=Path, help="draw the curve to this PNG (and its rows to the .json beside it)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.in_process and args.shared_prefix:
            raise BenchError("--in-process runs the default workload; drop --shared-prefix for it (or run them apart)")
        if args.cpu_root is not None and not Path(f"/proc/{args.cpu_root}").exists():
            raise BenchError(f"--cpu-root {args.cpu_root}: no such process here; pass the pid of the `nextserve up` "
                             f"serving --url (or drop --cpu-root to count every cluster process)")
        token_ids = checkpoint_prompt_token_ids(args.model)
        workload = make_workload(args.requests, args.prompt_len, args.max_tokens, token_ids, args.seed,
                                 args.fixed_lengths, args.shared_prefix)

        def fresh(i: int) -> tuple[list[BenchRequest], list[BenchRequest]]:
            seed = args.seed + 7919 * (i + 1)  # new suffixes and cold prompts per concurrency: none seen before
            shared = make_workload(args.requests, args.prompt_len, args.max_tokens, token_ids, seed,
                                   args.fixed_lengths, args.shared_prefix, prefix_seed=args.seed)
            return shared, cold_twin(shared, token_ids, seed)

        rows = asyncio.run(_served_sweep(args.url, args.api_key, args.model_name, workload, args.concurrency,
                                         fresh if args.shared_prefix else None, args.cpu, args.cpu_root))
    except BenchError as e:
        print(f"nextserve: error: {e}", file=sys.stderr)
        return 2
    if args.vs_transformers:
        model = load_transformers(args.model, args.dtype)
        baselines = [transformers_throughput(model, workload, r.concurrency) for r in rows]
        rows = [replace(r, baseline_throughput_tok_s=b, ratio=r.throughput_tok_s / b) for r, b in zip(rows, baselines)]
    if args.in_process:
        engine = in_process_engine(args.model, args.dtype)
        try:
            peers = [in_process_throughput(engine, workload, r.concurrency) for r in rows]
        finally:
            engine.shutdown()
        rows = [replace(r, in_process_tok_s=tok_s, tax=r.throughput_tok_s / tok_s,
                        in_process_cpu_ms_per_token=cpu_ms if args.cpu else None) for r, (tok_s, cpu_ms) in zip(rows, peers)]
    lines = [json.dumps(asdict(r)) for r in rows]
    if args.plot:
        plot_curve(rows, args.plot)
        args.plot.with_suffix(".json").write_text("\n".join(lines) + "\n")
    print("\n".join(lines) if args.json else format_table(rows))
    return 1 if any(r.errors for r in rows) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="serve_bench")
    add_parser(parser.add_subparsers(dest="bench", required=True))
    sys.exit(run(parser.parse_args(["serve", *sys.argv[1:]])))
