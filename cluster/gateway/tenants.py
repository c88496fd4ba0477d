"""Tenants: who an API key belongs to, what share of the heads they get, and how much they may use.

    keys file (--api-keys-file; a Secret mounted as a file on Kubernetes), one key a line:
        KEY TENANT [WEIGHT]        # WEIGHT > 0, default 1; blank lines and `#` comments are skipped
    Authorization: Bearer KEY -> TenantDirectory.authenticate -> Caller(tenant, cache_salt, quota)
        -> EngineRequest(tenant=, tenant_weight=, cache_salt=)      (prefix cache salt, fair admission)
        -> TenantQuota.acquire: over the tenant's concurrent requests or tokens per minute -> 429 + Retry-After

A tenant is named by the file only (never by a client), so the tenant label of /metrics has as many values
as the file has tenants. `--api-key KEY` is the one-tenant shorthand (tenant DEFAULT_TENANT), as is a
server without keys. Limits hold per gateway replica: with G replicas a tenant may use up to G times them.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nextserve.cluster.engine.contract import EngineError, ErrorCode

DEFAULT_TENANT = "default"
"""The tenant of `--api-key` and of a server without keys."""
CONCURRENCY_RETRY_AFTER_S = 1.0
"""Retry-After of a refusal for concurrency: when a request of the tenant's may have finished."""


class ApiKeysFileError(ValueError):
    """The keys file does not parse: the message names the file, the line and the fix."""


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    weight: float = 1.0
    """Share of the heads' admissions relative to other tenants (EngineRequest.tenant_weight)."""


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """What each tenant may use of one gateway replica; None: unlimited."""
    max_concurrent_requests: int | None = None
    """Requests in flight at once (a request with n choices counts once)."""
    tokens_per_minute: int | None = None
    """Prompt + generated tokens per minute (a token bucket refilled continuously; a request is admitted
    while the bucket is not empty, and its tokens are taken as they are counted)."""

    def __post_init__(self) -> None:
        for name in ("max_concurrent_requests", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None (unlimited), got {value}")


def parse_api_keys(text: str, source: str = "<keys>") -> dict[str, Tenant]:
    """Key -> tenant from the keys file's text. A line that does not parse, a key given twice, or one
    tenant given two weights is an ApiKeysFileError naming `source` and the line number (never the key)."""
    tenants: dict[str, Tenant] = {}
    weight_of: dict[str, tuple[float, int]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{source} line {number}"
        if len(words) not in (2, 3):
            raise ApiKeysFileError(f"{where}: expected 'KEY TENANT [WEIGHT]', got {len(words)} fields")
        key, name = words[0], words[1]
        weight = _weight(words[2], where) if len(words) == 3 else 1.0
        if key in tenants:
            raise ApiKeysFileError(f"{where}: this key is already given to tenant {tenants[key].name!r}; "
                                   f"each key belongs to one tenant")
        if name in weight_of and weight_of[name][0] != weight:
            previous, line_no = weight_of[name]
            raise ApiKeysFileError(f"{where}: tenant {name!r} has weight {weight:g} here and {previous:g} on "
                                   f"line {line_no}; give every key of a tenant the same weight")
        weight_of.setdefault(name, (weight, number))
        tenants[key] = Tenant(name, weight)
    if not tenants:
        raise ApiKeysFileError(f"{source}: no keys; write one 'KEY TENANT [WEIGHT]' per line")
    return tenants


def _weight(word: str, where: str) -> float:
    try:
        weight = float(word)
    except ValueError:
        raise ApiKeysFileError(f"{where}: WEIGHT {word!r} is not a number; give a number > 0 or leave it out "
                               f"(1)") from None
    if not (weight > 0 and math.isfinite(weight)):
        raise ApiKeysFileError(f"{where}: WEIGHT must be a finite number > 0, got {word}")
    return weight


def load_api_keys(path: str | Path) -> dict[str, Tenant]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ApiKeysFileError(f"cannot read the API keys file {str(path)!r}: {exc.strerror}; pass the path of "
                               f"a file of 'KEY TENANT [WEIGHT]' lines") from None
    return parse_api_keys(text, str(path))


@dataclass
class TenantQuota:
    """One tenant's use of this gateway replica against its limits."""
    tenant: Tenant
    limits: TenantLimits
    clock: Callable[[], float] = time.monotonic
    in_flight: int = 0
    tokens: float = field(init=False)
    """The token bucket: starts full; below 0 when requests used more than was left."""
    _refilled_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = float(self.limits.tokens_per_minute or 0)
        self._refilled_s = self.clock()

    def acquire(self) -> None:
        """Count one more request in flight, or raise EngineError RATE_LIMITED with its retry_after_s (the
        message names the limit and when to retry)."""
        limits = self.limits
        if limits.max_concurrent_requests is not None and self.in_flight >= limits.max_concurrent_requests:
            raise EngineError(f"tenant {self.tenant.name!r} has {self.in_flight} requests in flight, its limit "
                              f"(max_concurrent_requests); retry after one finishes",
                              code=ErrorCode.RATE_LIMITED, retry_after_s=CONCURRENCY_RETRY_AFTER_S)
        if limits.tokens_per_minute is not None:
            self._refill()
            if self.tokens <= 0:
                wait_s = max(1.0, -self.tokens / (limits.tokens_per_minute / 60.0))
                raise EngineError(f"tenant {self.tenant.name!r} used its {limits.tokens_per_minute} tokens per "
                                  f"minute; retry in {math.ceil(wait_s)} s", code=ErrorCode.RATE_LIMITED,
                                  retry_after_s=wait_s)
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    def charge(self, num_tokens: int) -> None:
        """Take tokens a request used (prompt or generated) from the bucket."""
        if self.limits.tokens_per_minute is not None:
            self._refill()
            self.tokens -= num_tokens

    def _refill(self) -> None:
        now, capacity = self.clock(), float(self.limits.tokens_per_minute or 0)
        self.tokens = min(capacity, self.tokens + (now - self._refilled_s) * capacity / 60.0)
        self._refilled_s = now


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent an API request, as authenticated: what start_choices puts on its engine requests."""
    tenant: Tenant
    quota: TenantQuota | None = None
    """The tenant's quota on this replica; None: no limits."""
    cache_salt: str = ""
    """The request's own `cache_salt` (narrows its prefix-cache sharing within the tenant)."""


class TenantDirectory:
    """Keys -> callers, compared in constant time against every key (the time taken says nothing about
    which key, or how much of one, matched)."""

    def __init__(self, keys: Mapping[str, Tenant], limits: TenantLimits | None = None,
                 is_open: bool = False) -> None:
        """`is_open`: no key needed, every request is the first tenant's (a server without keys)."""
        self.limits, self.is_open = limits or TenantLimits(), is_open
        self._keys = [(key.encode(), tenant) for key, tenant in keys.items()]
        self.quotas = {t.name: TenantQuota(t, self.limits) for _, t in self._keys}
        """Tenant name -> its quota (the names also bound the /metrics tenant label)."""
        self.has_limits = self.limits != TenantLimits()

    @classmethod
    def single(cls, api_key: str | None, limits: TenantLimits | None = None) -> TenantDirectory:
        """`--api-key` (or no key): one tenant, DEFAULT_TENANT."""
        return cls({api_key or "": Tenant(DEFAULT_TENANT)}, limits, is_open=api_key is None)

    @property
    def tenant_names(self) -> list[str]:
        return sorted(self.quotas)

    def caller(self, tenant: Tenant) -> Caller:
        return Caller(tenant, self.quotas[tenant.name] if self.has_limits else None)

    def authenticate(self, token: str) -> Caller | None:
        """The caller a key belongs to, or None for an unknown key."""
        given, found = token.encode(), None
        for key, tenant in self._keys:
            if hmac.compare_digest(given, key) and found is None:
                found = tenant
        return None if found is None else self.caller(found)

    def open_caller(self) -> Caller:
        """The caller of a request on a server without keys."""
        return self.caller(self._keys[0][1])
