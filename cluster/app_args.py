"""The Serve application's arguments: what `nextserve up` passes and what a RayService's
`serveConfigV2` gives as `args` for `import_path: nextserve.cluster.app:build_app`. Validated with pydantic
(a process boundary). Declared once: `nextserve up`'s flags are generated from these fields
(cluster/cli/field_flags.py: `--expert-workers` for `expert_workers`, help from the docstring beneath each
field, default shown), serveConfigV2 uses the same names, and the defaults of the head's scheduler and
cache come from SchedulerConfig and CacheConfig."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nextserve.cluster.control.autoscale_policy import ScaleRange, WorkerAutoscaleConfig
from nextserve.cluster.control.registry import redacted_url
from nextserve.cluster.engine.scheduler import SchedulerConfig
from nextserve.cluster.engine.speculative_config import SpeculativeConfig, SpeculativeMethod
from nextserve.cluster.gateway.limits import GatewayLimits
from nextserve.cluster.gateway.tenants import TenantDirectory, TenantLimits, load_api_keys
from nextserve.cluster.tracing import traces_url
from nextserve.model.cache.budget import CacheConfig, format_memory_size, parse_cache_memory
from nextserve.model.config import Qwen3NextConfig


def default_of(config: type, name: str) -> Any:
    """The default of field `name` of the config dataclass `config`: where that default is declared."""
    return config.__dataclass_fields__[name].default


WORKER_AUTOSCALE_ARGS = {"autoscale_expert_workers", "expert_replicas", "autoscale_busy_high", "autoscale_busy_low",
                         "autoscale_upscale_delay_s", "autoscale_downscale_delay_s", "autoscale_cooldown_s"}
"""The fields the controller's worker policy is built from (its ClusterSpec carries the same)."""

NOT_A_FLAG: dict[str, Any] = {"cli": False}
"""json_schema_extra of a field `nextserve up` has no flag for: a secret (a command line shows in `ps`)."""


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    model: str
    """Checkpoint directory, as seen by every node (a PVC mount on Kubernetes); `nextserve up` also takes
    `tiny`, the tiny test checkpoint, made on first use."""
    model_name: str | None = None
    """The name clients pass as `model`; None: the checkpoint directory's name (`tiny` for the tiny one)."""
    expert_workers: int = Field(2, ge=1)
    """N: expert worker actors, each holding a share of the routed experts (a GPU each when the cluster
    has GPUs); `nextserve scale` changes it live."""
    expert_replicas: int = Field(1, ge=1)
    """R: distinct workers holding every expert, so at most expert_workers; 2 keeps every expert served
    through the loss of a worker."""
    head_replicas: int = Field(1, ge=1)
    """M: head replicas (attention, DeltaNet and the engine, each with its own cache); a conversation
    keeps landing on the replica that holds its prefix."""
    autoscale_heads: str | None = None
    """MIN:MAX: Ray Serve scales the head replicas within it on their ongoing requests (target: max_num_seqs
    per replica, the sequences one runs at once); head_replicas is where it starts. None: head_replicas
    fixed."""
    autoscale_expert_workers: str | None = None
    """MIN:MAX: the controller scales the expert workers within it on their measured busy fraction and
    queueing, through the live reshard (waves within max_experts_per_worker); expert_workers is where it
    starts, and MIN is at least expert_replicas. None: expert_workers fixed (`nextserve scale` by hand)."""
    autoscale_busy_high: float = Field(default_of(WorkerAutoscaleConfig, "busy_high"), gt=0, le=1)
    """Expert workers are added when the pool's busy fraction (share of time computing a Dispatch) stays
    above this for autoscale_upscale_delay_s."""
    autoscale_busy_low: float = Field(default_of(WorkerAutoscaleConfig, "busy_low"), ge=0, lt=1)
    """One expert worker is removed when the pool's busy fraction stays below this for
    autoscale_downscale_delay_s (and one fewer would stay below autoscale_busy_high)."""
    autoscale_upscale_delay_s: float = Field(default_of(WorkerAutoscaleConfig, "upscale_delay_s"), ge=0)
    """Seconds load must stay high before heads or workers are added (Serve's upscale_delay_s for heads)."""
    autoscale_downscale_delay_s: float = Field(default_of(WorkerAutoscaleConfig, "downscale_delay_s"), ge=0)
    """Seconds load must stay low before heads or workers are removed (Serve's downscale_delay_s for
    heads); with the defaults an idle cluster is back at its minimum within about a minute."""
    autoscale_cooldown_s: float = Field(default_of(WorkerAutoscaleConfig, "cooldown_s"), ge=0)
    """Seconds after a change of the expert workers before the next one (a reshard settles, loads are
    measured again)."""
    autoscale_look_back_s: float = Field(15.0, gt=0)
    """Seconds over which Serve averages the heads' ongoing requests (its look_back_period_s; above its
    10 s metrics push interval) and the controller samples the workers' busy time (every 2 s)."""
    max_experts_per_worker: int | None = Field(None, ge=1)
    """The most (layer, expert) pairs an expert worker may hold at any moment (its memory: `nextserve plan`
    computes it); scaling and rebalancing move in waves within it. None: no bound."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights and activations of heads and expert workers; bfloat16 halves the bytes (on a GPU)."""
    redis_url: str = ""
    """The registry's Redis, redis://[:PASSWORD@]HOST:PORT/DB; empty: `nextserve up` starts a local
    redis-server (a cluster joined through RAY_ADDRESS needs one every node reaches)."""
    cluster: str = "default"
    """Registry namespace in Redis (several clusters can share one Redis)."""
    api_key: str | None = None
    """Clients must send `Authorization: Bearer KEY` or `x-api-key: KEY` to /v1/* (401 otherwise); None:
    no key. `nextserve up` also reads it from NEXTSERVE_API_KEY, which keeps it out of `ps`. The one-tenant
    shorthand of api_keys_file (tenant `default`)."""
    api_keys_file: str | None = None
    """A file of API keys, one `KEY TENANT [WEIGHT]` a line (# comments): a key names its tenant, which
    salts its prefix cache (no tenant hits another's), has its share WEIGHT (default 1) of the heads'
    admissions, and its own limits and /metrics series. The path as the gateway sees it (Kubernetes: the
    `nextserve-api-keys` Secret mounted as a file). Not with api_key."""
    tenant_max_concurrent_requests: int | None = Field(None, ge=1)
    """Requests each tenant may have in flight on one gateway replica; over it, 429 with Retry-After.
    None: unlimited."""
    tenant_tokens_per_minute: int | None = Field(None, ge=1)
    """Prompt + generated tokens each tenant may use per minute on one gateway replica; over it, 429 with
    Retry-After (the seconds until its bucket refills). None: unlimited."""
    max_model_len: int | None = Field(None, ge=2)
    """The context the server admits (prompt + output tokens); None: the model's (max_position_embeddings).
    Qwen3-Coder-Next's card suggests 32,768 on smaller machines."""
    max_num_seqs: int = Field(default_of(SchedulerConfig, "max_num_seqs"), ge=1)
    """Sequences a head replica runs at once (SchedulerConfig.max_num_seqs); more wait, FCFS within a
    tenant and by weight across tenants."""
    max_queued_requests: int = Field(default_of(SchedulerConfig, "max_queued_requests"), ge=0)
    """Requests a head replica queues beyond the max_num_seqs it runs (SchedulerConfig.max_queued_requests);
    past it a request is refused at once: 429 (Anthropic: 529 overloaded_error) with Retry-After."""
    stream_idle_timeout_s: float = Field(default_of(GatewayLimits, "stream_idle_timeout_s"), gt=0)
    """Seconds a streaming client may read nothing while its output waits (GatewayLimits.stream_idle_timeout_s);
    then it is treated as gone: its request is aborted and its slot and blocks freed."""
    max_request_body_bytes: int = Field(default_of(GatewayLimits, "max_request_body_bytes"), ge=1)
    """Largest request body the gateway reads (GatewayLimits.max_request_body_bytes); past it: 413."""
    output_channels: bool = True
    """Heads send a step's outputs for all of one gateway replica's streams as one message, on an output
    channel per gateway replica and head replica (cluster/deployments/output_channel.py); off: each
    stream's outputs travel on its own request, one message per stream per step (what clients see is the
    same either way; `nextserve bench serve --cpu` measures the CPU per token of each)."""
    max_tokens_per_step: int = Field(default_of(SchedulerConfig, "max_tokens_per_step"), ge=1)
    """Token budget of one head step, decodes + prefill chunks (SchedulerConfig.max_tokens_per_step): it
    bounds a step's latency, and is at least max_num_seqs, so a full batch of decodes fits."""
    prefill_chunk: int = Field(default_of(SchedulerConfig, "prefill_chunk"), ge=1)
    """Most prompt tokens one sequence brings to a step (SchedulerConfig.prefill_chunk)."""
    micro_batches: int | Literal["auto"] = "auto"
    """Ping-pong micro-batches per head step (see SchedulerConfig.micro_batches): 2 overlaps the head's
    mixer with the experts' round when they have GPUs of their own; on a CPU box that shares its cores
    between head and workers it costs more than it hides. "auto": each head replica chooses
    (SchedulerConfig.auto_micro_batches) from its device and the cluster's: 2 when heads and experts have
    GPUs, else 1."""
    cache_memory: str = format_memory_size(default_of(CacheConfig, "cache_memory_bytes"))
    """Each head's cache budget (KV blocks + DeltaNet state slots), allocated at start: a size (`512MiB`,
    `40GiB`, bytes) or, on a GPU head, a fraction of the device memory left after the weights (`0.9`)."""
    block_size: int = Field(default_of(CacheConfig, "block_size"), ge=1, le=1024)
    """Tokens per KV block (CacheConfig.block_size)."""
    enable_prefix_cache: bool = default_of(CacheConfig, "enable_prefix_cache")
    """Keep KV blocks and DeltaNet state snapshots of finished requests for later ones that resend the
    same prefix (CacheConfig.enable_prefix_cache)."""
    prefix_snapshot_every: int = Field(default_of(CacheConfig, "prefix_snapshot_every"), ge=1)
    """Tokens between prefill state snapshots, a multiple of block_size (CacheConfig.prefix_snapshot_every)."""
    speculative_config: str | None = None
    """Speculative decoding, as JSON in vLLM's spelling: `{"method": "ngram", "num_speculative_tokens": 4,
    "prompt_lookup_min": 1, "prompt_lookup_max": 4}` drafts from the sequence's own prompt + output (code an
    agent rewrites); `{"method": "mtp", "num_speculative_tokens": 1}` from the checkpoint's MTP layer.
    "disable_by_batch_size" (default 8) stops drafting while more sequences run. Output is unchanged; None:
    no drafts."""
    head_num_gpus: float = Field(0.0, ge=0)
    """GPUs per head replica (Ray `num_gpus`); 0: heads compute on CPU. A head given one computes on it in
    the model dtype."""
    dispatch_deadline_s: float = Field(10.0, gt=0)
    """Per-attempt gRPC deadline of one dispatch to one worker (then its tokens fail over)."""
    unavailable_wait_s: float = Field(30.0, ge=0)
    """With no live replica of an expert, how long a step waits for the worker to come back before its
    requests fail with 503 naming the experts."""
    rebalance_every_s: float = Field(0.0, ge=0)
    """Scheduled load-aware rebalancing period; 0 = only on demand (`nextserve rebalance`)."""
    expert_worker_host: str | None = None
    """The address expert workers listen on and register: None, their Ray node's IP (the pod IP on
    Kubernetes; never 0.0.0.0). A local `nextserve up` sets 127.0.0.1: its heads are on this host."""
    redis_password_env: str | None = None
    """Name of an environment variable holding the Redis password (Kubernetes: from a Secret), so that
    no password sits in the Serve config or on a command line; `build_app` (and `nextserve up`) put it
    into `redis_url`."""
    admin_token: str | None = Field(None, min_length=1, repr=False, json_schema_extra=NOT_A_FLAG)
    """The cluster's admin token: expert workers take LoadExperts / DropExperts only with it (the
    controller sends it). Not a flag of `nextserve up` (a command line shows in `ps`): `up` makes a fresh
    one, or reads the environment variable --admin-token-env names; a RayService names one in
    admin_token_env."""
    admin_token_env: str | None = None
    """Name of an environment variable holding the admin token (Kubernetes: from the `nextserve-admin`
    Secret on every Ray pod), so that no token sits in the Serve config or on a command line; `build_app`
    (and `nextserve up`) read it."""
    otlp_traces_endpoint: str = ""
    """OTLP/HTTP collector URL (e.g. http://otel-collector:4318; /v1/traces is added when no path is given)
    that gateways and heads send OpenTelemetry traces to: a span per API request, a child span per engine
    request on its head, a span per engine step of traced requests. Needs `nextserve[otel]`. "": no
    tracing (nothing of OpenTelemetry is imported)."""

    def scheduler_config(self, head_on_accelerator: bool = False, experts_on_accelerators: bool = False) -> SchedulerConfig:
        """The head engine's step shape (what every head replica builds); the devices resolve "auto"."""
        micro_batches = (SchedulerConfig.auto_micro_batches(head_on_accelerator, experts_on_accelerators)
                         if self.micro_batches == "auto" else self.micro_batches)
        return SchedulerConfig(max_num_seqs=self.max_num_seqs, max_tokens_per_step=self.max_tokens_per_step,
                               prefill_chunk=self.prefill_chunk, micro_batches=micro_batches,
                               max_queued_requests=self.max_queued_requests)

    def head_autoscaling(self) -> dict[str, Any] | None:
        """Serve's autoscaling_config for the head deployment, or None (head_replicas fixed). The target is
        max_num_seqs ongoing requests per replica: past it a head queues what another replica would run."""
        if self.autoscale_heads is None:
            return None
        heads = ScaleRange.parse(self.autoscale_heads)
        return {"min_replicas": heads.minimum, "max_replicas": heads.maximum, "initial_replicas": self.head_replicas,
                "target_ongoing_requests": self.max_num_seqs, "upscale_delay_s": self.autoscale_upscale_delay_s,
                "downscale_delay_s": self.autoscale_downscale_delay_s,
                "look_back_period_s": self.autoscale_look_back_s}

    def min_head_replicas(self) -> int:
        """The fewest head replicas the cluster runs: head_replicas, or autoscale_heads' MIN."""
        return ScaleRange.parse(self.autoscale_heads).minimum if self.autoscale_heads else self.head_replicas

    def worker_autoscaling(self) -> WorkerAutoscaleConfig | None:
        """The controller's expert-worker policy settings, or None (expert_workers fixed)."""
        return WorkerAutoscaleConfig.from_fields(self.model_dump(include=WORKER_AUTOSCALE_ARGS))

    @model_validator(mode="after")
    def _autoscale_ranges_fit(self) -> "AppArgs":
        """Each range parses, holds its starting size, and the workers' MIN keeps R replicas per expert."""
        for field, start, start_field in (("autoscale_heads", self.head_replicas, "head_replicas"),
                                          ("autoscale_expert_workers", self.expert_workers, "expert_workers")):
            text = getattr(self, field)
            if text is None:
                continue
            scale = ScaleRange.parse(text)
            if not scale.minimum <= start <= scale.maximum:
                raise ValueError(f"{start_field}={start} is outside {field}={text}: it is the size the cluster "
                                 f"starts at; set it within the range")
        workers = self.worker_autoscaling()  # ValueError naming busy_low/busy_high or expert_replicas
        if workers is not None and workers.range.minimum < self.expert_replicas:
            raise ValueError(f"autoscale_expert_workers={self.autoscale_expert_workers} goes below expert_replicas="
                             f"{self.expert_replicas}: every expert needs that many distinct workers; raise MIN")
        return self

    def gateway_limits(self) -> GatewayLimits:
        """What the gateway refuses or cuts off before a head sees it (cluster/gateway/admission.py)."""
        return GatewayLimits(self.max_request_body_bytes, self.stream_idle_timeout_s)

    def cache_config(self, device_free_bytes: int | None = None) -> CacheConfig:
        """The head's cache budget; `device_free_bytes` (a GPU head's free memory) resolves a fraction."""
        return CacheConfig(parse_cache_memory(self.cache_memory, device_free_bytes), self.block_size,
                           enable_prefix_cache=self.enable_prefix_cache, prefix_snapshot_every=self.prefix_snapshot_every)

    def speculative(self) -> SpeculativeConfig | None:
        """The parsed --speculative-config (validated at construction)."""
        return None if self.speculative_config is None else SpeculativeConfig.from_json(self.speculative_config)

    def head_loads_mtp(self) -> bool:
        """Whether a head loads the checkpoint's MTP layer (`load_head(mtp=...)`): only when
        --speculative-config drafts with it (method "mtp"). Otherwise its weights stay on disk and its K/V
        pool is not in the cache budget: those bytes buy KV blocks (the published model: ~8 % more)."""
        spec = self.speculative()
        return spec is not None and spec.method is SpeculativeMethod.MTP

    @field_validator("speculative_config")
    @classmethod
    def _speculative_config_parses(cls, value: str | None) -> str | None:
        if value is not None:
            SpeculativeConfig.from_json(value)
        return value

    @field_validator("otlp_traces_endpoint")
    @classmethod
    def _traces_endpoint_is_url(cls, value: str) -> str:
        if value:
            traces_url(value)  # ValueError naming the field and the expected shape
        return value

    @field_validator("cache_memory")
    @classmethod
    def _cache_memory_parses(cls, value: str) -> str:
        CacheConfig(parse_cache_memory(value, device_free_bytes=2**40))  # a fraction resolves on the head
        return value

    @model_validator(mode="after")
    def _scheduler_fits(self) -> "AppArgs":
        """Fields that constrain each other fail here, naming both, not in every head replica's start."""
        try:
            self.scheduler_config()
            self.cache_config(device_free_bytes=2**40)  # prefix_snapshot_every against block_size
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _replicas_fit(self) -> "AppArgs":
        if self.expert_replicas > self.expert_workers:
            raise ValueError(f"expert_replicas={self.expert_replicas} exceeds expert_workers={self.expert_workers}: "
                             f"each expert needs {self.expert_replicas} distinct workers; raise expert_workers "
                             f"(--expert-workers) to at least {self.expert_replicas} or lower expert_replicas")
        return self

    @field_validator("model")
    @classmethod
    def _model_dir(cls, value: str) -> str:
        if not (Path(value) / "config.json").exists():
            raise ValueError(f"model {value!r} is not a checkpoint directory (no config.json)")
        return value

    @model_validator(mode="after")
    def _context_fits(self) -> "AppArgs":
        context = Qwen3NextConfig.from_json(self.model).max_position_embeddings
        if self.max_model_len is not None and self.max_model_len > context:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's context of {context} "
                             f"tokens (max_position_embeddings); lower it or omit it")
        return self

    def context_length(self) -> int:
        """The context the server admits: max_model_len, else the model's."""
        return self.max_model_len or Qwen3NextConfig.from_json(self.model).max_position_embeddings

    def __repr_args__(self) -> Iterator[tuple[str | None, object]]:
        """The repr (and str) shows redis_url with its password masked (admin_token is repr=False)."""
        for name, value in super().__repr_args__():
            yield name, redacted_url(value) if name == "redis_url" and isinstance(value, str) else value

    def with_redis_password(self, environ: Mapping[str, str]) -> "AppArgs":
        """These args with the password from `environ[redis_password_env]` put into `redis_url`."""
        if not self.redis_password_env:
            return self
        password = environ.get(self.redis_password_env)
        if not password:
            raise ValueError(f"redis_password_env={self.redis_password_env!r} is not set in this process's "
                             f"environment; set it on every Ray pod from the Redis Secret")
        url = urlsplit(self.redis_url)
        if url.username or url.password:
            raise ValueError("redis_url carries credentials already; drop them or drop redis_password_env")
        netloc = f":{quote(password, safe='')}@{url.netloc}"
        return self.model_copy(update={"redis_url": urlunsplit(url._replace(netloc=netloc)),
                                       "redis_password_env": None})

    @model_validator(mode="after")
    def _one_admin_token_source(self) -> "AppArgs":
        if self.admin_token and self.admin_token_env:
            raise ValueError("admin_token and admin_token_env are both set; keep one (admin_token_env on Kubernetes)")
        return self

    def with_admin_token(self, environ: Mapping[str, str]) -> "AppArgs":
        """These args with the admin token from `environ[admin_token_env]` (or admin_token as given); a
        cluster never runs without one, so neither is an error naming both fields."""
        if self.admin_token:
            return self
        if not self.admin_token_env:
            raise ValueError("no admin token for the expert workers: set admin_token_env to the name of an "
                             "environment variable that holds one on every Ray pod (Kubernetes: from the "
                             "nextserve-admin Secret), or admin_token")
        token = environ.get(self.admin_token_env)
        if not token:
            raise ValueError(f"admin_token_env={self.admin_token_env!r} is not set in this process's environment; "
                             f"set it on every Ray pod from the nextserve-admin Secret")
        return self.model_copy(update={"admin_token": token, "admin_token_env": None})

    @model_validator(mode="after")
    def _one_key_source(self) -> "AppArgs":
        if self.api_key and self.api_keys_file:
            raise ValueError("api_key and api_keys_file are both set; keep one (api_key is a one-tenant "
                             "api_keys_file)")
        return self

    def tenant_directory(self) -> TenantDirectory:
        """The gateway's tenants: the keys file's (read now; ApiKeysFileError names the bad line), or
        api_key's one tenant, or an open server's; with the per-tenant limits."""
        limits = TenantLimits(self.tenant_max_concurrent_requests, self.tenant_tokens_per_minute)
        if self.api_keys_file:
            return TenantDirectory(load_api_keys(self.api_keys_file), limits)
        return TenantDirectory.single(self.api_key, limits)

    def served_model_name(self) -> str:
        return self.model_name or Path(self.model).name
