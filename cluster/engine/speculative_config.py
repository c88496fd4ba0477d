"""`--speculative-config`: which drafter proposes tokens, how many per step, and when drafting stops paying.

The JSON a client of `nextserve up` (or a RayService's serveConfigV2 `args`) writes, in vLLM's spelling:

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    {"method": "mtp", "num_speculative_tokens": 1}

parsed once (`SpeculativeConfig.from_json`) into a frozen config; a bad document names the field and
the fix (SpeculativeConfigError).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, fields
from typing import Any


class SpeculativeConfigError(ValueError):
    """A --speculative-config document the server cannot run: the message names the field and the fix."""


class SpeculativeMethod(enum.Enum):
    NGRAM = "ngram"
    """Drafts looked up in the sequence's own prompt + output (prompt lookup)."""
    MTP = "mtp"
    """The checkpoint's multi-token-prediction layer (`mtp.*` weights) drafts."""


DEFAULT_DISABLE_BY_BATCH_SIZE = 8
"""Sequences running at once above which no sequence is drafted. Measured (`nextserve bench spec
--step-cost`, tiny default, 2 shared CPU cores, docs/BENCHMARKS.md): a step of B verify chunks (k = 4)
costs 1.7x a step of B decodes at B = 1, 2.0x at 2-4 and 2.5x from B = 8 on, so a verify step must yield
2.5 tokens (1.5 accepted drafts) to pay from 8 sequences up, against 1.7 alone: past 8 the batch
already amortises the per-step round trips that drafts would otherwise divide."""


@dataclass(frozen=True)
class SpeculativeConfig:
    method: SpeculativeMethod
    num_speculative_tokens: int
    """K: draft tokens proposed per sequence and step; a verify step runs K + 1 positions per sequence."""
    prompt_lookup_min: int = 1
    """ngram: the shortest suffix of the sequence looked up in its earlier tokens."""
    prompt_lookup_max: int = 4
    """ngram: the longest suffix looked up first (longest match wins, then shorter ones down to min)."""
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE
    """No drafting while more than this many sequences run (see DEFAULT_DISABLE_BY_BATCH_SIZE)."""

    def __post_init__(self) -> None:
        if not 1 <= self.num_speculative_tokens <= 16:
            raise SpeculativeConfigError(f"num_speculative_tokens must be in [1, 16], got "
                                         f"{self.num_speculative_tokens}; 3-5 suit n-gram drafts")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise SpeculativeConfigError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                                         f"prompt_lookup_min={self.prompt_lookup_min}, "
                                         f"prompt_lookup_max={self.prompt_lookup_max}")
        if self.disable_by_batch_size < 1:
            raise SpeculativeConfigError(f"disable_by_batch_size must be >= 1, got {self.disable_by_batch_size}")

    @classmethod
    def from_json(cls, text: str) -> SpeculativeConfig:
        """Parse the --speculative-config document (SpeculativeConfigError naming the field and the fix)."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpeculativeConfigError(f"--speculative-config is not JSON ({exc.msg} at character {exc.pos}); "
                                         f"write e.g. '{{\"method\": \"ngram\", \"num_speculative_tokens\": 4}}'")
        if not isinstance(doc, dict):
            raise SpeculativeConfigError(f"--speculative-config must be a JSON object, got {type(doc).__name__}")
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SpeculativeConfig:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(doc) - set(names))
        if unknown:
            raise SpeculativeConfigError(f"--speculative-config has unknown fields {unknown}; known: {names}")
        methods = [m.value for m in SpeculativeMethod]
        if doc.get("method") not in methods:
            raise SpeculativeConfigError(f"--speculative-config method must be one of {methods}, got "
                                         f"{doc.get('method')!r}")
        if "num_speculative_tokens" not in doc:
            raise SpeculativeConfigError("--speculative-config needs num_speculative_tokens (draft tokens per "
                                         "step, e.g. 4)")
        method = SpeculativeMethod(doc["method"])
        ngram_only = sorted({"prompt_lookup_min", "prompt_lookup_max"} & set(doc))
        if method is not SpeculativeMethod.NGRAM and ngram_only:
            raise SpeculativeConfigError(f"{ngram_only} apply to method 'ngram' only; drop them for {method.value!r}")
        for name in set(names) - {"method"}:
            if name in doc and (not isinstance(doc[name], int) or isinstance(doc[name], bool)):
                raise SpeculativeConfigError(f"--speculative-config {name} must be an integer, got {doc[name]!r}")
        values = {k: v for k, v in doc.items() if k != "method"}
        if method is SpeculativeMethod.NGRAM and "prompt_lookup_min" in doc and "prompt_lookup_max" not in doc:
            values["prompt_lookup_max"] = max(doc["prompt_lookup_min"], cls.prompt_lookup_max)
        return cls(method=method, **values)

    def to_json(self) -> str:
        doc: dict[str, Any] = {"method": self.method.value, "num_speculative_tokens": self.num_speculative_tokens,
                               "disable_by_batch_size": self.disable_by_batch_size}
        if self.method is SpeculativeMethod.NGRAM:
            doc.update(prompt_lookup_min=self.prompt_lookup_min, prompt_lookup_max=self.prompt_lookup_max)
        return json.dumps(doc)
