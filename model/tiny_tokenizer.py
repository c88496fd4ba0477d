"""A tiny, deterministic, Qwen-style byte-level BPE tokenizer for tests and demos.

The tokenizer is trained with the ``tokenizers`` library on text that is always
available locally: the ``*.py`` sources of Python's own standard library. Nothing
is downloaded. The output directory can be loaded with
``transformers.AutoTokenizer.from_pretrained(out_dir)`` and has a ChatML chat
template that renders tools, tool calls and tool results the way Qwen3-Coder's
own template does (XML ``<tools>`` in the system turn, ``<tool_call>`` /
``<function=NAME>`` / ``<parameter=KEY>`` blocks, ``<tool_response>`` turns), so
it can stand in for the real Qwen3-Next / Qwen3-Coder-Next tokenizer in tests
that pair it with a tiny model.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sysconfig
import time
from collections.abc import Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
#: Added first, in this order, so their ids are 0, 1, 2.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN)

#: Cap on the training text, in UTF-8 bytes (a few seconds of training on 2 cores).
CORPUS_BYTES = 4 * 1024 * 1024

#: Added after training, in this order, as the vocabulary's last ids; NOT special (as in the real Qwen
#: tokenizers: ``special: false``), so ``decode(..., skip_special_tokens=True)`` keeps them and a tool-call
#: parser sees them in the text, while each still encodes as one token.
TOOL_CALL_TOKEN = "<tool_call>"
TOOL_CALL_END_TOKEN = "</tool_call>"
TOOL_RESPONSE_TOKEN = "<tool_response>"
TOOL_RESPONSE_END_TOKEN = "</tool_response>"
NON_SPECIAL_TOKENS: tuple[str, ...] = (TOOL_CALL_TOKEN, TOOL_CALL_END_TOKEN, TOOL_RESPONSE_TOKEN,
                                       TOOL_RESPONSE_END_TOKEN)

#: The system prompt used when tools are given without a system message (Qwen3-Coder's default).
DEFAULT_TOOL_SYSTEM = "You are Qwen, a helpful AI assistant that can interact with a computer to solve tasks."

#: How to call a function, appended after ``</tools>`` (Qwen3-Coder's wording, byte for byte).
TOOL_INSTRUCTIONS = (
    "\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested "
    "within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language BEFORE the function call, "
    "but NOT after\n"
    "- If there is no function call available, answer the question like normal with your current knowledge and "
    "do not tell the user about function calls\n"
    "</IMPORTANT>"
)


def _jinja_literal(text: str) -> str:
    """`text` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


#: ChatML with tools rendered in Qwen3-Coder's format (our own template producing the same text):
#:
#: - a leading ``system`` (or ``developer``) message is the system turn; with ``tools`` the turn is that
#:   message (or DEFAULT_TOOL_SYSTEM) + ``# Tools`` + ``<tools>`` with one ``<function>`` per tool (name,
#:   description, ``<parameters>`` with a ``<parameter>`` per property: name, type, description, then any
#:   other schema keys as ``<key>value</key>``, JSON for objects and lists) + TOOL_INSTRUCTIONS;
#: - an assistant message with ``tool_calls``: its trimmed content (if any) on its own line, then per call
#:   ``\n<tool_call>\n<function=NAME>\n`` + ``<parameter=KEY>\nVALUE\n</parameter>\n`` per argument +
#:   ``</function>\n</tool_call>``. ``arguments`` is a dict (a JSON string is emitted as is); a value that
#:   is an object or a list is JSON, a string is written raw, a number as is, and true/false/null are
#:   written as JSON (``true``, not Python's ``True`` that Qwen3-Coder's own template prints), which is
#:   what a model emits and what a tool-call parser reads back;
#: - consecutive ``tool`` messages share one ``user`` turn, each as ``<tool_response>\n...\n</tool_response>\n``;
#: - ``add_generation_prompt`` appends ``<|im_start|>assistant\n``.
CHAT_TEMPLATE = (
    "{%- macro text_of(content) %}"
    "{%- if content is string %}{{- content }}"
    "{%- elif content is defined and content is not none and content is iterable %}"
    "{%- for part in content %}"
    "{%- if part is mapping and part.type == 'text' %}{{- part.text }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{%- endmacro %}"
    "{%- macro schema_value(value) %}"
    "{%- if value is mapping or (value is iterable and value is not string) %}{{- value | tojson }}"
    "{%- else %}{{- value | string }}{%- endif %}"
    "{%- endmacro %}"
    "{%- macro other_keys(obj, handled) %}"
    "{%- if obj is mapping %}"
    "{%- for key in obj if key not in handled %}"
    "{{- '\\n<' ~ key ~ '>' ~ schema_value(obj[key]) ~ '</' ~ key ~ '>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{%- endmacro %}"
    "{%- macro argument_value(value) %}"
    "{%- if value is mapping or (value is iterable and value is not string) %}{{- value | tojson }}"
    "{%- elif value is none %}{{- 'null' }}"
    "{%- elif value is sameas true %}{{- 'true' }}"
    "{%- elif value is sameas false %}{{- 'false' }}"
    "{%- else %}{{- value | string }}{%- endif %}"
    "{%- endmacro %}"
    "{%- set has_tools = tools is defined and tools is not none and tools | length > 0 %}"
    "{%- set ns = namespace(system=none, start=0) %}"
    "{%- if messages | length > 0 and messages[0].role in ['system', 'developer'] %}"
    "{%- set ns.system = text_of(messages[0].content) %}"
    "{%- set ns.start = 1 %}"
    "{%- endif %}"
    "{%- if ns.system is not none or has_tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{{- ns.system if ns.system is not none else " + _jinja_literal(DEFAULT_TOOL_SYSTEM) + " }}"
    "{%- if has_tools %}"
    "{{- '\\n\\n# Tools\\n\\nYou have access to the following functions:\\n\\n<tools>' }}"
    "{%- for tool in tools %}"
    "{%- set fn = tool.function if tool.function is defined else tool %}"
    "{{- '\\n<function>\\n<name>' ~ fn.name ~ '</name>' }}"
    "{%- if fn.description is defined and fn.description is not none %}"
    "{{- '\\n<description>' ~ (fn.description | trim) ~ '</description>' }}"
    "{%- endif %}"
    "{{- '\\n<parameters>' }}"
    "{%- if fn.parameters is defined and fn.parameters is mapping %}"
    "{%- if fn.parameters.properties is defined and fn.parameters.properties is mapping %}"
    "{%- for name, field in fn.parameters.properties | items %}"
    "{{- '\\n<parameter>\\n<name>' ~ name ~ '</name>' }}"
    "{%- if field.type is defined %}{{- '\\n<type>' ~ (field.type | string) ~ '</type>' }}{%- endif %}"
    "{%- if field.description is defined %}"
    "{{- '\\n<description>' ~ (field.description | trim) ~ '</description>' }}"
    "{%- endif %}"
    "{{- other_keys(field, ['name', 'type', 'description']) }}"
    "{{- '\\n</parameter>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- other_keys(fn.parameters, ['type', 'properties']) }}"
    "{%- endif %}"
    "{{- '\\n</parameters>' }}"
    "{{- other_keys(fn, ['type', 'name', 'description', 'parameters']) }}"
    "{{- '\\n</function>' }}"
    "{%- endfor %}"
    "{{- '\\n</tools>' }}"
    "{{- " + _jinja_literal(TOOL_INSTRUCTIONS) + " }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages[ns.start:] %}"
    "{%- set content = text_of(message.content) %}"
    "{%- if message.role == 'assistant' and message.tool_calls is defined and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if content | trim | length > 0 %}{{- '\\n' ~ (content | trim) ~ '\\n' }}{%- endif %}"
    "{%- for call in message.tool_calls %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    "{{- '\\n<tool_call>\\n<function=' ~ fn.name ~ '>\\n' }}"
    "{%- if fn.arguments is mapping %}"
    "{%- for key, value in fn.arguments | items %}"
    "{{- '<parameter=' ~ key ~ '>\\n' ~ argument_value(value) ~ '\\n</parameter>\\n' }}"
    "{%- endfor %}"
    "{%- elif fn.arguments is string and fn.arguments | length > 0 %}"
    "{{- fn.arguments }}{%- if not fn.arguments.endswith('\\n') %}{{- '\\n' }}{%- endif %}"
    "{%- endif %}"
    "{{- '</function>\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or loop.previtem.role != 'tool' %}{{- '<|im_start|>user\\n' }}{%- endif %}"
    "{{- '<tool_response>\\n' ~ content ~ '\\n</tool_response>\\n' }}"
    "{%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' ~ ('system' if message.role == 'developer' else message.role) ~ '\\n' ~ content"
    " ~ '<|im_end|>\\n' }}"
    "{%- endif %}"
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
    covers every input). The 256 byte symbols follow, then the learnt merges, then
    the non-special added tokens ``<tool_call>``, ``</tool_call>``,
    ``<tool_response>``, ``</tool_response>`` as the last four ids, for exactly
    ``vocab_size`` entries in all.

    Training is deterministic: two calls give byte-identical ``tokenizer.json``.

    Args:
        out_dir: directory to write into (created if missing).
        vocab_size: total vocabulary size; must exceed 263 (3 special + 256 bytes + 4 added).

    Returns:
        The names of the files written into ``out_dir``.
    """
    reserved = len(SPECIAL_TOKENS) + 256 + len(NON_SPECIAL_TOKENS)
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size must be > {reserved}, got {vocab_size}")
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
        vocab_size=vocab_size - len(NON_SPECIAL_TOKENS),
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
    trained = tokenizer.get_vocab_size(with_added_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL_TOKENS])
    for offset, token in enumerate(NON_SPECIAL_TOKENS):
        actual_id = tokenizer.token_to_id(token)
        if actual_id != trained + offset:
            raise RuntimeError(f"added token {token!r} got id {actual_id}, expected {trained + offset}")

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
