"""A tiny, deterministic, Qwen-style byte-level BPE tokenizer for tests and demos.

The tokenizer is trained with the ``tokenizers`` library on text that is always
available locally: the ``*.py`` sources of Python's own standard library. Nothing
is downloaded. The output directory can be loaded with
``transformers.AutoTokenizer.from_pretrained(out_dir)`` and has a ChatML chat
template like Qwen's, so it can stand in for the real Qwen3-Next tokenizer in
tests that pair it with a tiny randomly initialised model.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sysconfig
import time
from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
#: Added first, in this order, so their ids are 0, 1, 2.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN)

#: Cap on the training text, in UTF-8 bytes (a few seconds of training on 2 cores).
CORPUS_BYTES = 4 * 1024 * 1024

#: ChatML, as in Qwen's template (without tool / reasoning handling).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _stdlib_sources() -> list[pathlib.Path]:
    """The standard library's ``*.py`` files, sorted by path (stable order).

    ``site-packages`` (which lives under the stdlib directory) is skipped so the
    corpus does not depend on which third-party packages are installed.
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = (p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    return sorted((p for p in files if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def _corpus(limit_bytes: int = CORPUS_BYTES) -> Iterator[str]:
    """Yield stdlib source texts until ``limit_bytes`` UTF-8 bytes have been yielded.

    The last file is truncated so the total is exactly the cap (when the stdlib is
    big enough), which keeps the corpus identical between runs on one interpreter.
    """
    remaining = limit_bytes
    for path in _stdlib_sources():
        if remaining <= 0:
            return
        try:
            data = path.read_bytes()[:remaining]
        except OSError:  # unreadable file: skip it, deterministically per machine
            continue
        text = data.decode("utf-8", errors="ignore")
        remaining -= len(data)
        if text:
            yield text


def _tokenizer_config() -> dict[str, object]:
    """The ``tokenizer_config.json`` contents (the chat template goes in its own file)."""
    return {
        # transformers 5 renamed PreTrainedTokenizerFast to TokenizersBackend (the old
        # name is an alias). It loads tokenizer.json verbatim; "Qwen2Tokenizer" would
        # rebuild the backend with Qwen's own normalizer and split regex instead.
        "tokenizer_class": "TokenizersBackend",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "model_max_length": 131072,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
    }


def train_tiny_tokenizer(out_dir: pathlib.Path, vocab_size: int = 2048) -> list[str]:
    """Train a tiny byte-level BPE tokenizer and save it for ``AutoTokenizer``.

    Special tokens and their ids: ``<|endoftext|>`` = 0 (pad), ``<|im_start|>`` = 1,
    ``<|im_end|>`` = 2 (eos). There is no bos and no unk token (byte-level BPE
    covers every input). The 256 byte symbols follow, then the learnt merges, up to
    exactly ``vocab_size`` entries (special tokens included).

    Training is deterministic: two calls give byte-identical ``tokenizer.json``.

    Args:
        out_dir: directory to write into (created if missing).
        vocab_size: total vocabulary size; must exceed 259 (3 special + 256 bytes).

    Returns:
        The names of the files written into ``out_dir``.
    """
    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be > {len(SPECIAL_TOKENS) + 256}, got {vocab_size}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Determinism: no RAYON_NUM_THREADS pinning is needed (none is set). The BPE
    # trainer breaks ties between equally frequent pairs by pair ids, and the ids
    # of the byte alphabet are assigned in sorted order; the one known source of
    # run-to-run drift (hash-map order assigning ids to continuing-subword tokens,
    # huggingface/tokenizers#1794) does not apply without a subword prefix. Checked:
    # byte-identical tokenizer.json across processes with 1, 2 and 16 rayon threads.
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )

    start = time.perf_counter()
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    logger.info(
        "trained byte-level BPE (vocab %d) on %d bytes of stdlib source in %.2f s",
        tokenizer.get_vocab_size(),
        CORPUS_BYTES,
        time.perf_counter() - start,
    )
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        actual_id = tokenizer.token_to_id(token)
        if actual_id != expected_id:
            raise RuntimeError(f"special token {token!r} got id {actual_id}, expected {expected_id}")

    tokenizer.save(str(out_dir / TOKENIZER_FILE), pretty=True)
    (out_dir / TOKENIZER_CONFIG_FILE).write_text(
        json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    # transformers 5 saves a single chat template as chat_template.jinja (and drops
    # it from tokenizer_config.json); from_pretrained reads that file and it takes
    # precedence over a "chat_template" key in the config.
    (out_dir / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE, encoding="utf-8")
    written = [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE]
    logger.info("wrote %s into %s", ", ".join(written), out_dir)
    return written
