"""Tests for model.tiny_tokenizer: determinism, round trips, ids, AutoTokenizer loading."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING

import pytest

from nextserve.model.tiny_tokenizer import EOS_TOKEN, PAD_TOKEN, train_tiny_tokenizer

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

VOCAB_SIZE = 2048

ROUND_TRIP_TEXTS = [
    "def add(a: int, b: int) -> int:\n    \"\"\"Add.\"\"\"\n    return a + b  # ok\n\n\tpass\r\n",
    "The quick brown fox says héllo → 世界, and 🙂 too!",
    "  leading spaces, trailing spaces   ",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("tiny_tok")
    written = train_tiny_tokenizer(out, vocab_size=VOCAB_SIZE)
    assert sorted(written) == sorted(p.name for p in out.iterdir())
    return out


@pytest.fixture(scope="module")
def backend(tok_dir: pathlib.Path) -> Tokenizer:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_tok(tok_dir: pathlib.Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)


@pytest.mark.unit
def test_files_written(tok_dir: pathlib.Path) -> None:
    names = {p.name for p in tok_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names


@pytest.mark.unit
def test_training_is_deterministic(tok_dir: pathlib.Path, tiny_dir: pathlib.Path) -> None:
    """tok_dir's training against the session's tiny checkpoint's, another training of the same vocab_size
    (make_tiny's): byte-identical files (no third training just for this)."""
    assert (tiny_dir / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        assert (tiny_dir / name).read_bytes() == (tok_dir / name).read_bytes()


@pytest.mark.unit
def test_vocab_size(backend: Tokenizer, hf_tok: PreTrainedTokenizerBase) -> None:
    assert backend.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE
    assert len(hf_tok) == VOCAB_SIZE


@pytest.mark.unit
def test_special_token_ids(backend: Tokenizer) -> None:
    assert backend.token_to_id("<|endoftext|>") == 0
    assert backend.token_to_id("<|im_start|>") == 1
    assert backend.token_to_id("<|im_end|>") == 2


@pytest.mark.unit
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_backend(backend: Tokenizer, text: str) -> None:
    ids = backend.encode(text).ids
    assert len(ids) < len(text.encode("utf-8"))  # merges actually compress
    assert backend.decode(ids) == text


@pytest.mark.unit
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_transformers(hf_tok: PreTrainedTokenizerBase, text: str) -> None:
    ids = hf_tok(text)["input_ids"]
    assert PAD_TOKEN not in hf_tok.convert_ids_to_tokens(ids)  # no bos/eos added
    assert hf_tok.decode(ids) == text


@pytest.mark.unit
def test_special_tokens_encode_atomically(backend: Tokenizer) -> None:
    ids = backend.encode("<|im_start|>user\nhi<|im_end|>\n").ids
    assert ids[0] == 1 and 2 in ids


@pytest.mark.unit
def test_auto_tokenizer_special_tokens(hf_tok: PreTrainedTokenizerBase) -> None:
    assert hf_tok.eos_token == EOS_TOKEN
    assert hf_tok.eos_token_id == 2
    assert hf_tok.pad_token == PAD_TOKEN
    assert hf_tok.pad_token_id == 0
    assert hf_tok.bos_token is None
    assert hf_tok.unk_token is None


@pytest.mark.unit
def test_chat_template(hf_tok: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nbe brief<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = hf_tok.apply_chat_template(messages[1:], tokenize=False)
    assert no_prompt == "<|im_start|>user\nhi<|im_end|>\n"
    # transformers 5: tokenize=True returns a BatchEncoding unless return_dict=False.
    ids = hf_tok.apply_chat_template(messages[1:], add_generation_prompt=True, return_dict=False)
    assert ids[0] == 1 and ids.count(2) == 1
    assert hf_tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.unit
def test_rejects_tiny_vocab(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError):
        train_tiny_tokenizer(tmp_path, vocab_size=259)
