"""`nextserve bench gpu`: the published Qwen3-Coder-Next layer shapes, a few layers at random weights,
on one device: a check against the CPU float32 reference, then decode throughput per device.

Flow: PUBLISHED_CONFIGS["qwen3-coder-next"] cut to `--layers` layers -> seeded random weights, made
once in float32 -> a bench copy (`--dtype` on `--device`) and a reference (float32, CPU) -> check: one
small batch (prefill + greedy decode, the bench fed the reference's tokens) on both -> per batch size
B: prefill B prompts, then time decode steps of the head part (experts return zeros), the expert
part (LocalExpertBackend.forward of each MoE layer on the step's own hidden states and routing) and
the whole step. Exit status 1 when the check fails (the timings still run and are written).

    nextserve bench gpu [--layers 4] [--batches 1,64,256] [--json-out FILE]      # one GPU, bfloat16
    nextserve bench gpu --device cpu --dtype float32 --tiny-shapes --batches 1,4  # anywhere

Letters: B = sequences, L = prompt tokens, H = hidden, V = vocab, k = experts per token,
E = routed experts per layer, I = moe intermediate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from nextserve.bench.head_batch import HeadBatch
from nextserve.model.checkpoint import parse_dtype
from nextserve.model.config import PUBLISHED_CONFIGS, ConfigError, Qwen3NextConfig
from nextserve.model.device import resolve_device
from nextserve.model.expert_backend import ExpertBackend
from nextserve.router.local_backend import LocalExpertBackend, ZeroExperts
from nextserve.model.layers.rope import PartialRotaryEmbedding
from nextserve.model.qwen3_next import HeadModel
from nextserve.model.tiny import TINY_CONFIG

CHECK_BATCH, CHECK_PROMPT_LEN, CHECK_STEPS = 4, 16, 4
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 0.15}
"""Relative L2 error of the logits allowed against the CPU float32 reference. float32: cuDNN may run
the conv in TF32 (~1e-3). bfloat16 on the CPU measured 0.032 (H 2048, 64 experts) to 0.044 (tiny
shapes); unrelated logits give ~1.4."""
MIN_TOKEN_AGREEMENT = 0.5
"""Near-ties among random-weight logits let a few greedy tokens differ (bf16 on the CPU: 85-100 %
agree); a broken device path agrees on almost none."""


@dataclass(frozen=True)
class Models:
    head: HeadModel
    experts: LocalExpertBackend
    device: torch.device


@dataclass(frozen=True)
class Check:
    max_abs_diff: float
    max_abs_ref: float
    rel_l2: float
    tolerance: float
    token_agreement: float
    passed: bool


@dataclass(frozen=True)
class BatchRow:
    batch: int
    head_ms: float      # per decode step, all layers
    experts_ms: float
    step_ms: float
    head_tok_s: float
    experts_tok_s: float
    step_tok_s: float
    peak_mem_gib: float | None  # CUDA only


class CapturingExperts:
    """The local backend, keeping each layer's last (hidden [T, H], ids [T, k], weights [T, k])."""

    def __init__(self, inner: LocalExpertBackend) -> None:
        self.inner, self.last = inner, dict[int, tuple[Tensor, Tensor, Tensor]]()

    def submit(self, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor) -> "Future[Tensor]":
        self.last[layer] = (hidden, ids, weights)
        return self.inner.submit(layer, hidden, ids, weights)


def bench_config(layers: int, tiny_shapes: bool) -> Qwen3NextConfig:
    """The published shapes (or the tiny model's, for CPU tests) with `layers` layers."""
    raw = {**PUBLISHED_CONFIGS["qwen3-coder-next"], **(TINY_CONFIG if tiny_shapes else {})}
    return Qwen3NextConfig.from_dict({**raw, "num_hidden_layers": layers})


def _fill(name: str, p: Tensor, gen: torch.Generator, config: Qwen3NextConfig) -> None:
    """Random values with a trained model's spread (model/tiny.py's rules, widths scaled)."""
    if name.endswith("linear_attn.norm.weight"):  # the gated norm: a plain weight around 1
        p.normal_(1.0, 0.1, generator=gen)
    elif name.endswith("norm.weight"):  # zero-centred norms store an offset around 0
        p.normal_(0.0, 0.1, generator=gen)
    elif name.endswith("A_log"):
        p.uniform_(0.5, 8.0, generator=gen).log_()
    elif name.endswith("dt_bias"):
        p.normal_(1.0, 0.3, generator=gen)
    elif name.endswith("conv1d.weight"):
        p.normal_(0.0, config.linear_conv_kernel_dim ** -0.5, generator=gen)
    elif name.endswith("mlp.gate.weight"):  # router logits of std ~3: peaked, not one-hot
        p.normal_(0.0, 3.0 * config.hidden_size ** -0.5, generator=gen)
    else:  # transformers' init: normal(0, initializer_range = 0.02)
        p.normal_(0.0, 0.02, generator=gen)


def _head_on(state: dict[str, Tensor], config: Qwen3NextConfig, device: torch.device) -> HeadModel:
    with torch.device("meta"):
        head = HeadModel(config)
    head.load_state_dict(state, strict=True, assign=True)
    head.rotary = PartialRotaryEmbedding(config.rotary_dim, config.rope_theta).to(device)  # fp32 table
    return head.eval()


def build_models(config: Qwen3NextConfig, device: torch.device, dtype: torch.dtype,
                 seed: int) -> tuple[Models, Models]:
    """(bench: `dtype` on `device`, reference: float32 on the CPU), from the same float32 values."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        shapes = HeadModel(config).state_dict()
    state = {}
    for name, t in shapes.items():
        state[name] = torch.empty(t.shape, device=device)
        _fill(name, state[name], gen, config)
    # copy=True: on a CPU float32 run the reference must not share the bench model's tensors.
    ref_head = _head_on({k: v.to("cpu", copy=True) for k, v in state.items()}, config, torch.device("cpu"))
    head = _head_on({k: v.to(dtype) for k, v in state.items()}, config, device)
    del state
    E, I, H = config.num_experts, config.moe_intermediate_size, config.hidden_size
    gate_up, down, ref_gate_up, ref_down = {}, {}, {}, {}
    for layer in config.moe_layers:
        gu = torch.empty(E, 2 * I, H, device=device).normal_(0.0, 0.02, generator=gen)  # [E, 2I, H]
        dn = torch.empty(E, H, I, device=device).normal_(0.0, 0.02, generator=gen)      # [E, H, I]
        ref_gate_up[layer], ref_down[layer] = gu.to("cpu", copy=True), dn.to("cpu", copy=True)
        gate_up[layer], down[layer] = gu.to(dtype), dn.to(dtype)
        del gu, dn
    return (Models(head, LocalExpertBackend(gate_up, down), device),
            Models(ref_head, LocalExpertBackend(ref_gate_up, ref_down), torch.device("cpu")))


def _greedy(m: Models, prompts: Tensor, fed: list[Tensor] | None) -> tuple[list[Tensor], list[Tensor]]:
    """prompts [B, L] -> (logits [B, V] float32 CPU per step, tokens [B] fed at each decode step):
    the model's own greedy tokens, or `fed`."""
    batch = HeadBatch(m.head, prompts.shape[0], m.device, max_new_tokens=CHECK_STEPS)
    logits = batch.prefill(prompts, m.experts).float().cpu()
    all_logits, tokens = [logits], []
    for t in range(CHECK_STEPS):
        tokens.append(logits.argmax(-1) if fed is None else fed[t])
        logits = batch.decode(tokens[-1], m.experts).float().cpu()
        all_logits.append(logits)
    return all_logits, tokens


def check(bench: Models, ref: Models, dtype: torch.dtype, tolerance: float | None, seed: int) -> Check:
    vocab = ref.head.config.vocab_size
    prompts = torch.randint(3, vocab, (CHECK_BATCH, CHECK_PROMPT_LEN), generator=torch.Generator().manual_seed(seed))
    ref_logits, tokens = _greedy(ref, prompts, None)
    got_logits, _ = _greedy(bench, prompts, tokens)
    ref_all, got_all = torch.stack(ref_logits), torch.stack(got_logits)  # [steps + 1, B, V]
    diff = got_all - ref_all
    rel_l2 = float(diff.norm() / ref_all.norm())
    agreement = float((got_all.argmax(-1) == ref_all.argmax(-1)).float().mean())
    tol = TOLERANCE[dtype] if tolerance is None else tolerance
    return Check(float(diff.abs().max()), float(ref_all.abs().max()), rel_l2, tol, agreement,
                 rel_l2 <= tol and agreement >= MIN_TOKEN_AGREEMENT)


def _seconds_per_call(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda _: None
    fn()  # warm-up: kernel selection, allocator growth
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)  # CUDA runs asynchronously: the time counts only once the queued kernels finished
    return (time.perf_counter() - start) / calls


def time_batch(m: Models, B: int, prompt_len: int, steps: int, seed: int) -> BatchRow:
    """Prefill B prompts of prompt_len tokens, then time `steps` decode steps of each part."""
    config, device = m.head.config, m.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator().manual_seed(seed + B)
    batch = HeadBatch(m.head, B, device, max_new_tokens=2 * (steps + 1))  # two timed parts decode, each warmed up
    batch.prefill(torch.randint(3, config.vocab_size, (B, prompt_len), generator=gen), m.experts)
    ids = torch.randint(3, config.vocab_size, (B,), generator=gen).to(device)  # [B]
    capture = CapturingExperts(m.experts)

    def decode(experts: ExpertBackend) -> Tensor:  # one step for all B sequences -> logits [B, V]
        return batch.decode(ids, experts)

    step_s = _seconds_per_call(lambda: decode(capture), steps, device)
    head_s = _seconds_per_call(lambda: decode(ZeroExperts()), steps, device)
    experts_s = _seconds_per_call(
        lambda: [m.experts.forward(layer, *capture.last[layer]) for layer in config.moe_layers], steps, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return BatchRow(B, head_s * 1e3, experts_s * 1e3, step_s * 1e3, B / head_s, B / experts_s, B / step_s, peak)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]  # argparse reports a ValueError as an invalid value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gpu", help="published layer shapes at random weights on one GPU: check vs CPU, decode tok/s")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (3:1 DeltaNet:attention), default 4")
    p.add_argument("--batches", type=_int_list, default=[1, 64, 256], help="decode batch sizes, e.g. 1,64,256")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens prefilled per sequence")
    p.add_argument("--steps", type=int, default=20, help="decode steps timed per part and batch size")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--tiny-shapes", action="store_true", help="the tiny model's widths (CPU tests)")
    p.add_argument("--tolerance", type=float, help="relative L2 error allowed (default by dtype)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", help="also write the result as JSON to this file")


def format_table(result: dict[str, object]) -> str:
    c = result["check"]
    assert isinstance(c, dict)
    lines = [f"{result['card']}  {result['dtype']}  {result['layers']} layers  {result['shapes']} shapes",
             f"check vs CPU float32: max|Δ| {c['max_abs_diff']:.3g} (max|ref| {c['max_abs_ref']:.3g}), "
             f"rel L2 {c['rel_l2']:.3g} (tol {c['tolerance']:.3g}), greedy agree "
             f"{c['token_agreement']:.0%}: {'PASS' if c['passed'] else 'FAIL'}",
             f"{'B':>5}{'head ms':>10}{'experts ms':>12}{'step ms':>10}{'head tok/s':>12}"
             f"{'experts tok/s':>15}{'step tok/s':>12}{'peak GiB':>10}"]
    for r in result["rows"]:  # type: ignore[attr-defined]
        peak = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        lines.append(f"{r['batch']:>5}{r['head_ms']:>10.2f}{r['experts_ms']:>12.2f}{r['step_ms']:>10.2f}"
                     f"{r['head_tok_s']:>12.1f}{r['experts_tok_s']:>15.1f}{r['step_tok_s']:>12.1f}{peak:>10}")
    return "\n".join(lines)


@torch.inference_mode()
def run(args: argparse.Namespace) -> int:
    device, dtype = resolve_device(args.device), parse_dtype(args.dtype)
    if args.layers < 1 or min(args.batches) < 1:
        raise ConfigError(f"--layers {args.layers} and --batches {args.batches} must be >= 1")
    config = bench_config(args.layers, args.tiny_shapes)
    bar = tqdm(total=2 + len(args.batches), desc="bench gpu: random weights", file=sys.stderr)
    bench, ref = build_models(config, device, dtype, args.seed)
    bar.set_description("bench gpu: check vs CPU float32")
    bar.update()
    result_check = check(bench, ref, dtype, args.tolerance, args.seed)
    del ref
    rows = []
    for B in args.batches:
        bar.set_description(f"bench gpu: decode B={B}")
        bar.update()
        rows.append(time_batch(bench, B, args.prompt_len, args.steps, args.seed))
    bar.update()
    bar.close()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    result: dict[str, object] = {
        "date": datetime.date.today().isoformat(), "card": card, "device": str(device), "dtype": args.dtype,
        "torch": torch.__version__, "shapes": "tiny" if args.tiny_shapes else "qwen3-coder-next",
        "layers": args.layers, "layer_types": [t.value for t in config.layer_types],
        "prompt_len": args.prompt_len, "steps": args.steps,
        "check": asdict(result_check), "rows": [asdict(r) for r in rows]}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    return 0 if result_check.passed else 1
