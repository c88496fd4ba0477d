"""Autoscaling as the issue checks it from outside: `nextserve up --autoscale-heads 1:2
--autoscale-expert-workers 2:3` under sustained concurrent load grows (Serve adds a head replica, the
controller a worker through its live reshard), and idle goes back to 1 head and 2 workers; every request
is answered and every greedy text equals transformers' across the changes. Its own bring-up: the test
changes the cluster's size. Short delays, cool-down and Serve metric intervals (flags and Serve's
environment) keep it well under two minutes after the bring-up; the defaults are measured in
docs/OPERATIONS.md (Autoscaling)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nextserve.cluster.control.registry import Registry

from cluster_harness import UpProcess, hf_greedy_text, prefetch_greedy, seeded_prompts, stream_completion, wait_for

pytestmark = pytest.mark.cluster
CONCURRENCY = 8
MAX_TOKENS = 16
FLAGS = ["--autoscale-heads", "1:2", "--autoscale-expert-workers", "2:3", "--max-num-seqs", "2",
         "--autoscale-upscale-delay-s", "2", "--autoscale-downscale-delay-s", "6", "--autoscale-cooldown-s", "4",
         "--autoscale-look-back-s", "3",
         # any sustained decoding keeps the tiny model's workers above this; idle is 0
         "--autoscale-busy-high", "0.02", "--autoscale-busy-low", "0.01"]
SERVE_ENV = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
             "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}
"""Serve's replicas and handles report ongoing requests every second (default 10 s)."""


@pytest.fixture(scope="module")
def up(tiny_dir: Path, tiny_hf: tuple, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    prefetch_greedy(tiny_hf, seeded_prompts(CONCURRENCY), MAX_TOKENS)  # the references, while it comes up
    proc = UpProcess(tiny_dir, tmp_path_factory.mktemp("nscache"), 2, FLAGS, env=SERVE_ENV)
    yield proc
    if proc.proc.poll() is None:
        proc.interrupt()


def _sizes(registry: Registry) -> tuple[int, int]:
    """(heads alive, workers of the published placement), read from the cluster's registry in this
    process (what `nextserve status` reads; a CLI process per poll is slow on a loaded machine)."""
    heads = sum(1 for h in registry.heads() if h.alive)
    record = registry.placement()
    return heads, record.placement.num_workers if record else 0


def test_load_scales_heads_and_workers_up_and_idle_back_to_the_minimum(up: UpProcess, tiny_hf: tuple) -> None:
    registry = Registry(up.state()["redis_url"])
    prompts = seeded_prompts(CONCURRENCY)
    answers: list[tuple[int, str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client(i: int) -> None:  # one request after another until told to stop: sustained load
        while not stop.is_set():
            try:
                answers.append((i, stream_completion(up.base_url, prompts[i], MAX_TOKENS)))
            except BaseException as exc:  # noqa: BLE001 - every failure is reported below
                errors.append(exc)
                return

    seen = {"heads": 1, "workers": 2}

    def grown() -> bool:
        heads, workers = _sizes(registry)
        seen["heads"], seen["workers"] = max(seen["heads"], heads), max(seen["workers"], workers)
        return seen["heads"] == 2 and seen["workers"] == 3

    start = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for i in range(CONCURRENCY):
            pool.submit(client, i)
        try:
            wait_for(grown, 90, f"2 heads and 3 workers under load (seen {seen})")
            grew_s = time.monotonic() - start
            time.sleep(3)  # a few more requests on the grown cluster
        finally:
            stop.set()
    assert not errors, errors[:3]
    idle = time.monotonic()
    wait_for(lambda: _sizes(registry) == (1, 2), 150, "1 head and 2 workers after the load stopped")
    shrank_s = time.monotonic() - idle
    print(f"grew to 2 heads + 3 workers in {grew_s:.0f} s of load; back to 1 + 2 in {shrank_s:.0f} s idle; "
          f"{len(answers)} requests")

    want = {i: hf_greedy_text(tiny_hf, prompts[i], MAX_TOKENS) for i in range(CONCURRENCY)}
    assert len(answers) >= CONCURRENCY
    assert [i for i, text in answers if text != want[i]] == []

    def settled() -> bool:  # the controller's scaling record follows the sizes on its own loop (seconds)
        s = registry.scaling_status()
        return s is not None and (s.heads_current, s.heads_desired, s.workers_current, s.workers_desired) == (1, 1, 2, 2)
    wait_for(settled, 30, "the scaling status at 1 head and 2 workers, current and desired")
    scaling = registry.scaling_status()
    assert scaling is not None and scaling.last_decision is not None and scaling.last_decision.reason
    assert scaling.decisions.get("workers:up", 0) >= 1 and scaling.decisions.get("workers:down", 0) >= 1
    assert scaling.decisions.get("heads:up", 0) >= 1 and scaling.decisions.get("heads:down", 0) >= 1
    text = up.cli("status").stdout
    scaling_lines = [line for line in text.splitlines() if "scaling" in line]
    assert "scaling: heads 1 (desired 1, autoscaled 1:2)  workers 2 (desired 2, autoscaled 2:3)" in text, scaling_lines
    assert "last scaling decision" in text, scaling_lines
    # Served after the changes too. Last: with this module's thresholds (busy-high 0.02, upscale delay 2 s)
    # any decoding may start the next scale-up, which the status checks above must not see.
    assert stream_completion(up.base_url, prompts[0], MAX_TOKENS) == want[0]
