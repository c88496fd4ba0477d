"""A sequence's greedy tokens do not depend on who else is in the engine's batch, or when they join and
leave: each equals transformers' greedy output for its prompt alone."""

from __future__ import annotations

import asyncio

import torch

from nextserve.cluster.engine.contract import EngineRequest
from nextserve.cluster.engine.engine import Engine
from nextserve.cluster.engine.scheduler import SchedulerConfig, StepPlan
from nextserve.model.loader import load_head
from nextserve.router.local_backend import load_local_backend
from nextserve.model.sampling import SamplingParams


def _hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_tokens_same_alone_and_in_a_changing_batch(reference: dict) -> None:
    model, path = reference["awkward"]
    head = load_head(path)
    engine = Engine(head, load_local_backend(path), None, SchedulerConfig(prefill_chunk=32))
    sizes: list[int] = []
    schedule = engine.scheduler.schedule

    def spy() -> StepPlan:
        plan = schedule()
        sizes.append(len(plan.scheduled))
        return plan

    engine.scheduler.schedule = spy  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, head.config.vocab_size, (n,), generator=g).tolist() for n in (12, 90, 3, 30)]
    max_tokens = [24, 24, 6, 24]

    # A starts alone; B (a 90-token prompt, prefilled in chunks of 32) joins after A's 3rd token;
    # C joins after A's 5th and leaves early (max 6 tokens); D joins after A's 12th.
    joins = {3: 1, 5: 2, 12: 3}

    async def run() -> list[list[int]]:
        outputs: list[list[int]] = [[] for _ in prompts]

        async def one(i: int) -> None:
            params = SamplingParams(max_tokens=max_tokens[i], ignore_eos=True)
            async for out in engine.generate(EngineRequest(f"r{i}", tuple(prompts[i]), params)):
                outputs[i] += out.token_ids

        tasks = []
        async for out in engine.generate(EngineRequest("r0", tuple(prompts[0]), SamplingParams(max_tokens=24, ignore_eos=True))):
            outputs[0] += out.token_ids
            for after in [a for a in joins if a <= len(outputs[0])]:  # outputs merge when the loop lags
                tasks.append(asyncio.create_task(one(joins.pop(after))))
            await asyncio.sleep(0.01)  # let a joining request reach the engine before A's next token
        await asyncio.gather(*tasks)
        return outputs

    try:
        outputs = asyncio.run(run())
    finally:
        engine.shutdown()
    assert max(sizes) >= 3 and min(sizes) == 1, sizes  # the batch really changed shape
    for i, prompt in enumerate(prompts):
        assert outputs[i] == _hf_greedy(model, prompt, max_tokens[i]), f"sequence {i} changed in a batch"
