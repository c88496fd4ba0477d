"""Token sampling: greedy, temperature, top-k, top-p, with a per-sequence seeded generator; logprobs;
a constraint on how an output starts.

Letters: V = vocab. Logits are sampled in fp32; the same seed and logits give the same token.
Logprobs are the log-softmax of the raw logits (before temperature, top-k/top-p and any constraint),
as vLLM reports them by default.

`sample` is total: for any logits row (NaN, +-inf included) and any valid params (top_p tiny, top_k past
V, temperature huge or tiny) it returns a token id in [0, V) and never raises. A temperature below
TEMPERATURE_FLOOR samples greedily (dividing by it would overflow fp32), as vLLM does. NaN logits count as
-inf; +inf logits are the only candidates when present; a row with no finite candidate gives argmax.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor


TEMPERATURE_FLOOR = 1e-5
"""Temperatures below this are greedy (vLLM's _SAMPLING_EPS): logits / 1e-300 overflows fp32 to inf."""
LOGPROB_FLOOR = -9999.0
"""The logprob reported for a token of probability 0 (JSON cannot carry -inf)."""
SEED_MIN, SEED_END = -(2**63), 2**64
"""Seeds a torch generator accepts: [SEED_MIN, SEED_END); a negative seed s seeds as s + 2**64."""


class SamplingError(ValueError):
    """Sampling parameters a client sent that cannot be honoured; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int | None = None
    """Tokens to generate at most; None: as many as the context leaves (the engine resolves it)."""
    temperature: float = 0.0
    """0 (or anything below TEMPERATURE_FLOOR) means greedy (argmax)."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    seed: int | None = None
    """In [-2**63, 2**64): what a torch generator accepts."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    """None: no logprobs; k >= 0: each output token's logprob and its k most likely alternatives."""
    allowed_starts: tuple[tuple[int, ...], ...] = ()
    """When set, the output starts with one of these token sequences (the tokens are constrained until
    one is complete): how a server forces a tool call's function name."""
    stop: tuple[str, ...] = ()
    """Stop strings: the text ends just before the first one found (it is not included). Their count and
    length are serving rules, checked by the engine's admission (cluster/engine/engine.py)."""

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        if not self.temperature >= 0 or math.isinf(self.temperature):  # NaN fails the comparison
            raise SamplingError(f"temperature must be a finite number >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 disables it), got {self.top_k}", "top_k")
        if self.seed is not None and not SEED_MIN <= self.seed < SEED_END:
            raise SamplingError(f"seed must be in [-2**63, 2**64), got {self.seed}", "seed")
        if self.logprobs is not None and self.logprobs < 0:
            raise SamplingError(f"logprobs must be >= 0 (alternatives per token), got {self.logprobs}", "logprobs")
        if any(not start for start in self.allowed_starts):
            raise SamplingError("allowed_starts must hold non-empty token sequences", "allowed_starts")

    def seed_offset(self, i: int) -> SamplingParams:
        """These params seeded with seed + i, wrapped to stay in [-2**63, 2**64) (choice i of n)."""
        if self.seed is None:
            return self
        seed = self.seed + i
        return replace(self, seed=seed - SEED_END if seed >= SEED_END else seed)

    def constrained_to(self, starts: tuple[tuple[int, ...], ...]) -> SamplingParams:
        return replace(self, allowed_starts=starts)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < TEMPERATURE_FLOOR


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """What a request that leaves temperature / top_p / top_k unset samples with: the checkpoint's
    generation_config.json (Qwen3-Coder-Next: 1.0 / 0.95 / 40), else OpenAI's defaults."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path) -> SamplingDefaults:
        path = Path(model_dir) / "generation_config.json"
        config = json.loads(path.read_text()) if path.exists() else {}
        base = cls()
        return cls(temperature=float(config.get("temperature", base.temperature)),
                   top_p=float(config.get("top_p", base.top_p)), top_k=max(int(config.get("top_k") or 0), 0))


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """The most likely (token id, logprob) pairs at this position, best first."""


def token_logprobs(logits: Tensor, token_id: int, k: int) -> TokenLogprobs:
    """logits [V] (raw) -> the sampled token's logprob and the top-k alternatives (never NaN: NaN logits
    count as -inf, +inf as the largest float; an impossible token reports LOGPROB_FLOOR, as vLLM does, since
    JSON has no -inf)."""
    finite = logits.float().nan_to_num(nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    logprobs = torch.log_softmax(finite, dim=-1).nan_to_num(nan=LOGPROB_FLOOR).clamp(min=LOGPROB_FLOOR)
    top = torch.topk(logprobs, k) if k else None
    pairs = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
    return TokenLogprobs(token_id, float(logprobs[token_id]), pairs)


def allowed_next_tokens(output_ids: list[int], starts: tuple[tuple[int, ...], ...]) -> list[int] | None:
    """The tokens that keep the output on one of `starts`; None once a start is complete (or none fits)."""
    n = len(output_ids)
    if any(tuple(output_ids[:len(s)]) == s for s in starts):
        return None
    allowed = sorted({s[n] for s in starts if len(s) > n and s[:n] == tuple(output_ids)})
    return allowed or None


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.is_greedy:
        return None
    gen = torch.Generator()
    gen.manual_seed(params.seed % SEED_END if params.seed is not None else torch.seed())
    return gen


def _cleaned(logits: Tensor) -> Tensor:
    """logits [V] in fp32 with NaN as -inf; when any is +inf, those are the only (equal) candidates."""
    logits = logits.float().nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    is_posinf = logits == float("inf")
    if bool(is_posinf.any()):  # overflowed logits: the overflowed tokens are the candidates, equally likely
        logits = torch.where(is_posinf, 0.0, float("-inf"))
    return logits


def sampling_distribution(logits: Tensor, params: SamplingParams) -> Tensor | None:
    """logits [V] -> the weights [V] `sample` draws from in proportion (temperature, top-k, top-p applied;
    not renormalised after top-p), or None when it takes the argmax instead (greedy, or no finite candidate)."""
    logits = _cleaned(logits)
    if params.is_greedy or not bool(torch.isfinite(logits).any()):
        return None
    logits = logits / params.temperature
    logits = logits.nan_to_num(nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        drop = cum - sorted_probs > params.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    probs = probs.nan_to_num(nan=0.0)
    return probs if bool((probs > 0).any()) else None


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [V] -> one token id in [0, V); never raises, whatever the logits hold (see the module doc)."""
    probs = sampling_distribution(logits, params)
    if probs is None:
        return int(torch.argmax(_cleaned(logits)))
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def verify_draft(logits: Tensor, draft: int, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The token at a drafted position: logits [V] there, `draft` proposed deterministically (an n-gram's
    point mass q). Speculative sampling's rule for such a q: accept it with probability p(draft), else
    sample from the residual max(p - q, 0), which is p without the draft, renormalised; the token is so
    distributed exactly as `sample` would draw it. Greedy: the argmax (the draft only when it is the
    argmax). Returns the draft when accepted, another token otherwise."""
    probs = sampling_distribution(logits, params)
    if probs is None:
        return int(torch.argmax(_cleaned(logits)))
    probs = probs / probs.sum()  # top-p leaves it unnormalised (multinomial does not mind; p(draft) does)
    if float(torch.rand((), generator=generator)) < float(probs[draft]):
        return draft
    residual = probs.clone()
    residual[draft] = 0.0
    if not bool((residual > 0).any()):  # p(draft) is 1 up to rounding
        return draft
    return int(torch.multinomial(residual.cpu(), 1, generator=generator))
