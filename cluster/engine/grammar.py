"""Grammar-constrained decoding: a request's Grammar compiled once, a matcher per sequence, masks per step.

    admission:  GrammarCompiler.compile(Grammar) -> CompiledGrammar   (cached by (kind, spec); a schema
                feature it cannot enforce -> EngineRequestError INVALID_REQUEST naming it and the param)
    each step:  rows that sample and have a grammar -> GrammarMatcher.fill (batched, in the engine thread)
                -> apply_token_bitmask_inplace: disallowed logits -> -inf, before argmax / sampling
    after it:   matcher.accept(token); terminated (it took its stop token) -> the sequence ends, STOP

Letters: B = sequences in the step, V = the logits' width (the model's padded vocabulary), W = ceil(V/32).
The tokenizer information is the tokenizer's own vocabulary at the model's padded width: ids past the
tokenizer (padding rows of the embedding) are never allowed. A sequence's matcher is built at its first
sample and dropped when it is preempted; the next sample rebuilds it and re-advances it over the tokens
already generated, so a recomputed sequence goes on in the same grammar state.

Library: xgrammar (not llguidance): its structural tags express Qwen3-Coder's XML tool calls with JSON
schema values, its masks are precomputed per grammar state (a step's fill takes microseconds per row),
and its token-bitmask kernel applies on CPU and CUDA logits alike.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from nextserve.cluster.engine.contract import EngineRequestError, Grammar, GrammarKind
from nextserve.cluster.engine.json_schema_support import UnsupportedSchemaError, check_schema, enforceable
from nextserve.cluster.engine.tool_call_grammar import tool_call_tag

MAX_CACHED_GRAMMARS = 256
"""Compiled grammars kept (least recently used dropped): an agent's tools repeat every turn."""
_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")
"""xgrammar's "[time] file.cc:line: " before its message: internals, not for the client."""
_MATCHER_THREADS = min(4, os.cpu_count() or 1)
"""Threads of compilation (a large schema's token masks are computed in parallel)."""


class GrammarCompiler:
    """Compiles request grammars against one tokenizer at the model's vocabulary width; thread-safe."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        """`vocab_size`: the logits' width (the model's padded vocabulary, >= the tokenizer's)."""
        if len(tokenizer) > vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's {vocab_size} "
                             f"logits: a grammar could allow a token the model cannot produce")
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=_MATCHER_THREADS, cache_enabled=False)
        self._cache: OrderedDict[tuple[GrammarKind, str], xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, grammar: Grammar) -> xgr.CompiledGrammar:
        """The compiled grammar, or EngineRequestError naming what cannot be enforced and `grammar.param`."""
        key = (grammar.kind, grammar.spec)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            compiled = self._compile(grammar)
        except UnsupportedSchemaError as e:
            raise EngineRequestError(str(e), param=grammar.param) from None
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's parse / conversion errors
            first = _LOG_PREFIX.sub("", str(e).strip().splitlines()[-1]) if str(e).strip() else type(e).__name__
            raise EngineRequestError(f"the {grammar.kind.value} grammar cannot be built: {first}; fix or simplify "
                                     f"it", param=grammar.param) from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, grammar: Grammar) -> xgr.CompiledGrammar:
        if grammar.kind is GrammarKind.JSON_OBJECT:
            return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if grammar.kind is GrammarKind.REGEX:
            return self._compiler.compile_regex(grammar.spec)
        spec = json.loads(grammar.spec)
        if grammar.kind is GrammarKind.JSON_SCHEMA:
            check_schema(spec, grammar.param)
            return self._compiler.compile_json_schema(json.dumps(enforceable(spec)), any_whitespace=False,
                                                      strict_mode=True)
        tag = tool_call_tag(spec["tools"], spec.get("name"), bool(spec.get("parallel", True)), grammar.param)
        return self._compiler.compile_structural_tag(tag)

    def matcher(self, compiled: xgr.CompiledGrammar, output_ids: Sequence[int]) -> xgr.GrammarMatcher:
        """A matcher at the start of the output, advanced over `output_ids` (a recomputed sequence's)."""
        matcher = xgr.GrammarMatcher(compiled)
        for token in output_ids:
            if not matcher.accept_token(token):
                raise RuntimeError(f"token {token} of an output the grammar produced is refused on replay")
        return matcher


class GrammarMasks:
    """The per-step masking of a batch's constrained rows (engine thread only)."""

    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        # One thread: a row's fill takes microseconds, and handing rows to a pool costs scheduling waits
        # on a busy host (bench grammar on 2 loaded cores: TPOT ratio 1.45 with a pool of 2).
        self._batch = xgr.BatchGrammarMatcher(max_threads=1)
        self._bitmask = xgr.allocate_token_bitmask(1, compiler.vocab_size)  # [B, W], grown as needed

    def apply(self, logits: torch.Tensor, rows: list[int], matchers: list[xgr.GrammarMatcher]) -> None:
        """logits [B, V]: rows[i]'s disallowed tokens -> -inf by matchers[i], in place; other rows untouched."""
        num_rows = logits.shape[0]
        if self._bitmask.shape[0] < num_rows:
            self._bitmask = xgr.allocate_token_bitmask(num_rows, self.compiler.vocab_size)
        bitmask = self._bitmask[:num_rows]
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                        vocab_size=self.compiler.vocab_size, indices=rows)
