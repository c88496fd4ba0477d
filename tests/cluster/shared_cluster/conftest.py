"""The shared cluster: one `nextserve up` for every test in this folder (one bring-up, 30-60 s on 2 cores,
instead of one per module). A new cluster test goes here when its check holds on this configuration and
it leaves the cluster serving; one that needs other server flags, or breaks the cluster for good (a
SIGINT, a lost node, a worker SIGKILLed with R = 1), keeps its own bring-up in tests/cluster/.

What it serves (the configuration, here only):
- the agent checkpoint (tests/agent_checkpoint.py: the tiny default trained until greedy decoding
  reproduces a few agent turns; same shapes and tokenizer as the tiny), as model "tiny"; `served_hf` is
  transformers' own model on it, the reference for greedy text;
- SHARED_WORKERS expert workers (R = 1), at most MAX_EXPERTS_PER_WORKER experts each, so a scale to 4
  moves in waves;
- an engine of MAX_NUM_SEQS running + MAX_QUEUED_REQUESTS waiting sequences (the admission test floods
  past it); the default cache (a 2,600-token prefix stays cached) and context (64K).

Tests take `shared_cluster` (a cluster_harness.UpProcess). The folder is a package, so the cluster
starts before its first test and stops after its last (package scope), before the destructive modules
bring up their own. A test that changes the cluster (kills its controller, restarts its Redis, scales
it) is marked `changes_shared_cluster`: it runs after every other test here, must leave the cluster
serving, and must not rely on the worker count (the waves test leaves 4 workers).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from agent_checkpoint import agent_checkpoint_dir
from cluster_harness import UpProcess, prefetch_greedy, seeded_prompts

__all__ = ["agent_checkpoint_dir"]  # the session fixture, imported for pytest

SHARED_WORKERS = 3
MAX_EXPERTS_PER_WORKER = 176
"""171 pairs per worker at 3 workers fit; a scale to 4 (128 each after) must go in waves."""
MAX_NUM_SEQS, MAX_QUEUED_REQUESTS = 4, 8
SHARED_FLAGS = ["--max-experts-per-worker", str(MAX_EXPERTS_PER_WORKER), "--max-num-seqs", str(MAX_NUM_SEQS),
                "--max-queued-requests", str(MAX_QUEUED_REQUESTS)]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Within this folder, the tests marked changes_shared_cluster go last (in file order); the folder's
    tests stay together, where pytest put them, so the package-scoped cluster starts once."""
    here = Path(__file__).resolve().parent
    mine = [i for i, item in enumerate(items) if item.path.resolve().parent == here]
    if not mine:
        return
    block = [items[i] for i in mine]
    ordered = sorted(block, key=lambda item: item.get_closest_marker("changes_shared_cluster") is not None)
    for i, item in zip(mine, ordered):
        items[i] = item


@pytest.fixture(scope="package")
def shared_cluster(agent_checkpoint_dir: Path, served_hf: tuple[PreTrainedModel, PreTrainedTokenizerBase],
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    prompts = seeded_prompts(8)  # test_cluster_serving's streams: computed while the cluster comes up
    prefetch_greedy(served_hf, prompts[:4], 120)
    prefetch_greedy(served_hf, prompts[4:], 24)
    proc = UpProcess(agent_checkpoint_dir, tmp_path_factory.mktemp("shared-cluster"), SHARED_WORKERS, SHARED_FLAGS)
    owned = proc.owned  # e.g. the redis-server a test restarted in place of its own
    yield proc
    try:
        assert proc.proc.poll() is None, "a test stopped the shared cluster:\n" + "".join(proc.lines[-30:])
        assert proc.interrupt() == 0, "".join(proc.lines[-30:])
    finally:
        for extra in owned:
            extra.stop()


@pytest.fixture(scope="package")
def served_hf(agent_checkpoint_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of the shared cluster's checkpoint in transformers, in float32 (what the server
    loads); generate() runs to max_new_tokens, as a request with ignore_eos does (EOS not masked)."""
    model = AutoModelForCausalLM.from_pretrained(agent_checkpoint_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model, AutoTokenizer.from_pretrained(agent_checkpoint_dir)
