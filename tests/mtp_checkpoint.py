"""The tiny checkpoint with an MTP layer trained on the tiny model's own greedy outputs, so MTP drafts are
accepted at a measurable rate (the tiny's own MTP layer is random: its drafts are almost never accepted).

    path = ensure_mtp_checkpoint(cache_root())   # built once, cached under cache_root / f"tiny-mtp-{version}"

Recipe (MtpRecipe): greedy continuations (the serving engine, in process) of a few seeded random prompts; the
target's final-norm hidden states h_p of every position; then AdamW on the MTP layer alone (fc, norms,
attention, router, shared and routed experts; embedding and lm_head are the backbone's, frozen) through the
plain dense forward of tests/mtp_reference.py, cross-entropy of lm_head(g_p) against t_{p+2} over the
generated positions. The checkpoint is the tiny with its `mtp.*` shard replaced (bfloat16, like the rest).
The default recipe is the unit test's: its 3 short prompts, 28 generated tokens each, 30 full-batch steps at
a high learning rate (the layer memorises ~85 targets: 7 s of one core, acceptance ~0.88 at K = 2 on those
prompts; 24 prompts x 64 tokens x 120 steps took ~20 minutes on the loaded shared cores).
`python tests/mtp_checkpoint.py --prompts 24 --max-prompt-len 48 --generated 64 --steps 120 --lr 3e-3 1 2 3`
trains a larger one for measurements (its own cache entry).
Training runs on one thread (bit-reproducible); the cache key hashes the recipe and the tiny's version.
`measure(path, k)` decodes unseen prompts one request at a time with and without MTP drafts.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from agent_checkpoint import built_once, cache_root
from engine_run import random_prompt
from mtp_reference import mtp_rows
from nextserve.cluster.engine.engine import Engine
from nextserve.cluster.engine.scheduler import SchedulerConfig
from nextserve.cluster.engine.speculative_config import SpeculativeConfig
from nextserve.model.cache.pools import HybridCache
from nextserve.model.forward_batch import ForwardBatch
from nextserve.model.loader import load_head
from nextserve.model.qwen3_next import HeadModel
from nextserve.model.sampling import SamplingParams
from nextserve.model.tiny import MTP_FILE, TINY_VERSION, ensure_tiny, write_mtp
from nextserve.router.local_backend import LocalExpertBackend, load_local_backend

log = logging.getLogger(__name__)

MTP_REVISION = 3
"""Bump when the recipe changes in a way MtpRecipe's fields do not show."""
SEED = 20261205
MIN_PROMPT_LEN = 4
MARKER = "NEXTSERVE_TINY_MTP"


@dataclass(frozen=True, slots=True)
class MtpRecipe:
    """How the MTP layer is trained; every field is in the cache key."""

    num_prompts: int = 3
    """Training prompts, training_prompts(SEED, num_prompts) (a prefix of a larger recipe's): the test's 3."""
    max_prompt_len: int = 16
    """Prompt lengths are drawn in [MIN_PROMPT_LEN, max_prompt_len]."""
    num_generated: int = 28
    """Greedy tokens generated after each prompt (the test decodes 24 of them, drafting up to 2 past)."""
    learning_rate: float = 1e-2
    num_steps: int = 30
    """Full-batch AdamW steps."""


DEFAULT_RECIPE = MtpRecipe()


def mtp_version(recipe: MtpRecipe = DEFAULT_RECIPE) -> str:
    spec = {"revision": MTP_REVISION, "tiny": TINY_VERSION, "seed": SEED, "min_prompt_len": MIN_PROMPT_LEN,
            **dataclasses.asdict(recipe)}
    return f"{TINY_VERSION}-{hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]}"


def training_prompts(seed: int, count: int, max_len: int = DEFAULT_RECIPE.max_prompt_len) -> list[list[int]]:
    """`count` random prompts of MIN_PROMPT_LEN .. max_len tokens; prompt i depends on (seed, i, max_len)
    only, so fewer are a prefix of more."""
    lengths = [int(torch.randint(MIN_PROMPT_LEN, max_len + 1, (1,),
                                 generator=torch.Generator().manual_seed(seed * 1000 + i))) for i in range(count)]
    return [random_prompt(n, 2048, seed * 1000 + i) for i, n in enumerate(lengths)]


def greedy_outputs(head: HeadModel, experts: LocalExpertBackend, prompts: list[list[int]], n: int) -> list[list[int]]:
    engine = Engine(head, experts, None, SchedulerConfig())
    try:
        outs = engine.generate_sync(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
    finally:
        engine.shutdown()
    return [list(o.token_ids) for o in outs]


@torch.inference_mode()
def target_hidden(head: HeadModel, experts: LocalExpertBackend, seqs: list[list[int]]) -> list[torch.Tensor]:
    """The final-norm hidden states [len(s), H] of every position of each sequence (one prefill each)."""
    out = []
    for s in seqs:
        cache = HybridCache.contiguous(head.config, 1, len(s), 16, torch.float32, torch.device("cpu"))
        _, hidden = head.forward_micro_batches([(torch.tensor(s), ForwardBatch.build([len(s)], [0], [0], cache))],
                                               experts, with_hidden=True)
        out.append(hidden.clone())
    return out


def _train(head: HeadModel, experts: LocalExpertBackend, seqs: list[list[int]], prompt_lens: list[int],
           recipe: MtpRecipe) -> float:
    """AdamW on the MTP layer; returns the last loss."""
    assert head.mtp is not None
    layer = head.config.mtp_layers[0]
    hidden = target_hidden(head, experts, seqs)
    gate_up = torch.nn.Parameter(experts.gate_up[layer].clone())
    down = torch.nn.Parameter(experts.down[layer].clone())
    for p in head.parameters():
        p.requires_grad_(False)
    params = [*head.mtp.parameters(), gate_up, down]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=0.0)
    loss = torch.tensor(0.0)
    # all sequences in one pass: rows p = 0 .. len(s)-2 of each read (t_{p+1}, h_p) and predict t_{p+2}; the
    # loss counts the targets the model generated (p + 2 >= len(prompt))
    next_tokens = torch.tensor([t for s in seqs for t in s[1:]])
    rows = torch.cat([h[:-1] for h in hidden])
    lens = [len(s) - 1 for s in seqs]
    starts = [sum(lens[:i]) for i in range(len(seqs))]
    picked = torch.tensor([start + p for start, s, n in zip(starts, seqs, prompt_lens)
                           for p in range(max(n - 2, 0), len(s) - 2)])
    targets = torch.tensor([s[p + 2] for s, n in zip(seqs, prompt_lens) for p in range(max(n - 2, 0), len(s) - 2)])
    for step in range(recipe.num_steps):
        opt.zero_grad()
        g = mtp_rows(head, gate_up, down, next_tokens, rows, lens)
        loss = F.cross_entropy(head.lm_head(g[picked]), targets)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            log.info("mtp training step %d loss %.4f", step, loss.item())
    experts.gate_up[layer], experts.down[layer] = gate_up.detach(), down.detach()
    return float(loss.detach())


def _mtp_state(head: HeadModel, experts: LocalExpertBackend) -> dict[str, torch.Tensor]:
    """The trained layer in the checkpoint layout (per-expert routed weights), bfloat16."""
    assert head.mtp is not None
    layer = head.config.mtp_layers[0]
    I = head.config.moe_intermediate_size
    out = {f"mtp.{k}": v for k, v in head.mtp.state_dict().items()}
    for e in range(head.config.num_experts):
        out[f"mtp.layers.0.mlp.experts.{e}.gate_proj.weight"] = experts.gate_up[layer][e, :I]
        out[f"mtp.layers.0.mlp.experts.{e}.up_proj.weight"] = experts.gate_up[layer][e, I:]
        out[f"mtp.layers.0.mlp.experts.{e}.down_proj.weight"] = experts.down[layer][e]
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in out.items()}


def _build(tiny: Path, out: Path, recipe: MtpRecipe) -> None:
    start = time.perf_counter()
    shutil.copytree(tiny, out)
    head, experts = load_head(out), load_local_backend(out)
    prompts = training_prompts(SEED, recipe.num_prompts, recipe.max_prompt_len)
    seqs = [p + o for p, o in zip(prompts, greedy_outputs(head, experts, prompts, recipe.num_generated))]
    generated = time.perf_counter()
    loss = _train(head, experts, seqs, [len(p) for p in prompts], recipe)
    (out / MTP_FILE).unlink()
    write_mtp(out, _mtp_state(head, experts))
    log.info("built the MTP checkpoint in %.1f s (%.1f s generating), final loss %.4f",
             time.perf_counter() - start, generated - start, loss)
    (out / MARKER).write_text(f"{mtp_version(recipe)}\n{recipe}\nloss={loss:.4f}\n")


def ensure_mtp_checkpoint(root: Path, recipe: MtpRecipe = DEFAULT_RECIPE, tiny: Path | None = None) -> Path:
    """The trained-MTP tiny under `root / f"tiny-mtp-{mtp_version(recipe)}"`, built on first use from a copy
    of `tiny` (the tiny checkpoint of TINY_VERSION, e.g. the tests' session one; None: `ensure_tiny(root)`,
    the CLI's cached one), so its tokenizer is not trained again."""
    return built_once(Path(root) / f"tiny-mtp-{mtp_version(recipe)}", MARKER,
                      lambda out, work: _build(tiny or ensure_tiny(root), out, recipe))


def measure(path: Path, k: int, num_prompts: int = 6, max_tokens: int = 64, seed: int = 7,
            max_prompt_len: int = DEFAULT_RECIPE.max_prompt_len) -> dict[str, Any]:
    """Prompts decoded greedily one request at a time, without drafts and with MTP drafts (K = k), in one
    process, the two engines taking turns prompt by prompt (so both see the same load on shared cores):
    tokens/s of each, acceptance (accepted / proposed draft tokens), tokens per verify step, and whether
    the outputs are identical. `seed` SEED (and the recipe's max_prompt_len): the prompts the layer was
    trained on."""
    head, experts = load_head(path), load_local_backend(path)
    prompts = training_prompts(seed, num_prompts, max_prompt_len)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    spec = SpeculativeConfig.from_dict({"method": "mtp", "num_speculative_tokens": k})
    engines = {"base": Engine(head, experts, None, SchedulerConfig()),
               "mtp": Engine(head, experts, None, SchedulerConfig(), speculative=spec)}
    elapsed = {name: 0.0 for name in engines}
    outputs: dict[str, list[list[int]]] = {name: [] for name in engines}
    try:
        for engine in engines.values():
            engine.generate_sync(prompts[:1], SamplingParams(max_tokens=4))  # warm up
        for p in prompts:
            for name, engine in engines.items():
                t0 = time.perf_counter()
                outputs[name].append(list(engine.generate_sync([p], params)[0].token_ids))
                elapsed[name] += time.perf_counter() - t0
        stats = engines["mtp"].stats()
    finally:
        for engine in engines.values():
            engine.shutdown()
    base_tok_s = sum(map(len, outputs["base"])) / elapsed["base"]
    mtp_tok_s = sum(map(len, outputs["mtp"])) / elapsed["mtp"]
    return {"k": k, "prompts": num_prompts, "max_tokens": max_tokens, "base_tok_s": round(base_tok_s, 2),
            "mtp_tok_s": round(mtp_tok_s, 2), "speedup": round(mtp_tok_s / base_tok_s, 3),
            "draft_tokens": stats.spec_decode_num_draft_tokens, "accepted_tokens": stats.spec_decode_num_accepted_tokens,
            "acceptance": round(stats.spec_decode_num_accepted_tokens / max(stats.spec_decode_num_draft_tokens, 1), 3),
            "accepted_per_pos": list(stats.spec_decode_num_accepted_tokens_per_pos),
            "tokens_per_verify": round(1 + stats.spec_decode_num_accepted_tokens / max(stats.spec_decode_num_drafts, 1), 3),
            "identical": outputs["base"] == outputs["mtp"]}


def main() -> None:
    """python tests/mtp_checkpoint.py [--prompts N --max-prompt-len N --generated N --steps N --lr X] [K ...]:
    build (cached) and measure on (up to 6 of) the training prompts at each K, then on unseen prompts at K = 2."""
    default = DEFAULT_RECIPE
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("k", nargs="*", type=int, default=[1, 2, 3], help="draft lengths to measure")
    parser.add_argument("--prompts", type=int, default=default.num_prompts)
    parser.add_argument("--max-prompt-len", type=int, default=default.max_prompt_len)
    parser.add_argument("--generated", type=int, default=default.num_generated)
    parser.add_argument("--steps", type=int, default=default.num_steps)
    parser.add_argument("--lr", type=float, default=default.learning_rate)
    args = parser.parse_args()
    recipe = MtpRecipe(args.prompts, args.max_prompt_len, args.generated, args.lr, args.steps)
    logging.basicConfig(level=logging.INFO)
    ckpt = ensure_mtp_checkpoint(cache_root(), recipe)
    for k in args.k:
        print(json.dumps({"trained_prompts": True, **measure(
            ckpt, k, min(6, recipe.num_prompts), recipe.num_generated, SEED, recipe.max_prompt_len)}), flush=True)
    print(json.dumps({"trained_prompts": False, **measure(ckpt, 2, max_tokens=recipe.num_generated,
                                                         max_prompt_len=recipe.max_prompt_len)}), flush=True)


if __name__ == "__main__":
    main()
