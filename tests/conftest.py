"""Shared fixtures: transformers-built reference checkpoints and the tiny default checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen3NextForCausalLM

from hf_reference import AWKWARD, SMALL, build_reference, save_reference
from nextserve.model.loader import load_head
from nextserve.router.local_backend import LocalExpertBackend, load_local_backend
from nextserve.model.qwen3_next import HeadModel
from nextserve.model.tiny import make_tiny

CONFIGS = {"small": SMALL, "awkward": AWKWARD}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests without a tier marker are unit tests (the default tier)."""
    tiers = {"unit", "cluster", "grpc", "slow"}
    for item in items:
        if not tiers & {m.name for m in item.iter_markers()}:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Qwen3NextForCausalLM, Path]]:
    """transformers' own model at random weights per config, and the sharded checkpoint it saved."""
    out = {}
    for name, overrides in CONFIGS.items():
        model = build_reference(overrides)
        path = save_reference(model, tmp_path_factory.mktemp(f"ref_{name}"), max_shard_size="100KB")
        out[name] = (model, path)
    return out


@pytest.fixture(scope="module")
def small(reference: dict[str, tuple[Qwen3NextForCausalLM, Path]]) -> tuple[HeadModel, LocalExpertBackend]:
    """Our head and in-process experts on the "small" reference checkpoint."""
    _, path = reference["small"]
    return load_head(path), load_local_backend(path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    torch.manual_seed(0)
