"""The token ids benchmark prompts are drawn from: the checkpoint tokenizer's ids but its special ones.

Never `config.vocab_size`: Qwen3-Coder-Next pads its embedding to 151,936 rows for a tokenizer of
151,669 tokens; the server answers 400 to an id in the padding, and a prompt of padding rows measures
nothing a user sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from nextserve.model.config import ConfigError


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id below len(tokenizer) (what the server admits) but the special tokens."""
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return [i for i in range(len(tokenizer)) if i not in special]


def checkpoint_prompt_token_ids(model_dir: Path) -> list[int]:
    """prompt_token_ids of the checkpoint's own tokenizer."""
    if not (model_dir / "config.json").exists():
        raise ConfigError(f"--model {model_dir} is not a checkpoint directory (no config.json); pass the one the "
                          f"server runs")
    return prompt_token_ids(AutoTokenizer.from_pretrained(model_dir))


def random_prompts(token_ids: Sequence[int], shape: tuple[int, int], seed: int) -> Tensor:
    """[B, L] ids drawn uniformly (seeded) from `token_ids`."""
    pool = torch.tensor(token_ids, dtype=torch.int64)
    return pool[torch.randint(0, len(pool), shape, generator=torch.Generator().manual_seed(seed))]
