"""`nextserve bench model`: prefill and decode tokens/s of the one-process model next to
transformers' own Qwen3NextForCausalLM, on the same checkpoint and workload, in the same run.

Workload: `batch` prompts of `prompt_len` random token ids (seeded), then `decode_tokens` greedy
decode steps for the whole batch. Prefill: one batched forward over all prompts (transformers: one
[B, L] forward with a cache). Decode: one batched step per token (transformers: [B, 1] forwards
reusing its cache). Each side runs `repeats` times; the best time counts (least disturbed by noise).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from nextserve.bench.head_batch import HeadBatch
from nextserve.bench.prompt_ids import checkpoint_prompt_token_ids, random_prompts
from nextserve.model.checkpoint import parse_dtype
from nextserve.model.loader import load_head
from nextserve.router.local_backend import load_local_backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelBenchResult:
    batch: int
    prompt_len: int
    decode_tokens: int
    dtype: str
    prefill_tok_s: float
    decode_tok_s: float
    hf_prefill_tok_s: float
    hf_decode_tok_s: float
    prefill_ratio: float
    decode_ratio: float


def _time_ours(path: Path, dtype: torch.dtype, prompts: torch.Tensor, steps: int) -> tuple[float, float]:
    head, experts = load_head(path, dtype), load_local_backend(path, dtype)
    batch = HeadBatch(head, prompts.shape[0], torch.device("cpu"), max_new_tokens=steps)
    t0 = time.perf_counter()
    logits = batch.prefill(prompts, experts)
    t1 = time.perf_counter()
    for _ in range(steps):
        logits = batch.decode(logits.argmax(-1), experts)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


@torch.inference_mode()
def _time_hf(path: Path, dtype: torch.dtype, prompts: torch.Tensor, steps: int) -> tuple[float, float]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    out = model(prompts, cache=cache, use_cache=True)
    t1 = time.perf_counter()
    for _ in range(steps):
        ids = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(ids, cache=out.past_key_values, use_cache=True)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def run_model_bench(path: Path, batch: int, prompt_len: int, decode_tokens: int, dtype: str,
                    repeats: int, seed: int) -> ModelBenchResult:
    torch_dtype = parse_dtype(dtype)
    prompts = random_prompts(checkpoint_prompt_token_ids(path), (batch, prompt_len), seed)
    ours = [_time_ours(path, torch_dtype, prompts, decode_tokens) for _ in range(repeats)]
    hf = [_time_hf(path, torch_dtype, prompts, decode_tokens) for _ in range(repeats)]
    pre, dec = min(t[0] for t in ours), min(t[1] for t in ours)
    hpre, hdec = min(t[0] for t in hf), min(t[1] for t in hf)
    n_pre, n_dec = batch * prompt_len, batch * decode_tokens
    return ModelBenchResult(batch, prompt_len, decode_tokens, dtype, n_pre / pre, n_dec / dec,
                            n_pre / hpre, n_dec / hdec, hpre / pre, hdec / dec)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="prefill/decode tokens/s of the one-process model vs transformers")
    p.add_argument("--model", default="tiny", help="checkpoint dir, or 'tiny'")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--out", type=Path, help="also write the JSON result to this file")


def format_table(r: ModelBenchResult) -> str:
    rows = [("prefill tok/s", r.prefill_tok_s, r.hf_prefill_tok_s, r.prefill_ratio),
            ("decode tok/s", r.decode_tok_s, r.hf_decode_tok_s, r.decode_ratio)]
    lines = [f"batch={r.batch} prompt_len={r.prompt_len} decode_tokens={r.decode_tokens} dtype={r.dtype}",
             f"{'':<16}{'nextserve':>12}{'transformers':>14}{'ratio':>8}"]
    lines += [f"{name:<16}{a:>12.1f}{b:>14.1f}{c:>8.2f}" for name, a, b, c in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace, model_dir: Path) -> int:
    result = run_model_bench(model_dir, args.batch, args.prompt_len, args.decode_tokens, args.dtype,
                             args.repeats, args.seed)
    line = json.dumps(asdict(result))
    if args.out:
        args.out.write_text(line + "\n")
    print(line if args.json else format_table(result))
    return 0
