"""The whole head model with the remote expert backend (3 gRPC workers) gives transformers' greedy
tokens."""

from __future__ import annotations

import pytest
import torch

from nextserve.experts.server import BackgroundWorkers
from nextserve.model.config import Qwen3NextConfig
from nextserve.model.loader import load_head
from nextserve.model.sampling import SamplingParams
from nextserve.router.dispatcher import RemoteExpertBackend
from nextserve.router.placement import build_placement
from engine_run import engine_tokens

pytestmark = pytest.mark.grpc
TOKEN = "test-admin-token"
"""The workers' cluster token: every call to them carries it."""


@pytest.mark.parametrize("name,replication", [("small", 1), ("awkward", 2)])
@torch.inference_mode()
def test_greedy_tokens_equal_transformers_generate(reference: dict, name: str, replication: int) -> None:
    ref, path = reference[name]
    config = Qwen3NextConfig.from_json(path)
    placement = build_placement(config.moe_layers, config.num_experts, 3, replication)
    workers = BackgroundWorkers(admin_token=TOKEN)  # every call needs it
    try:
        started = [workers.start(path, placement.experts_of(w)) for w in range(3)]
        g = torch.Generator().manual_seed(11)
        prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 30)]
        with RemoteExpertBackend([f"127.0.0.1:{w.port}" for w in started], placement, admin_token=TOKEN) as backend:
            ours = engine_tokens(load_head(path), backend, prompts, SamplingParams(max_tokens=20, ignore_eos=True))
            served = backend.channels.run(backend.fetch_info()).result()
        for prompt, got in zip(prompts, ours):
            want = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0)
            assert got == want[0, len(prompt):].tolist()
        assert all(i.dispatch_calls > 0 for i in served), "every worker took part"
    finally:
        workers.close()
