"""`nextserve bench fairness`: does one tenant's flood starve another tenant's short request?

    tenant B alone:          --probes sequential short completions               -> latency p50 (idle)
    tenant A floods:         --flood completions kept in flight, back to back
        and meanwhile B:     --probes sequential short completions               -> latency p50 (flooded)
    ratio = flooded p50 / idle p50  (the gateway's fair admission aims for a small constant; FIFO admission
                                     makes B wait behind A's whole queue)

A and B are the first two tenants of the server's keys file (--api-keys-file: the same file `nextserve up
--api-keys-file` was given; the benchmark reads one key of each). Prompts are seeded token ids, distinct
per request (so no prefix cache hit helps either phase); greedy, `ignore_eos`, so every request produces
exactly its max_tokens. Latency is end-to-end (non-streaming). Prints a table and writes --json.
Exit status 1 when a request failed or the ratio exceeds --max-ratio, 2 for a bad command line.

    nextserve up --model tiny --api-keys-file keys --max-num-seqs 4
    nextserve bench fairness --url http://127.0.0.1:8000 --api-keys-file keys --json fairness.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from nextserve.bench.serve_bench import percentile
from nextserve.cluster.gateway.tenants import ApiKeysFileError, load_api_keys
from nextserve.model.config import ConfigError

PROMPT_TOKEN_RANGE = (5, 300)
"""Prompt ids are drawn from here: regular tokens of every checkpoint, the tiny one's included."""
REQUEST_TIMEOUT_S = 600.0


class FairnessBenchError(ConfigError):
    """A command line or keys file the benchmark cannot use; the message says how to fix it."""


@dataclass(frozen=True)
class FairnessResult:
    tenant_a: str
    tenant_b: str
    flood: int
    """A's requests kept in flight."""
    probes: int
    idle_ms_p50: float
    idle_ms_max: float
    flooded_ms_p50: float
    flooded_ms_max: float
    ratio: float
    """flooded_ms_p50 / idle_ms_p50."""
    flood_requests_done: int
    """A's requests that finished while B probed."""
    errors: int


class Client:
    def __init__(self, url: str, model_name: str, seed: int) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S)
        self.model_name, self.rng = model_name, random.Random(seed)
        self.errors: list[str] = []

    async def complete(self, key: str, prompt_len: int, max_tokens: int) -> float | None:
        """One completion's latency in seconds; None (and an error kept) when it failed."""
        prompt = [self.rng.randrange(*PROMPT_TOKEN_RANGE) for _ in range(prompt_len)]
        body = {"model": self.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}
        start = time.perf_counter()
        try:
            r = await self.http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        except httpx.HTTPError as e:
            self.errors.append(f"{type(e).__name__}: {e}")
            return None
        if r.status_code != 200:
            self.errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
            return None
        return time.perf_counter() - start


async def _probe(client: Client, key: str, args: argparse.Namespace) -> list[float]:
    latencies = []
    for _ in range(args.probes):
        latency = await client.complete(key, args.probe_prompt_len, args.probe_max_tokens)
        if latency is not None:
            latencies.append(latency)
    return latencies


async def measure(args: argparse.Namespace, key_a: str, key_b: str) -> tuple[list[float], list[float], int, list[str]]:
    """(B's latencies idle, B's latencies under A's flood, A's requests done meanwhile, errors)."""
    client = Client(args.url, args.model_name, args.seed)
    await client.complete(key_b, args.probe_prompt_len, args.probe_max_tokens)  # warm-up
    idle = await _probe(client, key_b, args)
    done, stop = 0, asyncio.Event()

    async def flood_lane() -> None:
        nonlocal done
        while not stop.is_set():
            if await client.complete(key_a, args.flood_prompt_len, args.flood_max_tokens) is not None:
                done += 1

    lanes = [asyncio.create_task(flood_lane()) for _ in range(args.flood)]
    await asyncio.sleep(args.flood_warmup_s)  # A's queue fills before B probes
    done_before = done
    flooded = await _probe(client, key_b, args)
    done_during = done - done_before
    stop.set()
    for lane in lanes:
        lane.cancel()
    await asyncio.gather(*lanes, return_exceptions=True)
    await client.http.aclose()
    return idle, flooded, done_during, client.errors


def _tenants(path: str) -> tuple[str, str, str, str]:
    """(tenant A, a key of A, tenant B, a key of B): the keys file's first two tenants."""
    try:
        keys = load_api_keys(path)
    except ApiKeysFileError as e:
        raise FairnessBenchError(str(e)) from None
    first_key: dict[str, str] = {}
    for key, tenant in keys.items():
        first_key.setdefault(tenant.name, key)
    if len(first_key) < 2:
        raise FairnessBenchError(f"{path} has {len(first_key)} tenant(s); the benchmark needs two (A floods, B probes)")
    (a, key_a), (b, key_b) = list(first_key.items())[:2]
    return a, key_a, b, key_b


def run(args: argparse.Namespace) -> int:
    a, key_a, b, key_b = _tenants(args.api_keys_file)
    idle, flooded, done, errors = asyncio.run(measure(args, key_a, key_b))
    if not idle or not flooded:
        print(f"no probe succeeded ({len(errors)} errors; first: {errors[:1]})", file=sys.stderr)
        return 1
    idle_p50, flooded_p50 = percentile(idle, 50) * 1e3, percentile(flooded, 50) * 1e3
    result = FairnessResult(a, b, args.flood, args.probes, idle_p50, max(idle) * 1e3, flooded_p50,
                            max(flooded) * 1e3, flooded_p50 / idle_p50, done, len(errors))
    print(f"tenant B ({b}) short requests ({args.probe_prompt_len} in, {args.probe_max_tokens} out), "
          f"tenant A ({a}) keeping {args.flood} in flight ({args.flood_prompt_len} in, {args.flood_max_tokens} out)")
    print(f"{'phase':<10} {'probes':>6} {'p50 ms':>9} {'max ms':>9}")
    print(f"{'idle':<10} {len(idle):>6} {result.idle_ms_p50:>9.1f} {result.idle_ms_max:>9.1f}")
    print(f"{'flooded':<10} {len(flooded):>6} {result.flooded_ms_p50:>9.1f} {result.flooded_ms_max:>9.1f}")
    print(f"ratio (flooded p50 / idle p50): {result.ratio:.2f}; A finished {done} requests meanwhile; "
          f"errors: {len(errors)}")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2) + "\n")
    for error in errors[:5]:
        print(f"error: {error}", file=sys.stderr)
    is_over = args.max_ratio is not None and result.ratio > args.max_ratio
    return 1 if errors or is_over else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fairness", help="tenant B's latency idle vs while tenant A floods the server",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model-name", default="tiny", help="the served model name (`model` of each request)")
    p.add_argument("--api-keys-file", required=True, help="the server's keys file: A and B are its first two tenants")
    p.add_argument("--flood", type=int, default=24, help="A's requests kept in flight")
    p.add_argument("--flood-prompt-len", type=int, default=32)
    p.add_argument("--flood-max-tokens", type=int, default=64)
    p.add_argument("--probes", type=int, default=8, help="B's sequential requests per phase")
    p.add_argument("--probe-prompt-len", type=int, default=16)
    p.add_argument("--probe-max-tokens", type=int, default=8)
    p.add_argument("--flood-warmup-s", type=float, default=3.0, help="how long A floods before B probes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-ratio", type=float, default=None, help="exit 1 when the ratio is above this")
    p.add_argument("--json", default="fairness.json", help="where to write the result ('' for nowhere)")
    p.set_defaults(func=run)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="fairness_bench")
    add_parser(parser.add_subparsers(dest="bench", required=True))
    sys.exit(run(parser.parse_args(["fairness", *sys.argv[1:]])))
