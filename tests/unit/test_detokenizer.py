"""Incremental detokenization: the prompt boundary (a regression: a prompt ending inside a UTF-8 character
made the stream repeat the prompt's last text), stop strings against the slow rule, and the held-back
text bounded by the longest stop string."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from nextserve.cluster.engine.detokenizer import MAX_STOP_CHARS, MAX_STOP_STRINGS, IncrementalDetokenizer, StopMatcher


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


def _reference_stops(text: str, stop: tuple[str, ...]) -> tuple[int, str] | None:
    """The obvious slow rule, character by character: the first stop string to complete (earliest end),
    the longest of those ending together -> (where it starts, the stop)."""
    for end in range(1, len(text) + 1):
        done = [(end - len(s), s) for s in stop if text[:end].endswith(s)]
        if done:
            return min(done)
    return None


def _reference_held(text: str, stop: tuple[str, ...]) -> int:
    """The longest tail of `text` that is a proper prefix of some stop string, by trying every length."""
    return max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


@pytest.mark.parametrize("seed", range(40))
def test_stop_matcher_equals_the_slow_rule_on_any_split(seed: int) -> None:
    """Texts and stops over a 3-letter alphabet (many overlaps, self-overlapping stops), fed in random
    pieces: where the stop is found, and what is held back after every piece, equal the slow rule's."""
    rng = random.Random(seed)
    stop = tuple("".join(rng.choice("abc") for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(1, 4)))
    text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 60)))
    matcher, fed = StopMatcher(stop), ""
    found = None
    while len(fed) < len(text) and found is None:
        piece = text[len(fed):len(fed) + rng.randint(1, 5)]
        found = matcher.feed(piece)
        if found is not None:
            found = (len(fed) + found[0], found[1])
        fed += piece
        if found is None:
            assert matcher.num_held_chars == _reference_held(fed, stop), (fed, stop)
    assert found == _reference_stops(text, stop), (text, stop)


def test_held_back_text_is_bounded_by_the_longest_stop_not_the_text(tiny_dir: Path) -> None:
    """12K characters of output against MAX_STOP_STRINGS stops of MAX_STOP_CHARS characters, each a prefix
    of what keeps coming: after every token, all but at most MAX_STOP_CHARS - 1 characters have been sent."""
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    line = "    total = total + weights[i] * values[i]  # accumulate\n"
    text = line * (12_000 // len(line))
    stop = tuple(text[i:i + MAX_STOP_CHARS - 1] + "\u2603" for i in range(MAX_STOP_STRINGS))  # never completes
    det = IncrementalDetokenizer(tok.backend_tokenizer, [], stop)
    encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    sent, held = "", []
    for token, (_, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        sent += det.add(token)
        held.append(end - len(sent))  # ASCII text: the first `end` characters are decoded by now
    assert max(held) == MAX_STOP_CHARS - 1  # bounded, and the stops' prefixes really were held back
    assert text.startswith(sent) and sent + det.flush() == text and not det.is_stopped
