"""`nextserve bench grammar`: what grammar-constrained decoding costs per output token.

    the engine in this process (its thread, scheduler, streams) on --model, --batch requests at once:
      unconstrained:  greedy, ignore_eos, --max-tokens tokens each                    -> TPOT per request
      constrained:    the same prompts and budget, each under a JSON schema grammar   -> TPOT per request
                      (a record of RECORD_FIELDS bounded fields: a long, branching structure)
    alternated --rounds times in the same run (drift hits both); ratio = constrained / unconstrained TPOT p50
    over all rounds, and the median of each round's own ratio (adjacent phases: steadier on a loaded host)

TPOT of a request = (time of its last output - time of its first) / (tokens - 1): decode steps only
(the first token's prefill and the grammar's compilation, cached after the first round, are not in it).
Prints a table and writes --json. Goal (issue 24, reported, not asserted): ratio <= 1.1.

    nextserve bench grammar [--model DIR|tiny] [--batch 8] [--max-tokens 96] [--rounds 2] [--json grammar.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from nextserve.cluster.engine.contract import EngineRequest, Grammar, GrammarKind, SamplingParams
from nextserve.cluster.engine.engine import Engine
from nextserve.cluster.engine.scheduler import SchedulerConfig
from nextserve.model.loader import load_head
from nextserve.router.local_backend import load_local_backend

RECORD_FIELDS = 24
"""Fields of the benchmark's schema: integers, enums, short strings and booleans in turn, all required."""


def record_schema(num_fields: int = RECORD_FIELDS) -> dict[str, object]:
    kinds: list[dict[str, object]] = [{"type": "integer", "minimum": 0, "maximum": 9999},
                                      {"enum": ["alpha", "beta", "gamma", "delta"]},
                                      {"type": "string", "maxLength": 8}, {"type": "boolean"}]
    properties = {f"field_{i}": kinds[i % len(kinds)] for i in range(num_fields)}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


@dataclass(frozen=True)
class GrammarBenchResult:
    date: str
    model: str
    batch: int
    max_tokens: int
    rounds: int
    free_tpot_ms_p50: float
    constrained_tpot_ms_p50: float
    ratio: float
    """constrained / free TPOT p50."""
    round_ratios: list[float]
    """Each round's constrained / free TPOT p50."""
    round_ratio_median: float
    constrained_tokens_mean: float
    """Tokens a constrained request produced on average (the grammar may end it before max_tokens)."""
    cpu_threads: int


async def _timed(engine: Engine, request: EngineRequest) -> tuple[float, int]:
    """(TPOT in ms, tokens) of one request."""
    first = last = 0.0
    tokens = 0
    async for out in engine.generate(request):
        now = time.perf_counter()
        if not tokens:
            first = now
        tokens += len(out.token_ids)
        last = now
    return (last - first) * 1000 / max(tokens - 1, 1), tokens


def _phase(engine: Engine, prompts: list[list[int]], params: SamplingParams, grammar: Grammar | None,
           tag: str) -> list[tuple[float, int]]:
    async def all_() -> list[tuple[float, int]]:
        return list(await asyncio.gather(*(_timed(engine, EngineRequest(f"{tag}-{i}", tuple(p), params,
                                                                        grammar=grammar))
                                           for i, p in enumerate(prompts))))
    return asyncio.run(all_())


def run(args: argparse.Namespace, model_dir: Path) -> int:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(load_head(model_dir), load_local_backend(model_dir), tokenizer,
                    SchedulerConfig(max_num_seqs=max(args.batch, 1)), max_model_len=2048)
    try:
        prompts = [tokenizer.encode(f"Record {i}: describe the item as JSON with every field.",
                                    add_special_tokens=False) for i in range(args.batch)]
        grammar = Grammar(GrammarKind.JSON_SCHEMA, json.dumps(record_schema()))
        free_params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        constrained_params = SamplingParams(max_tokens=args.max_tokens)
        _phase(engine, prompts[:1], SamplingParams(max_tokens=4), grammar, "warmup")  # compiles, warms up
        free: list[tuple[float, int]] = []
        constrained: list[tuple[float, int]] = []
        round_ratios = []
        for r in range(args.rounds):
            free_round = _phase(engine, prompts, free_params, None, f"free{r}")
            constrained_round = _phase(engine, prompts, constrained_params, grammar, f"grammar{r}")
            round_ratios.append(round(statistics.median(t for t, _ in constrained_round)
                                      / statistics.median(t for t, _ in free_round), 3))
            free += free_round
            constrained += constrained_round
    finally:
        engine.shutdown()
    free_p50 = statistics.median(t for t, _ in free)
    constrained_p50 = statistics.median(t for t, _ in constrained)
    result = GrammarBenchResult(datetime.date.today().isoformat(), str(model_dir), args.batch, args.max_tokens,
                                args.rounds, round(free_p50, 2), round(constrained_p50, 2),
                                round(constrained_p50 / free_p50, 3), round_ratios,
                                round(statistics.median(round_ratios), 3),
                                round(statistics.fmean(n for _, n in constrained), 1), torch.get_num_threads())
    print(f"{'decoding':<14}{'TPOT p50 ms':>12}{'tokens/req':>12}")
    print(f"{'free':<14}{result.free_tpot_ms_p50:>12.2f}{statistics.fmean(n for _, n in free):>12.1f}")
    print(f"{'json_schema':<14}{result.constrained_tpot_ms_p50:>12.2f}{result.constrained_tokens_mean:>12.1f}")
    print(f"ratio {result.ratio:.3f} (goal <= 1.1); per round {round_ratios}, median {result.round_ratio_median:.3f}; "
          f"batch {args.batch}, {torch.get_num_threads()} torch threads")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grammar", help="TPOT of JSON-schema-constrained vs free decoding in one run")
    p.add_argument("--model", default="tiny", help="checkpoint directory, or 'tiny'")
    p.add_argument("--batch", type=int, default=8, help="requests decoded at once")
    p.add_argument("--max-tokens", type=int, default=96, help="output tokens per request at most")
    p.add_argument("--rounds", type=int, default=2, help="free / constrained phases, alternated")
    p.add_argument("--json", default="grammar.json", help="where to write the result ('' for nowhere)")
