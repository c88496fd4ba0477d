"""`nextserve bench engine`: the head engine's steady decode step at several batch sizes, with the routed
experts in this process, next to transformers' own decode step at the same batch and context.

Flow per batch size B: the engine's scheduler and model runner (cluster/engine: the step the engine
thread runs, minus detokenizing and streaming) over a cache sized for B sequences -> B prompts of
`context` random tokens, prefilled -> `steps` timed decode steps (schedule -> forward over the pooled
cache -> greedy sample -> advance), each followed by one of transformers' [B, 1] forwards (the same
prompts prefilled into its DynamicCache), so drift and other processes hit both alike -> one more step
of each under a TorchDispatchMode that counts the torch operator calls. Medians count.

Then, under pressure (`--pressure-requests N`, 0 to skip): N requests of `--pressure-prompt` prompt and
`--pressure-max-tokens` greedy output tokens, all at once, through the engine (its thread, scheduler and
streams) with a cache budget that holds a quarter of their KV (and a state slot for each): how many complete, how many equal
transformers' `generate` token for token, the preemptions, and the process's resident memory sampled
through the run (flat: the cache is allocated at start and never grows).

    nextserve bench engine [--model DIR|tiny] [--batches 1,64,256] [--context 512] [--steps 10] [--threads 1]
                           [--pressure-requests 32] [--pressure-prompt 256] [--pressure-max-tokens 128] [--json]

Targets (issue 13; reported, not asserted): ops_per_step at the largest batch <= 1.2x at batch 1 (the
host work per step does not grow with the batch), tok/s at 256 >= 1.5x transformers', and under
pressure every request complete and equal to transformers' with the memory flat.
Letters: B = batch, L = context (prompt tokens), V = vocab.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm
from transformers import AutoModelForCausalLM, DynamicCache

from nextserve.bench.prompt_ids import checkpoint_prompt_token_ids, random_prompts
from nextserve.model.cache.block_manager import BlockManager
from nextserve.cluster.engine.engine import Engine
from nextserve.cluster.engine.model_runner import ModelRunner, head_cache_capacity
from nextserve.cluster.engine.contract import EngineRequest
from nextserve.cluster.engine.scheduler import Scheduler, SchedulerConfig, SequenceState
from nextserve.model.cache.budget import CacheConfig
from nextserve.model.checkpoint import parse_dtype
from nextserve.model.config import ConfigError
from nextserve.model.expert_backend import ExpertBackend
from nextserve.model.loader import load_head
from nextserve.router.local_backend import load_local_backend
from nextserve.model.qwen3_next import HeadModel
from nextserve.model.sampling import SamplingParams
from nextserve.model.sizes import model_sizes

WARMUP_STEPS = 2
PREFILL_TOKENS_PER_STEP = 8192
"""Prefill tokens of a bench step besides its decodes (the engine's whole budget is 512): fills the batch
in fewer steps, into the same cache."""


@dataclass(frozen=True)
class EngineBenchRow:
    batch: int
    step_ms: float
    tok_s: float
    ops_per_step: int
    """torch operator calls of one decode step (schedule, forward, sample), experts included."""
    transformers_step_ms: float
    transformers_tok_s: float
    transformers_ops_per_step: int


class OpCounter(TorchDispatchMode):
    """Counts the torch operator calls dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def _count_ops(fn: Callable[[], object]) -> int:
    with OpCounter() as counter:
        fn()
    return counter.count


def _interleaved_median_ms(fns: list[Callable[[], object]], steps: int) -> list[float]:
    """Median ms of each fn, run in turn step by step so that drift and other processes hit all alike."""
    for _ in range(WARMUP_STEPS):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(steps):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) * 1e3 for ts in times]


class EngineDecoder:
    """B sequences in an engine's scheduler + model runner, prefilled, then stepped one decode at a time."""

    def __init__(self, head: HeadModel, experts: ExpertBackend, prompts: Tensor, decode_steps: int) -> None:
        B, L = prompts.shape
        prefill_steps = -(-B * L // PREFILL_TOKENS_PER_STEP) + 1  # the first prefilled decode while others prefill
        max_len = L + prefill_steps + decode_steps
        sizes = model_sizes(head.config, head.lm_head.weight.dtype)
        block_size = CacheConfig.block_size
        per_seq = -(-max_len // block_size) * block_size * sizes.kv_bytes_per_token
        # Room for every sequence (no preemption) and no prefix cache: the decode step alone is measured.
        cache = CacheConfig(B * (sizes.deltanet_state_bytes_per_sequence + per_seq), block_size, enable_prefix_cache=False)
        config = SchedulerConfig(max_num_seqs=B, max_tokens_per_step=B + PREFILL_TOKENS_PER_STEP, prefill_chunk=L)
        capacity = head_cache_capacity(head, cache, B, max_len)
        self.scheduler = Scheduler(config, BlockManager(capacity.num_blocks, capacity.num_slots, block_size))
        self.runner = ModelRunner(head, experts, capacity, config)
        params = SamplingParams(max_tokens=max_len - L, ignore_eos=True)
        for i, prompt in enumerate(prompts.tolist()):
            self.scheduler.add(SequenceState(EngineRequest(f"bench-{i}", tuple(prompt), params)))
        while self.scheduler.waiting or any(seq.is_prefilling for seq in self.scheduler.running):
            self.step()

    def step(self) -> None:
        """One engine step: schedule, forward, greedy tokens (one device sync), advance."""
        plan = self.scheduler.schedule()
        tokens = self.runner.run(plan).argmax(dim=-1).tolist()
        for item, token in zip(plan.scheduled, tokens):
            self.scheduler.advance(item, token if item.samples_token else None)


class TransformersDecoder:
    """transformers' Qwen3NextForCausalLM with its own cache: prefill [B, L], then [B, 1] steps."""

    def __init__(self, path: Path, dtype: torch.dtype, prompts: Tensor) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        out = self.model(prompts, cache=DynamicCache(config=self.model.config), use_cache=True)
        self.cache, self.ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self) -> None:
        out = self.model(self.ids, cache=self.cache, use_cache=True)
        self.cache, self.ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)


@torch.inference_mode()
def bench_batch(path: Path, head: HeadModel, experts: ExpertBackend, dtype: torch.dtype, batch: int, context: int,
                steps: int, seed: int) -> EngineBenchRow:
    prompts = random_prompts(checkpoint_prompt_token_ids(path), (batch, context), seed)
    ours = EngineDecoder(head, experts, prompts, WARMUP_STEPS + steps + 2)  # timed, counted, one to spare
    theirs = TransformersDecoder(path, dtype, prompts)
    step_ms, hf_ms = _interleaved_median_ms([ours.step, theirs.step], steps)
    ops, hf_ops = _count_ops(ours.step), _count_ops(theirs.step)
    return EngineBenchRow(batch, step_ms, batch / step_ms * 1e3, ops, hf_ms, batch / hf_ms * 1e3, hf_ops)


def _rss_bytes() -> int:
    """This process's resident memory now (Linux /proc), else its peak so far."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class PressureResult:
    requests: int
    prompt_tokens: int
    max_tokens: int
    cache_bytes: int
    """A state slot for every request and a quarter of the KV they need all at once."""
    cache_slots: int
    cache_blocks: int
    completed: int
    equal_to_transformers: int
    preemptions: int
    wall_s: float
    rss_mib_at_start: float
    """After the engine allocated its cache and ran one request (pages of the pools touched since)."""
    rss_mib_peak: float
    rss_mib_at_end: float


@torch.inference_mode()
def run_pressure(path: Path, head: HeadModel, experts: ExpertBackend, dtype: torch.dtype, requests: int,
                 prompt_len: int, max_tokens: int, seed: int) -> PressureResult:
    sizes = model_sizes(head.config, head.lm_head.weight.dtype)
    block = CacheConfig.block_size
    kv_per_seq = -(-(prompt_len + max_tokens) // block) * block * sizes.kv_bytes_per_token
    # A state slot for every request (they may all run) and a quarter of their KV: the KV is what grows.
    budget = requests * sizes.deltanet_state_bytes_per_sequence + requests * kv_per_seq // 4
    engine = Engine(head, experts, None, SchedulerConfig(max_num_seqs=requests), prompt_len + max_tokens,
                    CacheConfig(budget, block, enable_prefix_cache=False))  # the budget is all slots and KV
    prompts = random_prompts(checkpoint_prompt_token_ids(path), (requests, prompt_len), seed).tolist()
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    try:
        engine.generate_sync(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm
        start_rss, samples, done = _rss_bytes(), [], threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                samples.append(_rss_bytes())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        outs = engine.generate_sync(prompts, params)
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        end_rss = _rss_bytes()
        capacity, preemptions = engine.capacity, engine.stats().num_preemptions
    finally:
        engine.shutdown()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # to max_new_tokens, as ignore_eos (EOS not masked)
    equal = 0
    for prompt, out in zip(prompts, outs):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False)[0, prompt_len:]
        equal += out.token_ids == ref.tolist()
    mib = 2**20
    return PressureResult(requests, prompt_len, max_tokens, budget, capacity.num_slots, capacity.num_blocks,
                          sum(len(o.token_ids) == max_tokens for o in outs), equal, preemptions, wall,
                          start_rss / mib, max(samples + [end_rss]) / mib, end_rss / mib)


def run_engine_bench(path: Path, batches: list[int], context: int, steps: int, dtype: str, seed: int,
                     threads: int | None = None, pressure: tuple[int, int, int] = (0, 0, 0)) -> dict[str, Any]:
    """`pressure`: (requests, prompt tokens, max tokens) of the pressure run; 0 requests skips it."""
    if min(batches) < 1 or context < 1 or steps < 1:
        raise ConfigError(f"--batches {batches}, --context {context} and --steps {steps} must be >= 1")
    if threads is not None:
        torch.set_num_threads(threads)
    torch_dtype = parse_dtype(dtype)
    head, experts = load_head(path, torch_dtype), load_local_backend(path, torch_dtype)
    rows = []
    for batch in tqdm(batches, desc="bench engine", file=sys.stderr):
        rows.append(bench_batch(path, head, experts, torch_dtype, batch, context, steps, seed))
    first, last = rows[0], rows[-1]
    requests, prompt_len, max_tokens = pressure
    under_pressure = asdict(run_pressure(path, head, experts, torch_dtype, requests, prompt_len, max_tokens, seed)) \
        if requests else None
    return {"pressure": under_pressure, "date": datetime.date.today().isoformat(), "model": str(path), "dtype": dtype, "context": context,
            "steps": steps, "torch_threads": torch.get_num_threads(), "batches": [asdict(r) for r in rows],
            "ops_ratio_last_to_first": last.ops_per_step / first.ops_per_step,
            "tok_s_ratio_to_transformers_at_last": last.tok_s / last.transformers_tok_s}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['model']}  {result['dtype']}  context {result['context']}  {result['torch_threads']} threads",
             f"{'B':>5}{'step ms':>10}{'tok/s':>10}{'ops/step':>10}{'hf step ms':>12}{'hf tok/s':>10}"
             f"{'hf ops':>9}{'tok/s vs hf':>13}"]
    for r in result["batches"]:
        lines.append(f"{r['batch']:>5}{r['step_ms']:>10.2f}{r['tok_s']:>10.1f}{r['ops_per_step']:>10}"
                     f"{r['transformers_step_ms']:>12.2f}{r['transformers_tok_s']:>10.1f}"
                     f"{r['transformers_ops_per_step']:>9}{r['tok_s'] / r['transformers_tok_s']:>12.2f}x")
    lines.append(f"ops/step at B={result['batches'][-1]['batch']} vs B={result['batches'][0]['batch']}: "
                 f"{result['ops_ratio_last_to_first']:.2f}x (target <= 1.2x); tok/s vs transformers at "
                 f"B={result['batches'][-1]['batch']}: {result['tok_s_ratio_to_transformers_at_last']:.2f}x "
                 f"(target >= 1.5x)")
    p = result.get("pressure")
    if p:
        lines.append(f"pressure: {p['requests']} requests of {p['prompt_tokens']} + {p['max_tokens']} tokens in a "
                     f"{p['cache_bytes'] / 2**20:.1f} MiB cache ({p['cache_slots']} slots, {p['cache_blocks']} blocks, "
                     f"a quarter of the KV): {p['completed']} complete, {p['equal_to_transformers']} equal to "
                     f"transformers, {p['preemptions']} preemptions, {p['wall_s']:.1f} s; RSS MiB start "
                     f"{p['rss_mib_at_start']:.0f} peak {p['rss_mib_peak']:.0f} end {p['rss_mib_at_end']:.0f}")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]  # argparse reports a ValueError as an invalid value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="steady decode step of the head engine per batch size vs transformers")
    p.add_argument("--model", default="tiny", help="checkpoint dir, or 'tiny'")
    p.add_argument("--batches", type=_int_list, default=[1, 64, 256], help="decode batch sizes, e.g. 1,64,256")
    p.add_argument("--context", type=int, default=512, help="prompt tokens per sequence (the cached context)")
    p.add_argument("--steps", type=int, default=10, help="timed decode steps per batch size and side")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1, help="torch threads of both sides (1: on a shared machine "
                   "idle OpenMP threads spin on cores others need, and the numbers scatter)")
    p.add_argument("--pressure-requests", type=int, default=32,
                   help="requests of the pressure run, in a cache a quarter of their need (0: skip it)")
    p.add_argument("--pressure-prompt", type=int, default=256, help="prompt tokens of each pressure request")
    p.add_argument("--pressure-max-tokens", type=int, default=128, help="output tokens of each pressure request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--out", type=Path, help="also write the JSON result to this file")


def run(args: argparse.Namespace, model_dir: Path) -> int:
    result = run_engine_bench(model_dir, args.batches, args.context, args.steps, args.dtype, args.seed, args.threads,
                              (args.pressure_requests, args.pressure_prompt, args.pressure_max_tokens))
    line = json.dumps(result)
    if args.out:
        args.out.write_text(line + "\n")
    print(line if args.json else format_table(result))
    return 0
