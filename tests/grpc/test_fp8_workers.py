"""Expert workers on ports serving a fine-grained FP8 checkpoint: they hold the routed experts in FP8 +
block scales (about half the bytes of the dequantized bf16 experts) and the head over them gives
transformers' greedy tokens on the dequantized twin, for concurrent sequences (one engine batch).

This is the FP8 checkpoint's serving check at the tier below the cluster: the cluster modules' shared
bring-ups serve the tiny checkpoint, whose reference (tiny_hf) other tests read, so their model is not
swapped; `nextserve up` runs the same ExpertStore and head loader."""

from __future__ import annotations

import torch

from engine_run import engine_tokens, random_prompt
from nextserve.experts.server import BackgroundWorkers
from nextserve.model.config import Qwen3NextConfig
from nextserve.model.loader import load_head
from nextserve.model.sampling import SamplingParams
from nextserve.router.dispatcher import RemoteExpertBackend
from nextserve.router.placement import build_placement

TOKEN = "test-admin-token"


@torch.inference_mode()
def test_fp8_workers_hold_fp8_and_serve_transformers_greedy_on_the_twin(fp8_reference: dict) -> None:
    model, fp8, twin = fp8_reference["awkward"]  # ragged 16 x 32 blocks, 13 experts, a dense layer
    config = Qwen3NextConfig.from_json(fp8)
    placement = build_placement(config.moe_layers, config.num_experts, 2, 1)
    workers = BackgroundWorkers(admin_token=TOKEN)
    try:
        started = [workers.start(fp8, placement.experts_of(w)) for w in range(2)]
        dense = [workers.start(twin, placement.experts_of(w)) for w in range(2)]
        held = [w.store.weight_bytes() for w in started]
        dense_bf16 = [w.store.weight_bytes() // 2 for w in dense]  # float32 twin -> its bf16 bytes
        print(f"expert weight bytes per worker: FP8 + scales {held}, bf16 {dense_bf16}, fp32 "
              f"{[w.store.weight_bytes() for w in dense]}")
        assert all(h <= 0.6 * d for h, d in zip(held, dense_bf16))  # 16 x 32 blocks: scales are 1/128 of a byte each
        prompts = [random_prompt(n, 300, seed=n) for n in (5, 17, 30, 9)]
        addresses = [f"127.0.0.1:{w.port}" for w in started]
        with RemoteExpertBackend(addresses, placement, admin_token=TOKEN) as backend:
            ours = engine_tokens(load_head(fp8), backend, prompts, SamplingParams(max_tokens=16, ignore_eos=True))
            served = backend.channels.run(backend.fetch_info()).result()
        for prompt, got in zip(prompts, ours):
            want = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0)
            assert got == want[0, len(prompt):].tolist()
        assert all(i.dispatch_calls > 0 for i in served), "every worker took part"
    finally:
        workers.close()
