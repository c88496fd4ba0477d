"""Tenants: the keys file's parsing (errors naming the line), a tenant's quota (concurrency, tokens per
minute) on an injected clock, and over real HTTP (uvicorn, the real engine on the tiny model): an unknown
key is 401, another tenant never sees a tenant's prefix cache, limits are 429 + Retry-After in each API's
shape, and /metrics counts per tenant."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway_local_engine import Server, TinyEngine, scrape
from nextserve.cluster.engine.contract import EngineError, ErrorCode
from nextserve.cluster.gateway.tenants import (ApiKeysFileError, Tenant, TenantDirectory, TenantLimits, TenantQuota,
                                               load_api_keys, parse_api_keys)

MODEL = "tiny"
CONTEXT = 512
KEY_A, KEY_B, KEY_A2 = "sk-alpha-1", "sk-bravo-2", "sk-alpha-3"
KEYS_FILE = f"""# tenants of the test server
{KEY_A} alpha 2
{KEY_B} bravo   # weight 1
{KEY_A2} alpha 2.0
"""


def test_keys_file_parses() -> None:
    keys = parse_api_keys(KEYS_FILE)
    assert keys == {KEY_A: Tenant("alpha", 2.0), KEY_B: Tenant("bravo", 1.0), KEY_A2: Tenant("alpha", 2.0)}


@pytest.mark.parametrize("text,message", [
    ("k1 a\nk2\n", "keys line 2: expected 'KEY TENANT [WEIGHT]', got 1 fields"),
    ("k1 a 1 extra\n", "keys line 1: expected 'KEY TENANT [WEIGHT]', got 4 fields"),
    ("\n\nk1 a heavy\n", "keys line 3: WEIGHT 'heavy' is not a number"),
    ("k1 a 0\n", "keys line 1: WEIGHT must be a finite number > 0, got 0"),
    ("k1 a -2\n", "keys line 1: WEIGHT must be a finite number > 0, got -2"),
    ("k1 a nan\n", "keys line 1: WEIGHT must be a finite number > 0, got nan"),
    ("k1 a\nk1 b\n", "keys line 2: this key is already given to tenant 'a'"),
    ("k1 a 1\nk2 b\nk3 a 3\n", "keys line 3: tenant 'a' has weight 3 here and 1 on line 1"),
    ("# nothing\n\n", "keys: no keys"),
])
def test_keys_file_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ApiKeysFileError) as e:
        parse_api_keys(text, "keys")
    assert message in str(e.value)
    assert "k1 " not in str(e.value) and "'k1'" not in str(e.value)  # a key is never echoed


def test_missing_keys_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ApiKeysFileError, match="cannot read the API keys file .*nope.keys"):
        load_api_keys(tmp_path / "nope.keys")
    (tmp_path / "k").write_text(KEYS_FILE)
    assert load_api_keys(tmp_path / "k")[KEY_B] == Tenant("bravo")


def test_authenticate_maps_keys_to_tenants() -> None:
    directory = TenantDirectory(parse_api_keys(KEYS_FILE))
    assert directory.authenticate(KEY_A).tenant == directory.authenticate(KEY_A2).tenant == Tenant("alpha", 2.0)
    assert directory.authenticate(KEY_B).tenant.name == "bravo"
    assert directory.authenticate("sk-alpha") is None and directory.authenticate("") is None
    assert directory.tenant_names == ["alpha", "bravo"] and not directory.is_open
    assert directory.authenticate(KEY_A).quota is None  # no limits: nothing to count
    assert TenantDirectory.single(None).is_open and TenantDirectory.single("k").authenticate("k") is not None


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def _refusal(quota: TenantQuota) -> EngineError:
    with pytest.raises(EngineError) as e:
        quota.acquire()
    assert e.value.code is ErrorCode.RATE_LIMITED and e.value.code.http_status == 429
    assert e.value.retry_after_s is not None
    return e.value


def test_quota_concurrency() -> None:
    quota = TenantQuota(Tenant("a"), TenantLimits(max_concurrent_requests=2))
    quota.acquire()
    quota.acquire()
    error = _refusal(quota)
    assert "tenant 'a' has 2 requests in flight" in error.message and error.retry_after_s == 1.0
    quota.release()
    quota.acquire()


def test_quota_tokens_per_minute_refills() -> None:
    clock = Clock()
    quota = TenantQuota(Tenant("a"), TenantLimits(tokens_per_minute=600), clock)  # 10 tokens a second
    quota.acquire()
    quota.charge(650)  # a request may overdraw what was left; the next waits for the debt
    quota.release()
    error = _refusal(quota)
    assert error.retry_after_s == pytest.approx(5.0) and "used its 600 tokens per minute" in error.message
    clock.now_s += 5.5
    quota.acquire()  # 5 tokens in the bucket again


@pytest.fixture(scope="module")
def keys_server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    path = tmp_path_factory.mktemp("tenants") / "api-keys"
    path.write_text(KEYS_FILE)
    with Server(TinyEngine(tiny_dir, CONTEXT), MODEL, tenants=TenantDirectory(load_api_keys(path))) as s:
        yield s


def _post(url: str, key: str, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _cached(url: str, key: str, prompt: list[int], **extra: str) -> int:
    r = _post(url, key, {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_unknown_key_is_401(keys_server: Server) -> None:
    for headers in ({"Authorization": "Bearer sk-nobody"}, {"x-api-key": "sk-alpha"}, {}):
        r = httpx.get(f"{keys_server.url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{keys_server.url}/v1/messages", headers={"x-api-key": "wrong"},
                   json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["type"] == "error"
    r = httpx.post(f"{keys_server.url}/v1/responses", headers={"Authorization": "Bearer wrong"},
                   json={"model": MODEL, "input": "hi", "max_output_tokens": 2})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for key in (KEY_A, KEY_B, KEY_A2):
        assert httpx.get(f"{keys_server.url}/v1/models", headers={"x-api-key": key}).status_code == 200


def test_another_tenant_never_hits_a_tenants_prefix(keys_server: Server) -> None:
    prompt = [(7 * i) % 300 + 5 for i in range(200)]
    assert _cached(keys_server.url, KEY_A, prompt) == 0
    assert _cached(keys_server.url, KEY_B, prompt) == 0  # B sends A's prompt: nothing of A's is reused
    assert _cached(keys_server.url, KEY_A2, prompt) == 192  # A's other key is A: its repeat is cached
    assert _cached(keys_server.url, KEY_B, prompt) == 192  # B's own first send is cached for B
    assert _cached(keys_server.url, KEY_A, prompt, cache_salt="s1") == 0  # a salt narrows it within A
    assert _cached(keys_server.url, KEY_A, prompt, cache_salt="s1") == 192
    metrics = scrape(httpx.Client(base_url=keys_server.url))
    assert metrics['nextserve_tenant_requests_total{"tenant": "alpha"}'] >= 4
    assert metrics['nextserve_tenant_prompt_tokens_total{"tenant": "bravo"}'] >= 400
    assert metrics['nextserve_tenant_generation_tokens_total{"tenant": "bravo"}'] >= 4
    assert metrics['nextserve_tenant_refusals_total{"tenant": "bravo"}'] == 0


def test_limits_are_429_with_retry_after(tiny_dir: Path) -> None:
    directory = TenantDirectory(parse_api_keys(KEYS_FILE), TenantLimits(tokens_per_minute=60))
    with Server(TinyEngine(tiny_dir, CONTEXT), MODEL, tenants=directory) as s:
        body = {"model": MODEL, "prompt": list(range(5, 105)), "max_tokens": 2, "temperature": 0}
        assert _post(s.url, KEY_A, body).status_code == 200  # 102 tokens: A's bucket of 60 is overdrawn
        r = _post(s.url, KEY_A, body)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and "tenant 'alpha'" in r.json()["error"]["message"]
        r = _post(s.url, KEY_A2, {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
                  "/v1/messages")
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error" and "retry-after" in r.headers
        r = _post(s.url, KEY_A, {"model": MODEL, "input": "hi", "max_output_tokens": 2}, "/v1/responses")
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded" and "Retry-After" in r.headers
        assert _post(s.url, KEY_B, body).status_code == 200  # bravo has its own bucket
        metrics = scrape(httpx.Client(base_url=s.url))
        assert metrics['nextserve_tenant_refusals_total{"tenant": "alpha"}'] == 3
        assert metrics['nextserve_tenant_refusals_total{"tenant": "bravo"}'] == 0
