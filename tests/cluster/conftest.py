"""Fixtures of the cluster tier: transformers' own model on the tiny checkpoint (and on the tiny FP8
checkpoint's dequantized twin), the references the clusters' greedy text is checked against."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


@pytest.fixture(scope="session")
def tiny_hf(tiny_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of the tiny checkpoint in transformers. generate() runs to max_new_tokens, as a
    request with ignore_eos does (EOS not masked); a check of a request that stops at EOS cuts there."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model, AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def tiny_fp8_hf(tiny_fp8: tuple[Path, Path]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of the tiny FP8 checkpoint's dequantized twin in transformers: the reference a
    cluster serving the FP8 checkpoint is checked against (generate() runs to max_new_tokens, as tiny_hf)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_fp8[1], dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model, AutoTokenizer.from_pretrained(tiny_fp8[1])
