"""`nextserve up`: bring up Redis, Ray, the controller, expert workers, heads and the gateway.

Flow: resolve the model -> a local redis-server unless --redis-url -> `ray.init()` (local unless
RAY_ADDRESS is set, then it joins that cluster) -> `serve.run(build_app(args))` (the head replicas
ask the controller for the expert workers and wait for the placement) -> poll GET /health until 200
-> print the base URL -> wait for SIGINT/SIGTERM -> tear down Serve, the workers, Ray and Redis.
`nextserve status` finds the cluster through the state file written here.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve

from cluster.app import build_app
from cluster.app_args import AppArgs
from cluster.controller import get_or_create_controller
from cluster.expert_actor import EXPERT_RESOURCE, HEAD_RESOURCE
from cluster.redis_server import LocalRedis

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0
LOCAL_CUSTOM_RESOURCES = {EXPERT_RESOURCE: 1024, HEAD_RESOURCE: 1024}
"""A local Ray node plays every node group, so it advertises both custom resources."""


@dataclass(frozen=True)
class UpOptions:
    app: AppArgs
    host: str
    port: int
    ray_address: str | None
    state_file: Path


def wait_healthy(url: str, timeout_s: float, api_key: str | None) -> None:
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url + "/health", headers=headers), timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not turn 200 within {timeout_s} s")


def start(options: UpOptions) -> tuple[str, LocalRedis | None]:
    local_redis = None if options.app.redis_url else LocalRedis()
    app_args = options.app.model_copy(update={"redis_url": options.app.redis_url or local_redis.url})  # type: ignore[union-attr]
    if options.ray_address:
        ray.init(address=options.ray_address, namespace="nextserve")
    else:
        ray.init(namespace="nextserve", resources=LOCAL_CUSTOM_RESOURCES, include_dashboard=False)
    serve.start(http_options={"host": options.host, "port": options.port})
    serve.run(build_app(app_args.model_dump()), name="nextserve", route_prefix="/")
    base = f"http://{'127.0.0.1' if options.host in ('0.0.0.0', '') else options.host}:{options.port}"
    wait_healthy(base, READY_TIMEOUT_S, app_args.api_key)
    options.state_file.parent.mkdir(parents=True, exist_ok=True)
    options.state_file.write_text(json.dumps({"url": base, "redis_url": app_args.redis_url,
                                              "cluster": app_args.cluster}) + "\n")
    return base, local_redis


def stop(options: UpOptions, redis_url: str, local_redis: LocalRedis | None) -> None:
    try:
        if ray.is_initialized():
            serve.shutdown()
            controller = get_or_create_controller(redis_url, options.app.cluster)
            ray.get(controller.shutdown.remote(), timeout=30)
            ray.kill(controller, no_restart=True)
    finally:
        ray.shutdown()
        if local_redis is not None:
            local_redis.stop()
        options.state_file.unlink(missing_ok=True)


def run_up(options: UpOptions) -> int:
    stopped = threading.Event()
    local_redis: LocalRedis | None = None
    redis_url = options.app.redis_url
    try:
        base, local_redis = start(options)  # Ctrl-C here is a KeyboardInterrupt: the finally cleans up
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
            signal.signal(sig, lambda *_: stopped.set())
        redis_url = options.app.redis_url or (local_redis.url if local_redis else "")
        print(f"nextserve is up: {base}/v1  (model {options.app.served_model_name()}, "
              f"{options.app.expert_workers} expert workers, {options.app.head_replicas} head replicas)", flush=True)
        stopped.wait()
        print("nextserve: shutting down", flush=True)
    finally:
        stop(options, redis_url, local_redis)
    return 0


def read_state(state_file: Path) -> dict[str, Any]:
    if not state_file.exists():
        raise FileNotFoundError(f"no running cluster found ({state_file} is missing); start one with "
                                f"`nextserve up` or pass --redis-url")
    return json.loads(state_file.read_text())
