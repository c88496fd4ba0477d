"""Grammar-constrained decoding in the engine, on the tiny random-weight checkpoint: every constrained
output validates (jsonschema), unconstrained rows of a mixed batch are untouched, a grammar that allows
the greedy token leaves the output as it was, preemption resumes the grammar where it stopped, and a
schema feature the grammar cannot enforce is refused naming it."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import xgrammar as xgr
from transformers import AutoTokenizer

from engine_run import Model
from nextserve.cluster.engine.contract import (EngineRequest, EngineRequestError, ErrorCode, FinishReason, Grammar,
                                               GrammarKind, SamplingParams, StepOutput)
from nextserve.cluster.engine.engine import Engine
from nextserve.cluster.engine.json_schema_support import FORMATS
from nextserve.cluster.engine.scheduler import SchedulerConfig
from nextserve.model.cache.budget import CacheConfig
from nextserve.model.loader import load_head
from nextserve.model.tiny import make_tiny
from nextserve.router.local_backend import load_local_backend

SCHEMAS: dict[str, dict[str, Any]] = {
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    "bounded_integer": {"type": "object", "properties": {"n": {"type": "integer", "minimum": -3, "maximum": 17}},
                        "required": ["n"]},
    "array_max_items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
    "nested": {"type": "object", "required": ["user"], "properties": {"user": {
        "type": "object", "required": ["name", "address"], "properties": {
            "name": {"type": "string", "maxLength": 6},
            "address": {"type": "object", "required": ["zip"], "properties": {"zip": {"type": "string",
                                                                                      "maxLength": 5}}}}}}},
    "any_of_null": {"type": "object", "required": ["note"],
                    "properties": {"note": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]}}},
    "string_max_length": {"type": "string", "maxLength": 7},
    "everything": {"type": "object", "required": ["a", "b", "c", "d", "e"], "properties": {
        "a": {"enum": ["x", "y"]}, "b": {"type": "integer", "minimum": 0, "maximum": 100},
        "c": {"type": "array", "maxItems": 2, "items": {"type": "boolean"}},
        "d": {"anyOf": [{"type": "null"}, {"type": "number", "minimum": 0, "maximum": 1}]},
        "e": {"type": "string", "maxLength": 3}}, "additionalProperties": False},
}


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> Model:
    return load_head(tiny_dir, mtp=False), load_local_backend(tiny_dir)  # as a head without MTP drafts loads it


@pytest.fixture(scope="module")
def engine(tiny: Model, tiny_dir: Path) -> Any:
    engine = Engine(tiny[0], tiny[1], AutoTokenizer.from_pretrained(tiny_dir), max_model_len=1024)
    yield engine
    engine.shutdown()


def run(engine: Engine, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
        grammars: Sequence[Grammar | None]) -> list[StepOutput]:
    """The requests concurrently (one batch), each merged into one output."""
    per = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)

    async def one(i: int) -> StepOutput:
        request = EngineRequest(f"g{id(prompts)}-{i}", tuple(prompts[i]), per[i], grammar=grammars[i])
        return functools.reduce(StepOutput.merge, [out async for out in engine.generate(request)])

    async def all_() -> list[StepOutput]:
        return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))

    return asyncio.run(all_())


def prompt_ids(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text, add_special_tokens=False)


def schema_grammar(schema: dict[str, Any]) -> Grammar:
    return Grammar(GrammarKind.JSON_SCHEMA, json.dumps(schema))


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_constrained_output_validates(engine: Engine, name: str) -> None:
    """Greedy and three seeds, batched: each output parses and validates against the schema, and ends
    by the grammar (STOP), not by running out of tokens."""
    schema = SCHEMAS[name]
    params = [SamplingParams(max_tokens=300)] + [SamplingParams(max_tokens=300, temperature=1.0, seed=s)
                                                 for s in (1, 2, 3)]
    prompts = [prompt_ids(engine, f"Answer in JSON ({name}) #{i}:") for i in range(len(params))]
    outs = run(engine, prompts, params, [schema_grammar(schema)] * len(params))
    for out in outs:
        assert out.finish_reason is FinishReason.STOP, out.text
        jsonschema.validate(json.loads(out.text), schema)


def test_json_object_outputs_are_objects(engine: Engine) -> None:
    """Any JSON object: a random-weight model may stay inside an unbounded string value until max_tokens
    (finish "length", the text a prefix of an object); every output that the grammar ended is an object."""
    params = [SamplingParams(max_tokens=150)] + [SamplingParams(max_tokens=150, temperature=1.0, seed=s)
                                                 for s in range(1, 8)]
    prompts = [prompt_ids(engine, f"Reply with a JSON object {i}") for i in range(len(params))]
    outs = run(engine, prompts, params, [Grammar(GrammarKind.JSON_OBJECT)] * len(params))
    finished = [out for out in outs if out.finish_reason is FinishReason.STOP]
    assert len(finished) >= 4, [out.text for out in outs]
    for out in finished:
        assert isinstance(json.loads(out.text), dict)
    for out in outs:
        assert out.text.startswith("{") and (out.finish_reason is FinishReason.STOP or len(out.token_ids) == 150)


def test_unconstrained_rows_of_a_mixed_batch_are_unchanged(engine: Engine) -> None:
    """Rows without a grammar give the same greedy tokens beside constrained rows as alone."""
    prompts = [prompt_ids(engine, text) for text in ("def main():", "Hello there", "import os\n", "class A:")]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    alone = run(engine, prompts, params, [None] * 4)
    grammar = schema_grammar(SCHEMAS["everything"])
    roomy = SamplingParams(max_tokens=200)
    mixed = run(engine, prompts, [params, roomy, params, roomy], [None, grammar, None, grammar])
    assert [mixed[0].token_ids, mixed[2].token_ids] == [alone[0].token_ids, alone[2].token_ids]
    assert mixed[1].token_ids != alone[1].token_ids  # the constrained rows did change (JSON now)
    jsonschema.validate(json.loads(mixed[1].text), SCHEMAS["everything"])


def _literal_regex(text: str) -> str:
    return "".join(f"\\{c}" if c in ".^$*+?()[]{}|\\/-" else "\\n" if c == "\n" else c for c in text)


def test_a_grammar_that_allows_the_greedy_token_leaves_the_output_unchanged(engine: Engine) -> None:
    """The grammar is the greedy output's own text (so it allows the greedy token at every step): the
    constrained output is the same tokens, then the grammar ends the sequence with its stop token.
    (xgrammar 0.2.9's mask now and then forbids a token its grammar accepts: on the tiny tokenizer "rror"
    under the regex "rror"; the prompt here is one whose greedy tokens it does not hit.)"""
    prompt = prompt_ids(engine, "class A:")
    free = run(engine, [prompt], SamplingParams(max_tokens=20, ignore_eos=True), [None])[0]
    def is_plain(token: int) -> bool:  # not special, not a byte of a multi-byte character
        text = engine.tokenizer.decode([token])
        return token > 2 and text.isascii() and text.isprintable()

    n = next((i for i, t in enumerate(free.token_ids) if not is_plain(t)), len(free.token_ids))
    assert n >= 8, "the greedy output should start with plain ASCII text"
    text = engine.tokenizer.decode(free.token_ids[:n])
    grammar = Grammar(GrammarKind.REGEX, _literal_regex(text))
    constrained = run(engine, [prompt], SamplingParams(max_tokens=n + 5), [grammar])[0]
    assert constrained.token_ids[:n] == free.token_ids[:n]
    assert constrained.text == text and constrained.finish_reason is FinishReason.STOP


def test_a_constrained_output_cut_by_max_tokens_is_length(engine: Engine) -> None:
    out = run(engine, [prompt_ids(engine, "JSON:")], SamplingParams(max_tokens=3),
              [schema_grammar(SCHEMAS["everything"])])[0]
    assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 3


def test_preemption_resumes_the_grammar_over_the_generated_tokens(tiny: Model, engine: Engine) -> None:
    """Four constrained sequences of ~110 prompt tokens in a cache of 30 blocks of 16 tokens: some are
    preempted mid-output and recomputed (their matcher rebuilt by re-advancing over the tokens generated
    so far); each output equals the one a roomy engine gives (seeded) and validates."""
    schema = SCHEMAS["everything"]
    cache = CacheConfig(4 * 245760 + 30 * 32768, 16, enable_prefix_cache=False)  # 4 slots, 30 blocks (bf16)
    tight = Engine(tiny[0], tiny[1], engine.tokenizer, SchedulerConfig(max_num_seqs=4, max_tokens_per_step=64,
                                                                       prefill_chunk=16),
                   max_model_len=512, cache_config=cache)
    try:
        assert (tight.capacity.num_slots, tight.capacity.num_blocks) == (4, 30)
        prompts = [prompt_ids(engine, f"Record {i}: " + "fill every field of the JSON record. " * 12)[:110]
                   for i in range(4)]
        params = [SamplingParams(max_tokens=120, temperature=1.0, seed=i) for i in range(4)]
        grammars = [schema_grammar(schema)] * 4
        roomy = run(engine, prompts, params, grammars)
        outs = run(tight, prompts, params, grammars)
        assert tight.stats().num_preemptions >= 1
    finally:
        tight.shutdown()
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    for out in outs:
        assert out.finish_reason is FinishReason.STOP, out
        jsonschema.validate(json.loads(out.text), schema)


@pytest.mark.parametrize("schema,keyword", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "maxProperties": 2}, "maxProperties"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"type": "string", "format": "credit-card"}, "format: credit-card"),
    ({"type": "number", "multipleOf": 0.5}, "multipleOf"),
])
def test_a_schema_feature_the_grammar_cannot_enforce_is_refused(engine: Engine, schema: dict[str, Any],
                                                                keyword: str) -> None:
    with pytest.raises(EngineRequestError) as info:
        run(engine, [[5, 6, 7]], SamplingParams(max_tokens=4), [schema_grammar(schema)])
    assert info.value.code is ErrorCode.INVALID_REQUEST and info.value.param == "response_format"
    assert repr(keyword) in info.value.message


def _root_rules(schema: dict[str, Any]) -> list[str]:
    return [line for line in str(xgr.Grammar.from_json_schema(json.dumps(schema))).splitlines()
            if line.startswith("root")]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_accepted_format_is_enforced_by_the_library(fmt: str) -> None:
    """A format the list accepts changes the grammar (an unknown one, like 'ipv9', leaves a plain string)."""
    unknown = _root_rules({"type": "string", "format": "ipv9"})
    assert _root_rules({"type": "string", "format": "no-such-format"}) == unknown  # both: any string
    assert _root_rules({"type": "string", "format": fmt}) != unknown


def test_a_grammar_the_library_cannot_parse_is_refused(engine: Engine) -> None:
    with pytest.raises(EngineRequestError, match="cannot be built") as info:
        run(engine, [[5, 6, 7]], SamplingParams(max_tokens=4),
            [Grammar(GrammarKind.REGEX, "(?<=a)b", param="text.format")])
    assert info.value.param == "text.format"


def test_padded_vocabulary_never_allows_padding_ids(tmp_path: Path) -> None:
    """A model whose logits are wider than its tokenizer (Qwen3-Coder-Next pads 151,669 tokens to 151,936
    rows): the grammar's mask covers the padded width and forbids every padding id."""
    path = make_tiny(tmp_path / "padded", pad_vocab=40)
    engine = Engine(load_head(path), load_local_backend(path), AutoTokenizer.from_pretrained(path), max_model_len=512)
    try:
        compiler = engine.grammar_masks().compiler
        assert compiler.vocab_size == 2048 + 40 and compiler.info.vocab_size == 2048 + 40
        outs = run(engine, [prompt_ids(engine, "JSON:")] * 2,
                   [SamplingParams(max_tokens=200), SamplingParams(max_tokens=200, temperature=1.0, seed=9)],
                   [schema_grammar(SCHEMAS["everything"])] * 2)
        for out in outs:
            assert out.finish_reason is FinishReason.STOP and max(out.token_ids) < 2048
            jsonschema.validate(json.loads(out.text), SCHEMAS["everything"])
    finally:
        engine.shutdown()
