"""Admission control on a real cluster (the shared `nextserve up`: Ray Serve, Redis, gRPC expert workers): 64
requests at once against its `--max-num-seqs 4 --max-queued-requests 8`, through the official `openai` client. The
excess is refused within seconds with 429 and Retry-After, every admitted request completes with text
equal to transformers' greedy, and the cluster serves exactly afterwards with nothing left in its head."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import pytest

from cluster_harness import UpProcess, hf_greedy_text, wait_for
from shared_cluster.conftest import MAX_NUM_SEQS, MAX_QUEUED_REQUESTS
from nextserve.cluster.engine.contract import RETRY_AFTER_S

pytestmark = pytest.mark.cluster
NUM_REQUESTS, MAX_TOKENS = 64, 12
REFUSED_WITHIN_S = 10.0


def _hf_text(served_hf: tuple[Any, Any], prompt: str) -> str:
    return hf_greedy_text(served_hf, served_hf[1](prompt)["input_ids"], MAX_TOKENS)


def test_a_flood_past_the_queue_is_refused_at_once_and_every_admitted_request_is_exact(
        shared_cluster: UpProcess, served_hf: tuple[Any, Any]) -> None:
    up = shared_cluster
    client = openai.AsyncOpenAI(base_url=f"{up.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    prompts = [f"def function_{i}(x):" for i in range(NUM_REQUESTS)]

    async def one(prompt: str) -> tuple[str | None, str | None, float]:
        """(text, None) when served; (None, Retry-After) when refused; and the seconds it took."""
        start = time.monotonic()
        try:
            r = await client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                extra_body={"ignore_eos": True})
            return r.choices[0].text, None, time.monotonic() - start
        except openai.RateLimitError as e:
            return None, e.response.headers.get("retry-after"), time.monotonic() - start

    async def flood() -> list[tuple[str | None, str | None, float]]:
        return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(flood())
    admitted = [(p, text) for p, (text, _, _) in zip(prompts, results) if text is not None]
    refused = [(retry_after, took) for text, retry_after, took in results if text is None]
    assert len(admitted) >= MAX_NUM_SEQS + MAX_QUEUED_REQUESTS and len(refused) >= NUM_REQUESTS // 2, (len(admitted),
                                                                                                len(refused))
    print(f"{len(admitted)} admitted, {len(refused)} refused, the slowest refusal in "
          f"{max(took for _, took in refused):.2f} s")
    assert all(retry_after == str(RETRY_AFTER_S) for retry_after, _ in refused)
    assert max(took for _, took in refused) < REFUSED_WITHIN_S
    for prompt, text in admitted:
        assert text == _hf_text(served_hf, prompt), prompt

    def head_idle() -> bool:
        (head,) = up.status()["heads"]
        return all(int(head.get(k, -1)) == 0 for k in ("num_running", "num_waiting", "slots_used", "blocks_used"))

    wait_for(head_idle, 30, "the head to report nothing running or waiting, no slot or block held")
    # Afterwards the cluster serves exactly, a refused prompt included.
    prompt = next(p for p, (text, _, _) in zip(prompts, results) if text is None)
    again = openai.OpenAI(base_url=f"{up.base_url}/v1", api_key="unused", max_retries=0, timeout=300).completions.create(
        model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    assert again.choices[0].text == _hf_text(served_hf, prompt)
