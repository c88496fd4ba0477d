"""The engine under a cache budget: pooled state slots and paged KV blocks against transformers' generate,
with preemption and recompute forced by a budget far below the offered load, for block sizes 16 and 32;
admission refuses what can never fit; the budget's arithmetic (shared with the capacity planner)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine_run import EngineFactory, Model, random_prompt
from hf_reference import hf_greedy
from nextserve.cluster.app_args import AppArgs
from nextserve.cluster.engine.contract import EngineRequestError, FinishReason
from nextserve.cluster.engine.engine import Engine
from nextserve.cluster.engine.scheduler import SchedulerConfig, StepPlan
from nextserve.model.cache.budget import (GiB, MiB, CacheConfig, CacheConfigError, cache_capacity,
                                          format_memory_size, parse_cache_memory, parse_memory_size)
from nextserve.model.capacity import GpuSpec, plan_capacity
from nextserve.model.checkpoint import Checkpoint
from nextserve.model.config import PUBLISHED_CONFIGS, Qwen3NextConfig
from nextserve.model.loader import load_head
from nextserve.model.sampling import SamplingParams
from nextserve.model.sizes import model_sizes
from nextserve.model.tiny import MTP_FILE
from nextserve.router.local_backend import load_local_backend


def _spy_preempted(engine: Engine) -> list[str]:
    preempted: list[str] = []
    schedule = engine.scheduler.schedule

    def spy() -> StepPlan:
        plan = schedule()
        preempted.extend(seq.request_id for seq in plan.preempted)
        return plan

    engine.scheduler.schedule = spy  # type: ignore[method-assign]
    return preempted


@pytest.mark.parametrize("block_size,blocks", [(16, 12), (32, 6)])
def test_greedy_equals_transformers_across_preemption(block_size: int, blocks: int, reference: dict, small: Model,
                                                      make_engine: EngineFactory) -> None:
    """Six requests wanting ~460 tokens of KV in a cache of 192: mixed prefill/decode steps, prompts
    ending on a block boundary (16, 32, 64) and one spanning many blocks (100), several sequences
    preempted in the middle of their output and recomputed (prompt + output so far, in chunks). Every
    stream equals transformers' greedy tokens, with no token twice."""
    hf_model = reference["small"][0]
    engine = make_engine.cached(small, 4, blocks, block_size, max_tokens_per_step=48, prefill_chunk=16)
    preempted = _spy_preempted(engine)
    lengths, max_tokens = (16, 32, 45, 7, 100, 64), (40, 30, 40, 60, 40, 50)
    prompts = [random_prompt(n, 320, seed=40 + i) for i, n in enumerate(lengths)]
    outs = engine.generate_sync(prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens])
    for prompt, m, out in zip(prompts, max_tokens, outs):
        assert out.token_ids == hf_greedy(hf_model, prompt, m)
        assert out.finish_reason is FinishReason.LENGTH and out.completion_tokens == m
    stats = engine.stats()
    assert len(preempted) >= 2 and stats.num_preemptions == len(preempted)
    assert (stats.blocks_used, stats.slots_used, stats.blocks_total, stats.slots_total) == (0, 0, blocks, 4)


def test_seeded_sampling_continues_its_stream_across_preemption(small: Model, make_engine: EngineFactory) -> None:
    """The sampled sequence is the most recently admitted, so it is the one preempted: recomputed, its
    generator untouched, it samples exactly what it samples alone in a roomy cache."""
    roomy, tight = make_engine.cached(small, 2, 64, 16), make_engine.cached(small, 2, 6, 16, max_tokens_per_step=32, prefill_chunk=16)
    greedy = SamplingParams(max_tokens=50, ignore_eos=True)
    seeded = SamplingParams(max_tokens=30, temperature=0.8, top_k=50, seed=7, ignore_eos=True)
    prompts = [random_prompt(40, 320, seed=1), random_prompt(10, 320, seed=2)]
    preempted = _spy_preempted(tight)
    alone = [roomy.generate_sync([p], params)[0].token_ids for p, params in zip(prompts, (greedy, seeded))]
    both = tight.generate_sync(prompts, [greedy, seeded])
    assert "1" in {i.rsplit("-", 1)[1] for i in preempted}  # the seeded one (index 1) was preempted
    assert [out.token_ids for out in both] == alone


def test_admission_refuses_what_the_cache_can_never_hold(small: Model, make_engine: EngineFactory) -> None:
    engine = make_engine.cached(small, 2, 6, 16)  # 96 tokens of KV per sequence at most
    with pytest.raises(EngineRequestError, match="97 tokens, more than the 96") as info:
        engine.generate_sync([[5] * 97], SamplingParams(max_tokens=1))
    assert info.value.param == "prompt"
    with pytest.raises(EngineRequestError, match="ask for at most 47") as info:
        engine.generate_sync([[5] * 50], SamplingParams(max_tokens=48))
    assert info.value.param == "max_tokens"
    with pytest.raises(EngineRequestError, match="ask for at most 47"):  # clamped to the context, still too much
        engine.generate_sync([[5] * 50], SamplingParams(max_tokens=32000))
    (out,) = engine.generate_sync([[5] * 50], SamplingParams(max_tokens=47, ignore_eos=True))
    assert len(out.token_ids) == 47  # exactly fills the pool: 50 + 47 - 1 = 96 cached tokens
    (out,) = engine.generate_sync([[5] * 90], SamplingParams(max_tokens=None, ignore_eos=True))
    assert len(out.token_ids) == 7 and out.finish_reason is FinishReason.LENGTH  # None: all the room there is


def test_capacity_of_the_published_model_and_the_tiny_one() -> None:
    config = Qwen3NextConfig.from_dict(PUBLISHED_CONFIGS["qwen3-coder-next"])
    sizes = model_sizes(config, torch.bfloat16)
    context = config.max_position_embeddings  # 262,144: 6 GiB of KV for one full sequence
    four = cache_capacity(sizes, CacheConfig(4 * GiB), 64, context)  # the reserve is half the budget
    # 0.2 of it buys 11 snapshots of 77,856,768 B; the rest as before. A block of 16 tokens is 425,984 B (13
    # attention layers: 12 and the MTP layer): (4 GiB - 11 snapshots - 22 slots) // 425,984 = 4051 blocks
    assert (four.num_snapshots, four.num_slots, four.num_blocks, four.max_tokens) == (11, 22, 4051, 64816)
    plain = cache_capacity(sizes, CacheConfig(4 * GiB, enable_prefix_cache=False), 64, context)
    assert (plain.num_snapshots, plain.num_slots, plain.num_blocks, plain.max_tokens) == (0, 27, 5147, 82352)
    forty = cache_capacity(sizes, CacheConfig(40 * GiB, 32), 64, context)  # a full sequence's reserve
    assert forty.num_slots == 64 and forty.max_tokens >= context and forty.total_bytes <= 40 * GiB
    small = cache_capacity(sizes, CacheConfig(128 * MiB), 64, context)  # no room for a snapshot
    assert small.num_snapshots == 0 and small.num_slots == 1 and small.num_blocks == (128 * MiB - 77_856_768) // (16 * 26_624)
    with pytest.raises(CacheConfigError, match="at least 78,282,752 B"):
        cache_capacity(sizes, CacheConfig(64 * MiB), 64, context)
    # blocks no slot could ever fill are not allocated: 4 sequences of 512 tokens
    tiny = cache_capacity(sizes, CacheConfig(40 * GiB), 4, 512)
    assert (tiny.num_slots, tiny.num_blocks, tiny.max_blocks_per_seq) == (4, 4 * 32, 32)


def test_memory_sizes_parse_with_units() -> None:
    assert parse_memory_size("512MiB") == 512 * MiB and parse_memory_size("40GiB") == 40 * GiB
    assert parse_memory_size("1.5G") == 1_500_000_000 and parse_memory_size("4096") == 4096
    with pytest.raises(CacheConfigError, match="512 MB/s"):
        parse_memory_size("512 MB/s")


def test_the_planned_cache_is_the_cache_a_head_allocates(small: Model) -> None:
    """`nextserve plan` gives a head all the memory its weights leave as --cache-memory, the prefix cache's
    snapshots their share of it, and the rest to sequences at full context; a head given that budget (and
    the planned max_num_seqs) allocates the planned blocks, slots and snapshots, and every planned
    sequence fits at full context at once."""
    head, experts = small
    sizes, context = model_sizes(head.config, torch.float32), 200
    per_sequence = sizes.kv_bytes_per_token * 16 * 13 + sizes.deltanet_state_bytes_per_sequence  # 13 blocks
    gpu = GpuSpec("test", sizes.bytes_per_head_replica + 4 * per_sequence, "test")
    plan = plan_capacity(head.config, sizes, gpu, concurrency=8, context_tokens=context, reserve_percent=0)
    snapshots = int(4 * per_sequence * 0.2) // sizes.deltanet_state_bytes_per_sequence
    assert plan.cache_num_snapshots == snapshots >= 1
    seqs = (4 * per_sequence - snapshots * sizes.deltanet_state_bytes_per_sequence) // per_sequence
    assert plan.max_sequences_per_head == seqs == 3 and plan.num_head_replicas == 3
    engine = Engine(head, experts, None, SchedulerConfig(max_num_seqs=plan.max_sequences_per_head), context,
                    CacheConfig(plan.cache_memory_bytes_per_head, plan.cache_block_size))
    try:
        capacity = engine.capacity
        assert (capacity.num_slots, capacity.num_blocks, capacity.num_snapshots) == \
            (plan.cache_num_slots, plan.cache_num_blocks, plan.cache_num_snapshots)
        assert plan.cache_num_slots == 3 and plan.cache_num_blocks * 16 >= 3 * context
        outs = engine.generate_sync([random_prompt(context - 4, 320, seed=s) for s in range(3)],
                                    [SamplingParams(max_tokens=4, ignore_eos=True)] * 3)
        assert [len(o.token_ids) for o in outs] == [4, 4, 4] and engine.scheduler.num_preemptions == 0
    finally:
        engine.shutdown()


def _without_mtp(checkpoint: Path, out: Path) -> Path:
    """`checkpoint` as it was before MTP existed: the same files linked, no `mtp.*` shard, none in the
    index, num_nextn_predict_layers 0."""
    out.mkdir()
    for f in checkpoint.iterdir():
        if f.name not in (MTP_FILE, "model.safetensors.index.json", "config.json"):
            (out / f.name).symlink_to(f)
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("mtp.")}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((checkpoint / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    return out


def test_a_head_holds_the_mtp_pool_only_when_it_drafts_with_it(tiny_dir: Path, tmp_path: Path) -> None:
    """The tiny has an MTP layer (layer 8). A head serving it without MTP speculation (none, or ngram) loads
    it as head.py does, `load_head(mtp=args.head_loads_mtp())`: no MTP layer, no K/V pool for it, and the
    blocks the same budget bought before MTP existed (the checkpoint without `mtp.*`); with method "mtp"
    the pool is there, paid for with fewer blocks (one more attention layer's K/V per token)."""
    assert Checkpoint(tiny_dir).config.mtp_layers == (8,)
    plain = _without_mtp(tiny_dir, tmp_path / "no-mtp")
    assert not Checkpoint(plain).config.has_mtp
    cache, context, seqs = CacheConfig(4 * MiB, enable_prefix_cache=False), 1024, 8
    experts = load_local_backend(tiny_dir)

    def served(model: Path, speculative: str | None) -> tuple[int, list[int], bool]:
        args = AppArgs(model=str(model), speculative_config=speculative)
        head = load_head(model, mtp=args.head_loads_mtp())
        engine = Engine(head, experts, None, SchedulerConfig(max_num_seqs=seqs), context, cache, args.speculative())
        try:
            return engine.capacity.num_blocks, sorted(engine.runner.cache.key), head.mtp is not None
        finally:
            engine.shutdown()

    before = served(plain, None)
    ngram = '{"method": "ngram", "num_speculative_tokens": 2}'
    assert served(tiny_dir, None) == served(tiny_dir, ngram) == before and 8 not in before[1]
    blocks, pools, has_mtp = served(tiny_dir, '{"method": "mtp", "num_speculative_tokens": 2}')
    assert has_mtp and pools == sorted([*before[1], 8])
    assert blocks < before[0] and blocks * 16 * len(pools) <= before[0] * 16 * len(before[1])  # one more layer per block
    print(f"tiny, 4 MiB: {before[0]} blocks without MTP speculation, {blocks} with its pool")


def test_cache_memory_as_a_fraction_needs_a_gpu() -> None:
    assert parse_cache_memory("0.5", device_free_bytes=8 * GiB) == 4 * GiB
    assert parse_cache_memory("2GiB", device_free_bytes=None) == 2 * GiB
    with pytest.raises(CacheConfigError, match="has no GPU; give a size such as 4GiB"):
        parse_cache_memory("0.9", device_free_bytes=None)


@pytest.mark.parametrize("nbytes, text", [(4 * GiB, "4GiB"), (1536 * MiB, "1536MiB"), (3 * 2**40, "3TiB"),
                                          (2048, "2KiB"), (1000, "1000"), (1, "1")])
def test_a_size_is_shown_as_text_that_parses_back_to_it(nbytes: int, text: str) -> None:
    assert format_memory_size(nbytes) == text and parse_memory_size(text) == nbytes
