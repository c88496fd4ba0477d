"""`nextserve bench spec`: speculative decoding on a rewrite workload, with and without drafts, in one run.

    files (this package's own sources, cut to --file-tokens) -> prompt "Rewrite this file ..." + the file
    -> in-process engine (nextserve up's scheduler and cache) without drafts, then with --speculative-config
    -> one request at a time, greedy, exactly max_tokens (= the file's tokens) each
    -> tokens/s, TPOT (mean, p50), drafts accepted, speed-up, and whether both runs output the same tokens
    --step-cost 1,4,8,16: a head step of B plain decodes against B verify chunks of k + 1 tokens (experts in
    process): the ratio is the mean accepted length a verify step needs to pay, per batch size
    (SpeculativeConfig.disable_by_batch_size)

A coding agent's rewrite (an edit, a whole file) repeats text of its prompt: n-gram drafts looked up there
are accepted as far as the model does copy it. A random-weight checkpoint does not copy, so it measures the
cost of verifying drafts that are mostly rejected; a checkpoint that rewrites (a trained one) measures the
gain. Each request is timed alone; a warm-up request runs first on each engine. Exit status 1 when the two
runs' greedy tokens differ (they must not).

    nextserve bench spec --model tiny --speculative-config '{"method": "ngram", "num_speculative_tokens": 4}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from nextserve.cluster.app_args import AppArgs
from nextserve.cluster.engine.contract import EngineRequest
from nextserve.cluster.engine.engine import Engine
from nextserve.cluster.engine.speculative_config import SpeculativeConfig
from nextserve.model.cache.pools import HybridCache
from nextserve.model.forward_batch import ForwardBatch
from nextserve.model.loader import load_head
from nextserve.model.sampling import SamplingParams
from nextserve.router.local_backend import load_local_backend

PACKAGE = Path(__file__).resolve().parents[1]
FILES = ("model/layers/attention.py", "model/layers/deltanet.py", "model/layers/norm.py", "model/layers/rope.py",
         "model/layers/moe_gate.py", "cluster/engine/fair_queue.py")
"""The rewrite workload's files (this package's own, so the bench needs nothing else); the first warms up."""
DEFAULT_SPEC = '{"method": "ngram", "num_speculative_tokens": 4}'


@dataclass(frozen=True, slots=True)
class SpecBenchRow:
    config: str
    requests: int
    output_tokens: int
    tokens_per_s: float
    tpot_mean_ms: float
    tpot_p50_ms: float
    drafts: int
    draft_tokens: int
    accepted_tokens: int

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verify step yields on average: 1 + accepted / drafts (vLLM's)."""
        return 1 + self.accepted_tokens / self.drafts if self.drafts else 1.0


def rewrite_prompts(tokenizer: object, num_files: int, file_tokens: int) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) per file: the prompt asks the file back; max_tokens = the file's tokens."""
    out = []
    for name in FILES[:num_files + 1]:
        ids = tokenizer.encode((PACKAGE / name).read_text(), add_special_tokens=False)[:file_tokens]  # type: ignore[attr-defined]
        text = tokenizer.decode(ids)  # type: ignore[attr-defined]
        prompt = f"Rewrite this file as it is.\n<file path=\"{name}\">\n{text}\n</file>\n"
        out.append((tokenizer.encode(prompt, add_special_tokens=False), len(ids)))  # type: ignore[attr-defined]
    return out


def one_at_a_time(engine: Engine, requests: list[tuple[list[int], int]]) -> tuple[list[list[int]], float, list[float]]:
    """Greedy outputs, total decode wall seconds and TPOTs (s) of the requests run one after another."""

    async def one(i: int, prompt: list[int], max_tokens: int) -> tuple[list[int], float, float]:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        tokens: list[int] = []
        start = first = time.perf_counter()
        async for out in engine.generate(EngineRequest(f"spec-{i}", tuple(prompt), params)):
            if not tokens:
                first = time.perf_counter()
            tokens += out.token_ids
        end = time.perf_counter()
        return tokens, end - start, (end - first) / max(len(tokens) - 1, 1)

    outputs, wall, tpots = [], 0.0, []
    for i, (prompt, max_tokens) in enumerate(requests):
        tokens, seconds, tpot = asyncio.run(one(i, prompt, max_tokens))
        outputs.append(tokens)
        wall += seconds
        tpots.append(tpot)
    return outputs, wall, tpots


def measure(model_dir: Path, dtype: str, spec: SpeculativeConfig | None,
            requests: list[tuple[list[int], int]]) -> tuple[SpecBenchRow, list[list[int]]]:
    args = AppArgs(model=str(model_dir), dtype=dtype)
    engine = Engine(load_head(model_dir, dtype), load_local_backend(model_dir, dtype), None, args.scheduler_config(),
                    args.context_length(), args.cache_config(), speculative=spec)
    try:
        one_at_a_time(engine, requests[:1])  # warm-up
        before = engine.stats()
        outputs, wall, tpots = one_at_a_time(engine, requests[1:])
        after = engine.stats()
    finally:
        engine.shutdown()
    num_tokens = sum(len(o) for o in outputs)
    row = SpecBenchRow("none" if spec is None else spec.to_json(), len(outputs), num_tokens, num_tokens / wall,
                       1e3 * statistics.mean(tpots), 1e3 * statistics.median(tpots),
                       after.spec_decode_num_drafts - before.spec_decode_num_drafts,
                       after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens,
                       after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens)
    return row, outputs


def step_cost(model_dir: Path, dtype: str, k: int, batch_sizes: list[int], context: int = 256,
              reps: int = 5) -> list[tuple[int, float, float]]:
    """(B, ms of a step of B decodes, ms of a step of B verify chunks of k + 1 tokens) after `context` cached
    tokens each, median of `reps`."""
    head, experts = load_head(model_dir, dtype), load_local_backend(model_dir, dtype)
    device, out = head.lm_head.weight.device, []
    for B in batch_sizes:
        cache = HybridCache.contiguous(head.config, B, context + k + 1, 16, head.lm_head.weight.dtype, device)
        ids = torch.randint(3, 1000, (B * context,), device=device)
        head(ids, ForwardBatch.build([context] * B, [0] * B, list(range(B)), cache), experts)
        times = []
        for n in (1, k + 1):
            batch = ForwardBatch.build([n] * B, [context] * B, list(range(B)), cache, [n > 1] * B)
            samples = []
            for _ in range(reps):
                start = time.perf_counter()
                head.forward_micro_batches([(ids[:n * B], batch)], experts)
                samples.append(time.perf_counter() - start)
            times.append(1e3 * statistics.median(samples))
        out.append((B, times[0], times[1]))
    return out


def format_table(rows: list[SpecBenchRow]) -> str:
    lines = [f"{'config':<48}{'req':>5}{'tokens':>8}{'tok/s':>9}{'TPOT ms':>9}{'p50 ms':>8}{'accepted':>14}"
             f"{'len/step':>9}{'speed-up':>9}"]
    for row in rows:
        accepted = f"{row.accepted_tokens}/{row.draft_tokens}"
        lines.append(f"{row.config[:47]:<48}{row.requests:>5}{row.output_tokens:>8}{row.tokens_per_s:>9.1f}"
                     f"{row.tpot_mean_ms:>9.2f}{row.tpot_p50_ms:>8.2f}{accepted:>14}{row.mean_accepted_length:>9.2f}"
                     f"{row.tokens_per_s / rows[0].tokens_per_s:>8.2f}x")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("spec", help="rewrite workload with and without speculative decoding, one request at a time")
    p.add_argument("--model", default="tiny", help="checkpoint directory, or `tiny`")
    p.add_argument("--speculative-config", default=DEFAULT_SPEC, help=f"JSON (default {DEFAULT_SPEC})")
    p.add_argument("--files", type=int, default=3, help=f"files rewritten (at most {len(FILES) - 1})")
    p.add_argument("--file-tokens", type=int, default=200, help="each file cut to this many tokens")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (a head replica computes on 1)")
    p.add_argument("--step-cost", default="", help="batch sizes (e.g. 1,4,8,16): time decode vs verify steps "
                   "instead of the rewrite workload")
    p.add_argument("--json", type=Path, default=Path("spec_bench.json"), help="where the rows are written")


def run(args: argparse.Namespace) -> int:
    spec = SpeculativeConfig.from_json(args.speculative_config)
    model_dir = Path(args.model)
    requests = rewrite_prompts(AutoTokenizer.from_pretrained(model_dir), min(args.files, len(FILES) - 1),
                               args.file_tokens)
    torch.set_num_threads(args.threads)
    if args.step_cost:
        k = spec.num_speculative_tokens
        costs = step_cost(model_dir, args.dtype, k, [int(b) for b in args.step_cost.split(",")])
        print(f"{'B':>4}{'decode ms':>11}{f'verify k={k} ms':>16}{'break-even len':>16}")
        for B, plain, verify in costs:
            print(f"{B:>4}{plain:>11.1f}{verify:>16.1f}{verify / plain:>16.2f}")
        args.json.write_text(json.dumps({"model": str(model_dir), "k": k, "step_cost": costs}, indent=2))
        return 0
    base, base_out = measure(model_dir, args.dtype, None, requests)
    fast, fast_out = measure(model_dir, args.dtype, spec, requests)
    rows = [base, fast]
    print(format_table(rows))
    identical = base_out == fast_out
    print(f"greedy outputs identical with and without drafts: {'yes' if identical else 'NO'}")
    args.json.write_text(json.dumps({"model": str(model_dir), "rows": [asdict(r) for r in rows],
                                     "speed_up": fast.tokens_per_s / base.tokens_per_s, "identical": identical},
                                    indent=2))
    return 0 if identical else 1
