"""Incremental detokenization at the prompt boundary (a regression: a prompt ending inside a UTF-8
character made the stream repeat the prompt's last text)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from nextserve.cluster.engine.detokenizer import IncrementalDetokenizer


def test_prompt_ending_inside_a_character_streams_only_the_output(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok.encode("def f(): return '世界' + x", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    prompt, output = ids[:cut], ids[cut:]
    det = IncrementalDetokenizer(tok.backend_tokenizer, prompt)
    text = "".join(det.add(t) for t in output) + det.flush()
    assert text == tok.decode(output).lstrip("\ufffd") or text == tok.decode(output)
    assert not text.startswith(tok.decode(prompt).rstrip("\ufffd"))


def test_plain_prompt_streams_exactly_the_decoded_output(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    prompt = tok.encode("import os\n", add_special_tokens=False)
    output = tok.encode("print(os.getcwd())", add_special_tokens=False)
    det = IncrementalDetokenizer(tok.backend_tokenizer, prompt)
    assert "".join(det.add(t) for t in output) + det.flush() == "print(os.getcwd())"
