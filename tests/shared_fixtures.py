"""The fixtures every tier shares (each defined once, here): transformers-built reference checkpoints, the
tiny default checkpoint and its tokenizer, the engine factory. A plugin that tests/conftest.py registers in
the processes that run tests, not in pytest-xdist's controller, which only schedules (each import here,
torch and transformers first, costs it seconds before any worker starts)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3NextForCausalLM

from engine_run import EngineFactory
from hf_reference import AWKWARD, SMALL, build_reference, save_reference
from nextserve.model.loader import load_head
from nextserve.router.local_backend import LocalExpertBackend, load_local_backend
from nextserve.model.qwen3_next import HeadModel
from nextserve.model.fp8_checkpoint import dequantized_twin, quantize_checkpoint
from nextserve.model.tiny import make_tiny

CONFIGS = {"small": SMALL, "awkward": AWKWARD}

torch.set_num_threads(1)
"""One intra-op thread in the test process, as a head replica and a CPU expert worker compute
(cluster/deployments/actor_threads.py): the models here are tiny, and with a thread per core torch's
OpenMP threads spin between ops and take the cores the cluster tier's processes (or the other tests on a
shared machine) need. Measured at load ~40 on the 2 cores: transformers' greedy on the tiny, 16 tokens,
1.8 s with 1 thread, 32.5 s with 2. A test of thread counts sets its own (and puts this one back)."""


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Qwen3NextForCausalLM, Path]]:
    """transformers' own model at random weights per config, and the sharded checkpoint it saved."""
    out = {}
    for name, overrides in CONFIGS.items():
        model = build_reference(overrides)
        path = save_reference(model, tmp_path_factory.mktemp(f"ref_{name}"), max_shard_size="100KB")
        out[name] = (model, path)
    return out


FP8_BLOCKS = {"small": (16, 16), "awkward": (16, 32)}
"""weight_block_size per reference config: 16 x 16 tiles every weight of "small" (so transformers'
FP8 loader, which reads a block as weight / scale grid, applies); 16 x 32 leaves ragged last blocks in
nearly every weight of "awkward" (hidden 40, intermediate 24)."""


@pytest.fixture(scope="session")
def fp8_reference(reference: dict[str, tuple[Qwen3NextForCausalLM, Path]],
                  tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Qwen3NextForCausalLM, Path, Path]]:
    """Per reference config: (transformers' model on the dequantized twin, the FP8 checkpoint, the twin)."""
    out = {}
    for name, block in FP8_BLOCKS.items():
        fp8 = quantize_checkpoint(reference[name][1], tmp_path_factory.mktemp(f"fp8_{name}") / "ckpt", block)
        twin = dequantized_twin(fp8, tmp_path_factory.mktemp(f"twin_{name}") / "ckpt")
        model = Qwen3NextForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # runs to max_new_tokens, as ignore_eos
        out[name] = (model, fp8, twin)
    return out


@pytest.fixture(scope="module")
def small(reference: dict[str, tuple[Qwen3NextForCausalLM, Path]]) -> tuple[HeadModel, LocalExpertBackend]:
    """Our head and in-process experts on the "small" reference checkpoint."""
    _, path = reference["small"]
    return load_head(path), load_local_backend(path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_fp8(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny checkpoint in fine-grained FP8 (128 x 128 blocks: the experts' 64 rows are one ragged
    block), and its dequantized twin (float32): what `nextserve quantize-fp8 TINY DST --twin TWIN` writes."""
    out = tmp_path_factory.mktemp("tiny_fp8")
    fp8 = quantize_checkpoint(tiny_dir, out / "fp8", (128, 128))
    return fp8, dequantized_twin(fp8, out / "twin")


@pytest.fixture(scope="session")
def tokenizer(tiny_dir: Path) -> PreTrainedTokenizerBase:
    """The tiny checkpoint's tokenizer (vocab 2048: it also decodes the reference models' 320 ids)."""
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture
def make_engine(tokenizer: PreTrainedTokenizerBase) -> Iterator[EngineFactory]:
    """Engines for one test (`make_engine(model, **scheduler)`, `make_engine.cached(model, slots, ...)`),
    shut down when it ends."""
    factory = EngineFactory(tokenizer)
    yield factory
    factory.shutdown()


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    torch.manual_seed(0)
