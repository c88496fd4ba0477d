"""The engine's contract: what a head engine takes, what it streams back, what it reports and how it refuses.

    EngineRequest(request_id, prompt_ids, SamplingParams(..., stop=...),   -> Engine.generate / HeadDeployment
                  grammar=Grammar(...) | None)                             (what the output must parse as)
        -> StepOutput ... StepOutput(finish_reason=FinishReason.*)         (what a request produced, in order)
        or EngineError(code=ErrorCode.*, param=...)                        (typed: the gateway maps the code;
                                                                            OVERLOADED: the head's queue is full)
    EngineStats                                                            (what a head reports for /metrics)

Every object here crosses Ray between a gateway replica and a head replica as itself (Ray pickles it),
never as a dict. The gateway imports the engine through this module only; `Engine.admit` is the one place
the serving rules live, and its refusals carry a code and the offending field, so an API maps them by
type (never by reading the message). Fields later features add to a request (grammar, speculation)
go on EngineRequest or SamplingParams, here (the grammar is EngineRequest.grammar); the tenant (who
sent it, from the gateway's authentication) and the client's cache salt are on EngineRequest.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import KW_ONLY, dataclass, field

from nextserve.model.sampling import SamplingDefaults, SamplingError, SamplingParams, TokenLogprobs

__all__ = ["EngineError", "EngineOverloadedError", "EngineRequest", "EngineRequestError", "EngineStats",
           "EngineUnavailableError", "ErrorCode", "FinishReason", "Grammar", "GrammarKind", "LOAD_FIELDS",
           "RETRY_AFTER_S", "SamplingDefaults", "SamplingError", "SamplingParams", "StepOutput", "TokenLogprobs", "check_prompt_fits", "summed_load"]


class GrammarKind(enum.Enum):
    """What a grammar enforces on a request's output (cluster/engine/grammar.py compiles each)."""
    JSON_SCHEMA = "json_schema"
    """One JSON value valid against `Grammar.spec` (a JSON Schema, as JSON text)."""
    JSON_OBJECT = "json_object"
    """Any JSON object."""
    TOOL_CALLS = "tool_calls"
    """After the prompt's forced opening `<tool_call>\\n<function=`: Qwen3-Coder XML calls of the tools in
    `Grammar.spec` ({"tools": [OpenAI function tools], "name": forced name or null, "parallel": bool}), each
    call's parameters valid against its tool's schema; then the end of the output."""
    REGEX = "regex"
    """The whole output matches the regular expression `Grammar.spec` (tests and benchmarks)."""


@dataclass(frozen=True, slots=True)
class Grammar:
    """What a request's output must parse as, enforced token by token: each step only tokens the grammar
    allows can be sampled, and the sequence ends (FinishReason.STOP) when the grammar is complete and
    emits its stop token. Hashable: the engine caches compiled grammars by (kind, spec)."""
    kind: GrammarKind
    spec: str = ""
    """JSON text (a schema, the tool-call structure) or a regex, by `kind`; "" for JSON_OBJECT."""
    param: str = "response_format"
    """The request field the grammar came from: what a refused grammar's EngineError names."""


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One sequence to generate: the one argument of every `generate` between the gateway and the engine."""
    request_id: str
    """Unique among the requests in flight on an engine (the gateway's response id, "-i" per choice)."""
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    """How to sample and when to stop (stop strings and stop token ids included)."""
    _: KW_ONLY  # what follows is named at every call: features add fields here without shifting any
    tenant: str = ""
    """Who sent it, as the gateway authenticated the API key (its keys file's TENANT; "" on a server
    without keys): never a value the client names. Roots its prefix-cache keys (a tenant never hits
    another's blocks or snapshots) and is its queue in the head's fair admission."""
    tenant_weight: float = 1.0
    """The tenant's share of admissions (WEIGHT in the keys file): a weight-2 tenant is admitted twice the
    prompt tokens of a weight-1 one while both wait."""
    cache_salt: str = ""
    """The client's optional `cache_salt`: narrows its prefix-cache sharing within its tenant (requests
    share cached blocks only when tenant and salt are equal)."""
    prompt_cache_key: str = ""
    """The client's session key (Responses' `prompt_cache_key`, Codex's session id): hashed into the head
    replica's routing key with the prompt's first tokens (cluster/deployments/prefix_router.py), so one
    session's turns land on one head while sessions sharing a system prompt spread. Never a cache key."""
    allow_speculation: bool = True
    """Draft and verify this request's tokens when the server speculates (--speculative-config); False:
    one token per step, as without speculation (the output is the same either way)."""
    grammar: Grammar | None = None
    """What the output must parse as (structured outputs, forced tool calls); None: free text. Compiled at
    admission: a grammar the engine cannot enforce is refused (INVALID_REQUEST naming `grammar.param`)."""
    trace_context: str = ""
    """The W3C traceparent of the gateway's span of this request (cluster/tracing.py), when the server
    traces (--otlp-traces-endpoint); the head's span continues that trace. "": not traced."""

    def __post_init__(self) -> None:
        if not self.tenant_weight > 0:
            raise ValueError(f"tenant_weight must be > 0, got {self.tenant_weight} (tenant {self.tenant!r})")


class FinishReason(enum.Enum):
    """Values are OpenAI's `finish_reason` strings (abort has none there; each API maps it)."""
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(slots=True)
class StepOutput:
    """What a request produced since its consumer's previous item."""
    request_id: str
    token_ids: list[int]
    text: str
    """Text delta; never ends inside a multi-byte character, never includes a stop string."""
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprobs] | None = None
    """One per token of `token_ids`, when the request asked for logprobs."""
    stop_string: str | None = None
    """The stop string that ended the request (finish_reason STOP by a stop string, not a stop token)."""
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (not prefilled), as prompt_tokens on every output."""

    def merge(self, later: StepOutput) -> StepOutput:
        logprobs = None if self.logprobs is None and later.logprobs is None else \
            (self.logprobs or []) + (later.logprobs or [])
        return StepOutput(self.request_id, self.token_ids + later.token_ids, self.text + later.text,
                          later.finish_reason, later.prompt_tokens, later.completion_tokens, logprobs,
                          later.stop_string, later.cached_tokens)


class ErrorCode(enum.Enum):
    """Why the engine refused or ended a request; each API turns the code into its status and error type."""
    INVALID_REQUEST = "invalid_request"
    """The request breaks a serving rule (a field's value): the client's mistake, 400."""
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    """The prompt (+ max_tokens) does not fit the server's context or cache: the client's mistake, 400."""
    UNAVAILABLE = "unavailable"
    """The cluster cannot serve it now (experts without a live worker, a lost head, shutting down): 503,
    retrying later can succeed."""
    INTERNAL = "internal"
    """A step failed for a reason that is not the client's: 500."""
    OVERLOADED = "overloaded"
    """The head's queue is full (`max_queued_requests` waiting): 429 (Anthropic: 529), refused at once,
    with Retry-After; nothing was started, so retrying later is safe."""
    RATE_LIMITED = "rate_limited"
    """The client's tenant is over its concurrency or tokens-per-minute limit: 429 with Retry-After
    (EngineError.retry_after_s); nothing was started."""
    CLIENT_TIMEOUT = "client_timeout"
    """The client read nothing of its stream for `stream_idle_timeout_s`: treated as gone, 408 (nobody
    usually reads it; the request was aborted and its slot and blocks freed)."""

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]

    @property
    def is_client_error(self) -> bool:
        return self.http_status < 500


_HTTP_STATUS = {ErrorCode.INVALID_REQUEST: 400, ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
                ErrorCode.UNAVAILABLE: 503, ErrorCode.INTERNAL: 500, ErrorCode.OVERLOADED: 429,
                ErrorCode.RATE_LIMITED: 429, ErrorCode.CLIENT_TIMEOUT: 408}

RETRY_AFTER_S = 1
"""The `Retry-After` (seconds) a client is told with a refusal it may retry (429, 503, 529) when the
refusal names no time of its own (EngineError.retry_after_s): a queue drains by whole requests, so
sooner only meets the same full queue; the SDKs back off from there."""


class EngineError(Exception):
    """The engine refused or could not finish a request. `message` is for the client: it names the bad
    value and the fix, never internals (no tracebacks, pids, addresses). `param` names the request field
    at fault ("prompt", "max_tokens", "stop", "request_id", a sampling field), None when no field is."""
    default_code = ErrorCode.INTERNAL

    def __init__(self, message: str, *, param: str | None = None, code: ErrorCode | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"{param}: {message}" if param else message)
        self.message, self.param = message, param
        self.code = code or self.default_code
        self.retry_after_s = retry_after_s
        """When retrying can succeed (OVERLOADED): the seconds to wait, sent as Retry-After."""

    def __reduce__(self) -> tuple[object, ...]:  # crosses Ray as itself, with its code and field
        return _rebuild_error, (type(self), self.message, self.param, self.code, self.retry_after_s)


def _rebuild_error(kind: type[EngineError], message: str, param: str | None, code: ErrorCode,
                   retry_after_s: float | None = None) -> EngineError:
    return kind(message, param=param, code=code, retry_after_s=retry_after_s)


class EngineRequestError(EngineError, ValueError):
    """A request the engine will not serve as sent (a 4xx): `param` names the field."""
    default_code = ErrorCode.INVALID_REQUEST


class EngineUnavailableError(EngineError):
    """The request could not run because part of the cluster is not there now (503; retry later)."""
    default_code = ErrorCode.UNAVAILABLE


class EngineOverloadedError(EngineError):
    """The head's waiting queue is full: refused before it was queued (429 with Retry-After)."""
    default_code = ErrorCode.OVERLOADED


def check_prompt_fits(num_prompt_tokens: int, max_model_len: int) -> None:
    """The one rule for a prompt against the context: it must leave room for one output token. Both the
    engine (`Engine.admit`) and the gateway (before it ships a request to a head) apply it."""
    if num_prompt_tokens >= max_model_len:
        raise EngineRequestError(f"the prompt has {num_prompt_tokens} tokens, leaving no room for output in this "
                                 f"server's context of {max_model_len} tokens; shorten it to at most "
                                 f"{max_model_len - 1}", param="prompt", code=ErrorCode.CONTEXT_LENGTH_EXCEEDED)


LOAD_FIELDS = ("num_running", "num_waiting", "blocks_used", "blocks_total", "slots_used", "slots_total",
               "num_preemptions", "blocks_cached", "prefix_cache_queried_tokens", "prefix_cache_hit_tokens",
               "spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")
"""The EngineStats fields a head publishes with its heartbeat and the gateway sums over heads."""


@dataclass(frozen=True, slots=True)
class EngineStats:
    """What a head reports about itself at each scrape of /metrics (the gateway turns it into Prometheus
    series, cluster/gateway/metrics.py).

    The dispatch fields are deltas drained on every call: behind a Ray handle each call may land on a
    different head replica, so cumulative values would jump between replicas, while drained deltas add up
    to the right totals whichever gateway replica pulls them. The load fields (`LOAD_FIELDS`: queue, cache
    usage, preemptions since start) describe the one head that answered; each head also publishes them with
    its heartbeat (`load_fields`), and the gateway sums them over the live heads (`summed_load`)."""
    num_running: int = 0
    """Sequences in the running batch now."""
    num_waiting: int = 0
    """Sequences admitted but not yet running (preempted ones included)."""
    num_steps: int = 0
    """Batched forward steps run since start."""
    dispatch_latency_s: dict[int, list[float]] = field(default_factory=dict)
    """MoE layer -> one dispatch round's latency per sample, observed since the previous call."""
    expert_tokens: dict[tuple[int, int], int] = field(default_factory=dict)
    """(layer, expert) -> tokens routed to it since the previous call."""
    blocks_used: int = 0
    """KV blocks held by running sequences now."""
    blocks_total: int = 0
    """KV blocks of the cache (its budget's, fixed at start)."""
    slots_used: int = 0
    """DeltaNet state slots held by running sequences now."""
    slots_total: int = 0
    """State slots of the cache: the most sequences that can run at once."""
    num_preemptions: int = 0
    """Sequences preempted (blocks taken back, recomputed later) since this head started."""
    blocks_cached: int = 0
    """KV blocks no running sequence holds, kept for the prefix cache (evicted when blocks run out):
    blocks_used + blocks_cached + free blocks = blocks_total."""
    snapshots_used: int = 0
    """Prefix-cache state snapshots holding a state now."""
    snapshots_total: int = 0
    """Snapshots of the cache (its budget's share, fixed at start; 0 without a prefix cache)."""
    prefix_cache_queried_tokens: int = 0
    """Tokens to prefill that admissions looked up in the prefix cache since start (readmissions too)."""
    prefix_cache_hit_tokens: int = 0
    """Of those, tokens found there and not run."""
    spec_decode_num_drafts: int = 0
    """Speculative decoding since start: verify chunks run (a sequence's step with >= 1 draft token)."""
    spec_decode_num_draft_tokens: int = 0
    """Draft tokens verified since start."""
    spec_decode_num_accepted_tokens: int = 0
    """Of those, accepted. Mean accepted length per verify step = 1 + accepted / drafts (vLLM's)."""
    spec_decode_num_accepted_tokens_per_pos: tuple[int, ...] = ()
    """Drafts accepted at each draft position (0: the first) since start; of the head that answered."""

    def load_fields(self) -> dict[str, int]:
        """The load fields, for the head's registry entry."""
        return {name: getattr(self, name) for name in LOAD_FIELDS}


def summed_load(heads: Iterable[Mapping[str, str]]) -> dict[str, int]:
    """The load fields summed over heads' registry entries (a field a head lacks counts 0)."""
    heads = list(heads)
    return {name: sum(int(h.get(name, 0)) for h in heads) for name in LOAD_FIELDS}
