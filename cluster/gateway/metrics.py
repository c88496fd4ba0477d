"""The gateway's Prometheus metrics, in a registry the gateway owns (so two apps in one process don't clash).

Request-level metrics (TTFT, TPOT, latency, tokens) are observed by the gateway as it serves, and only
here; engine-level ones are pulled from the engine's `stats()` (cluster/engine/contract.py) at every
scrape of /metrics and fed in with `observe_engine_stats`; the autoscaling loop's status (heads and
workers current / desired, busy fractions, decisions: cluster/control/scaling_status.py, from Redis) with
`observe_scaling`. Tenant series (`nextserve_tenant_*`) carry a
`tenant` label whose values are the keys file's tenants only (created at start, so they read 0 until used).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nextserve.cluster.control.scaling_status import ScalingStatus
from nextserve.cluster.engine.contract import EngineStats

PREFIX = "nextserve"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""TTFT spans a CPU tiny model (ms) to a queued 80B prefill (tens of seconds)."""
TOKEN_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
"""Per-token latency: ~10-100 ms is the interesting range for a 48-round decode step."""
DISPATCH_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
"""One all-to-all round: ~100 us on loopback up to tens of ms across hosts."""


class TokenCharge(Protocol):
    """What a request's tokens are charged to (a tenant's quota, cluster/gateway/tenants.py)."""
    def charge(self, num_tokens: int) -> None: ...


class GatewayMetrics:
    def __init__(self, tenant_names: Sequence[str] = ()) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tenant_requests = Counter(f"{PREFIX}_tenant_requests", "Generation requests admitted, by tenant",
                                       ["tenant"], registry=r)
        self.tenant_refusals = Counter(f"{PREFIX}_tenant_refusals", "Generation requests refused 429 for the "
                                       "tenant's limits (concurrency, tokens per minute), by tenant", ["tenant"],
                                       registry=r)
        self.tenant_prompt_tokens = Counter(f"{PREFIX}_tenant_prompt_tokens", "Prompt tokens admitted, by tenant",
                                            ["tenant"], registry=r)
        self.tenant_generation_tokens = Counter(f"{PREFIX}_tenant_generation_tokens", "Tokens generated, by "
                                                "tenant", ["tenant"], registry=r)
        for name in tenant_names:
            for counter in (self.tenant_requests, self.tenant_refusals, self.tenant_prompt_tokens,
                            self.tenant_generation_tokens):
                counter.labels(tenant=name)
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests served, by route and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "Time from request arrival to its first generated token",
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.time_per_output_token = Histogram(
            f"{PREFIX}_time_per_output_token_seconds", "Mean time between generated tokens after the first, "
            "one sample per request", buckets=TOKEN_LATENCY_BUCKETS_S, registry=r)
        self.request_latency = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Generation request latency",
                                         buckets=LATENCY_BUCKETS_S, registry=r)
        self.num_running = Gauge(f"{PREFIX}_num_requests_running", "Sequences in the running batch", registry=r)
        self.num_waiting = Gauge(f"{PREFIX}_num_requests_waiting", "Sequences waiting to run", registry=r)
        self.cache_blocks_used = Gauge(f"{PREFIX}_cache_blocks_used", "KV cache blocks held by running sequences",
                                       registry=r)
        self.cache_blocks_total = Gauge(f"{PREFIX}_cache_blocks_total", "KV cache blocks of the heads' budgets",
                                        registry=r)
        self.cache_slots_used = Gauge(f"{PREFIX}_cache_slots_used", "DeltaNet state slots held by running "
                                      "sequences", registry=r)
        self.cache_slots_total = Gauge(f"{PREFIX}_cache_slots_total", "DeltaNet state slots of the heads' budgets",
                                       registry=r)
        self.cache_blocks_cached = Gauge(f"{PREFIX}_cache_blocks_cached", "KV cache blocks no sequence holds, kept "
                                         "for the prefix cache (evicted first when blocks run out)", registry=r)
        self.preemptions = Counter(f"{PREFIX}_num_preemptions", "Sequences preempted for want of cache blocks "
                                   "(recomputed later)", registry=r)
        self.prefix_cache_queries = Counter(f"{PREFIX}_prefix_cache_queries", "Prompt tokens looked up in the "
                                            "heads' prefix caches (hit rate = hits / queries)", registry=r)
        self.prefix_cache_hits = Counter(f"{PREFIX}_prefix_cache_hits", "Prompt tokens served from the heads' "
                                         "prefix caches instead of prefilled", registry=r)
        self.spec_decode_num_drafts = Counter(f"{PREFIX}_spec_decode_num_drafts", "Speculative decoding: verify "
                                              "steps of a sequence with >= 1 draft token", registry=r)
        self.spec_decode_num_draft_tokens = Counter(f"{PREFIX}_spec_decode_num_draft_tokens", "Speculative "
                                                    "decoding: draft tokens verified", registry=r)
        self.spec_decode_num_accepted_tokens = Counter(f"{PREFIX}_spec_decode_num_accepted_tokens", "Speculative "
                                                       "decoding: draft tokens accepted (mean accepted length per "
                                                       "verify step = 1 + accepted / drafts)", registry=r)
        self.spec_decode_num_accepted_tokens_per_pos = Counter(
            f"{PREFIX}_spec_decode_num_accepted_tokens_per_pos", "Speculative decoding: draft tokens accepted at "
            "each draft position (0: the first), of the head that answered the scrape", ["position"], registry=r)
        self._totals_seen: dict[str, int] = {}
        """The heads' summed cumulative counts at the previous scrape: each counter grows by the difference
        (a head that restarts or leaves lowers the sum; the counter then resumes from the new value)."""
        self.dispatch_latency = Histogram(f"{PREFIX}_dispatch_latency_seconds", "Latency of one MoE dispatch "
                                          "round, per layer", ["layer"], buckets=DISPATCH_BUCKETS_S, registry=r)
        self.expert_tokens = Counter(f"{PREFIX}_expert_tokens", "Tokens routed to each expert",
                                     ["layer", "expert"], registry=r)

        self.head_replicas = Gauge(f"{PREFIX}_head_replicas", "Head replicas running", registry=r)
        self.head_replicas_desired = Gauge(f"{PREFIX}_head_replicas_desired", "Head replicas Serve's autoscaler "
                                           "is heading for (running + starting)", registry=r)
        self.expert_workers = Gauge(f"{PREFIX}_expert_workers", "Expert workers of the published placement",
                                    registry=r)
        self.expert_workers_desired = Gauge(f"{PREFIX}_expert_workers_desired", "Expert workers the "
                                            "controller's autoscaling policy decided", registry=r)
        self.worker_busy = Gauge(f"{PREFIX}_expert_worker_busy_fraction", "Share of the last window an expert "
                                 "worker spent computing a Dispatch", ["worker"], registry=r)
        self.worker_inflight = Gauge(f"{PREFIX}_expert_worker_calls_in_flight", "Mean Dispatch calls in flight "
                                     "on an expert worker over the last window (above 1: calls queue)", ["worker"],
                                     registry=r)
        self.scaling_decisions = Gauge(f"{PREFIX}_scaling_decisions", "Scaling decisions applied since the "
                                       "controller started, by pool (heads, workers) and direction (up, down)",
                                       ["pool", "direction"], registry=r)
        self.last_scaling = Gauge(f"{PREFIX}_last_scaling_decision_timestamp_seconds", "When the last scaling "
                                  "decision was made (unix s), with its pool, sizes and reason as labels",
                                  ["pool", "current", "desired", "reason"], registry=r)
        for pool in ("heads", "workers"):
            for direction in ("up", "down"):
                self.scaling_decisions.labels(pool=pool, direction=direction)

    def observe_scaling(self, status: ScalingStatus) -> None:
        self.head_replicas.set(status.heads_current)
        self.head_replicas_desired.set(status.heads_desired)
        self.expert_workers.set(status.workers_current)
        self.expert_workers_desired.set(status.workers_desired)
        for gauge, values in ((self.worker_busy, status.worker_busy), (self.worker_inflight, status.worker_inflight)):
            gauge.clear()  # a retired worker's series leaves with it
            for worker, value in values.items():
                gauge.labels(worker=str(worker)).set(value)
        for key, n in status.decisions.items():
            pool, _, direction = key.partition(":")
            self.scaling_decisions.labels(pool=pool, direction=direction).set(n)
        decision = status.last_decision
        if decision is not None:
            self.last_scaling.clear()  # one series: the last decision
            self.last_scaling.labels(pool=decision.pool, current=str(decision.current), desired=str(decision.desired),
                                     reason=decision.reason).set(decision.at)

    def observe_engine_stats(self, stats: EngineStats) -> None:
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.cache_blocks_used.set(stats.blocks_used)
        self.cache_blocks_total.set(stats.blocks_total)
        self.cache_slots_used.set(stats.slots_used)
        self.cache_slots_total.set(stats.slots_total)
        self.cache_blocks_cached.set(stats.blocks_cached)
        for counter, name in ((self.preemptions, "num_preemptions"),
                              (self.prefix_cache_queries, "prefix_cache_queried_tokens"),
                              (self.prefix_cache_hits, "prefix_cache_hit_tokens"),
                              (self.spec_decode_num_drafts, "spec_decode_num_drafts"),
                              (self.spec_decode_num_draft_tokens, "spec_decode_num_draft_tokens"),
                              (self.spec_decode_num_accepted_tokens, "spec_decode_num_accepted_tokens")):
            total = getattr(stats, name)
            counter.inc(max(0, total - self._totals_seen.get(name, 0)))
            self._totals_seen[name] = total
        for pos, total in enumerate(stats.spec_decode_num_accepted_tokens_per_pos):
            name = f"spec_decode_num_accepted_tokens_per_pos/{pos}"
            self.spec_decode_num_accepted_tokens_per_pos.labels(position=str(pos)).inc(
                max(0, total - self._totals_seen.get(name, 0)))
            self._totals_seen[name] = total
        for layer, samples in stats.dispatch_latency_s.items():
            child = self.dispatch_latency.labels(layer=str(layer))
            for s in samples:
                child.observe(s)
        for (layer, expert), tokens in stats.expert_tokens.items():
            self.expert_tokens.labels(layer=str(layer), expert=str(expert)).inc(tokens)

    def track(self, tenant: str, charge: TokenCharge | None = None) -> RequestTracker:
        """Start timing one generation request of `tenant` (call at its arrival); its tokens are also
        charged to `charge`."""
        return RequestTracker(self, tenant, charge)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTracker:
    """Feeds one request's token counts, TTFT and TPOT into the metrics as its outputs arrive."""

    def __init__(self, metrics: GatewayMetrics, tenant: str, charge: TokenCharge | None = None) -> None:
        self.metrics, self.charge = metrics, charge
        self.tenant_prompt_tokens = metrics.tenant_prompt_tokens.labels(tenant=tenant)
        self.tenant_generation_tokens = metrics.tenant_generation_tokens.labels(tenant=tenant)
        self.arrival_s = time.perf_counter()
        self.first_token_s: float | None = None
        self.last_token_s = self.arrival_s
        self.completion_tokens = 0
        self.is_finished = False

    def on_output(self, out: Any) -> None:
        """`out` is an engine output (prompt_tokens, cumulative completion_tokens)."""
        now = time.perf_counter()
        if self.first_token_s is None:
            self.first_token_s = now
            self.metrics.time_to_first_token.observe(now - self.arrival_s)
            self.metrics.prompt_tokens.inc(out.prompt_tokens)
            self.tenant_prompt_tokens.inc(out.prompt_tokens)
            if self.charge is not None:
                self.charge.charge(out.prompt_tokens)
        new_tokens = out.completion_tokens - self.completion_tokens
        if new_tokens > 0:
            self.metrics.generation_tokens.inc(new_tokens)
            self.tenant_generation_tokens.inc(new_tokens)
            if self.charge is not None:
                self.charge.charge(new_tokens)
            self.completion_tokens, self.last_token_s = out.completion_tokens, now

    def finish(self) -> None:
        """Call once the stream ended, however it ended; repeated calls do nothing."""
        if self.is_finished:
            return
        self.is_finished = True
        self.metrics.request_latency.observe(time.perf_counter() - self.arrival_s)
        if self.first_token_s is not None and self.completion_tokens > 1:
            decode_s = self.last_token_s - self.first_token_s
            self.metrics.time_per_output_token.observe(decode_s / (self.completion_tokens - 1))


class RequestCounter:
    """ASGI middleware: counts every HTTP response by route template (not raw path) and status code.

    An exception counts as a 500 and is re-raised for the app's error handler to answer; a client that
    left before any response started counts as 499.
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 499

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        except Exception:
            status = 500 if status == 499 else status
            raise
        finally:
            endpoint = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
