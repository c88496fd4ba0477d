"""`nextserve up`: bring up Redis, Ray, the controller, expert workers, heads and the gateway.

Flow: resolve the model -> a local redis-server unless --redis-url -> `ray.init()` (a Ray of its own,
`address="local"`, unless RAY_ADDRESS is set, then it joins that cluster) -> ask the controller for the
expert workers (start_cluster, not waited on) -> `serve.run(build_app(args))` (the head replicas start
meanwhile, ask the controller for the same and wait for the placement) -> poll
GET /health until 200 -> print the base URL -> wait for SIGINT/SIGTERM -> tear down our Serve app
(`serve.delete(APP_NAME)`: other apps on a shared cluster keep running), the workers, Ray and Redis.
Joining a cluster (RAY_ADDRESS) needs --redis-url: a redis-server started here listens on loopback,
which actors on other nodes cannot reach. `nextserve status` finds the cluster through the state file.

The local redis-server is locked with a fresh password (cluster/control/redis_server.py). It reaches
the app through the environment (REDIS_PASSWORD_ENV, AppArgs.redis_password_env; the local Ray's
processes inherit this one's environment), and `status`, `scale` and `rebalance` through the state file,
which only its owner can read (mode 0600). Nothing prints it: messages show `redacted_url`.
A local cluster's expert workers listen on loopback only (AppArgs.expert_worker_host = LOCAL_WORKER_HOST).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import secrets
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from urllib.parse import urlsplit

import ray
from ray import serve

from nextserve.cluster.app import build_app
from nextserve.cluster.app_args import AppArgs
from nextserve.cluster.deployments.controller import get_or_create_controller, start_cluster
from nextserve.cluster.deployments.expert_worker import EXPERT_RESOURCE, HEAD_RESOURCE
from nextserve.cluster.cli.field_flags import field_values
from nextserve.cluster.cli.model_paths import TINY, resolve_model
from nextserve.cluster.cli.state_file import state_file, write_state
from nextserve.cluster.cli.up_options import UpOptions
from nextserve.cluster.cli.usage import UsageError
from nextserve.cluster.control.redis_server import LocalRedis, free_port, port_is_taken
from nextserve.cluster.control.registry import Registry, redacted_url
from nextserve.model.loader import validate_checkpoint

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0
APP_NAME = "nextserve"
"""The Serve application `up` deploys and, on Ctrl-C, deletes (and nothing else on the cluster)."""
LOCAL_CUSTOM_RESOURCES = {EXPERT_RESOURCE: 1024, HEAD_RESOURCE: 1024}
"""A local Ray node plays every node group, so it advertises both custom resources."""


REDIS_PASSWORD_ENV = "NEXTSERVE_REDIS_PASSWORD"
"""Where `up` puts the local redis-server's password for the app (AppArgs.redis_password_env)."""
LOCAL_WORKER_HOST = "127.0.0.1"
"""What a local cluster's expert workers listen on: its heads are on this host."""

DIRECT_INGRESS_PORTS = 100
"""Ports tried for the gateway's direct-ingress HTTP server, from --port up (one per gateway replica)."""


def throughput_env(port: int) -> dict[str, str]:
    """Ray Serve's documented throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED) for a local Ray: the
    gateway replica serves HTTP itself on `port` (direct ingress, no proxy hop per streamed event),
    deployment handles talk gRPC, user code runs on the replica's own loop, access logs are buffered.
    Measured here (C = 32 streams, 2,306 tokens): gateway + proxy CPU 6.3 s -> 1.3 s for the gateway
    alone. Values already in the environment win."""
    return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + DIRECT_INGRESS_PORTS - 1),
            # A gateway drains for this long before it stops (Serve's default, 30 s, would hold up
            # every Ctrl-C of a local cluster; requests still in flight get the replica's graceful wait).
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


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


PORT_FREE_WAIT_S = 60.0
"""How long `up` waits for --port to be released: a server stopped just before may still hold it while
Ray's worker processes exit (seen here: over 15 s)."""


def wait_port_free(host: str, port: int, timeout_s: float = PORT_FREE_WAIT_S) -> None:
    """Return once `port` can be listened on at `host` (as the gateway will: SO_REUSEADDR, so sockets in
    TIME_WAIT do not count); UsageError naming it after `timeout_s`. Without this check Serve would put
    the gateway on the next free port, and `up` would wait for a URL nobody serves."""
    deadline, is_waiting = time.monotonic() + timeout_s, False
    while True:
        try:
            if not port_is_taken(host, port):
                return
        except OSError as exc:  # not a port in use: an address this host cannot listen on
            raise UsageError(f"--host {host}: cannot listen there ({exc.strerror}); pass an address of this "
                             f"machine, or 0.0.0.0") from None
        if not is_waiting:
            print(f"nextserve: --port {port} is in use; waiting up to {timeout_s:.0f} s for it", flush=True)
            is_waiting = True
        if time.monotonic() >= deadline:
            raise UsageError(f"--port {port} on {host} is in use ({os.strerror(errno.EADDRINUSE)}); stop what "
                             f"listens there (another `nextserve up`?) or pass another --port")
        time.sleep(0.25)


def start(options: UpOptions, app_args: AppArgs, redis_url: str) -> str:
    """`app_args` as the app gets them (a local Redis: its URL without the password, redis_password_env
    naming the variable that holds it); `redis_url` with the password, for this process."""
    proxy_port = options.port
    if not options.ray_address:  # a local cluster serves --port on this host
        wait_port_free(options.host or "0.0.0.0", options.port)
    if options.ray_address:  # an existing cluster keeps its own Serve settings (its proxy serves HTTP)
        ray.init(address=options.ray_address, namespace="nextserve")
        check_redis_reaches_nodes(redis_url, ray.util.get_node_ip_address(),
                                  {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})
    else:
        if options.direct_ingress:  # the local Ray's processes inherit this environment
            for key, value in throughput_env(options.port).items():
                os.environ.setdefault(key, value)
        # "local": a Ray of our own, never another one found by auto-discovery (a user's `ray start`,
        # another `up`), which would refuse our custom resources.
        ray.init(address="local", namespace="nextserve", resources=LOCAL_CUSTOM_RESOURCES, include_dashboard=False)
        if options.direct_ingress:  # picked after Ray's own processes took their ports, so none takes this one
            proxy_port = free_port()  # the proxy stays up (Serve's fallback); --port is the gateway's
    # Joining a cluster: one proxy, on the Ray head (the URL printed below), not one per node: a node that
    # leaves takes the connections through its proxy with it (and colocated proxies share the port).
    serve.start(proxy_location="HeadOnly" if options.ray_address else None,
                http_options={"host": options.host, "port": proxy_port})
    # The controller and its workers start now, alongside the head replicas (which wait for them) rather
    # than after one has started: each is a process that imports torch. After serve.start: Ray starts
    # a few worker processes at a time, and Serve gives up on a proxy that is not up within a minute.
    workers_ready = start_cluster(app_args.with_redis_password(os.environ).with_admin_token(os.environ))
    serve.run(build_app(app_args.model_dump()), name=APP_NAME, route_prefix="/")
    ray.get(workers_ready)  # done: the heads waited for it (an error here is the one their init raised)
    base = f"http://{'127.0.0.1' if options.host in ('0.0.0.0', '') else options.host}:{options.port}"
    wait_healthy(base, READY_TIMEOUT_S, app_args.api_key)
    write_state(options.state_file, {"url": base, "redis_url": redis_url, "cluster": app_args.cluster,
                                     "admin_token": app_args.admin_token,
                                     "ray_address": ray.get_runtime_context().gcs_address})
    return base


def _kill_workers(redis_url: str, cluster: str) -> None:
    """Kill the cluster's named expert worker actors (detached: they would outlive this `up`)."""
    for worker in Registry(redis_url, cluster).workers():
        try:
            ray.kill(ray.get_actor(worker.fields["actor"], namespace="nextserve"), no_restart=True)
        except (ValueError, KeyError):  # gone already, or registered without a name
            pass


def _stop_workers(redis_url: str, cluster: str, admin_token: str | None) -> None:
    """Ask the cluster's controller to stop its expert workers, then kill it. A controller that cannot
    (busy healing a lost node past 30 s, or itself lost with that node and not back) leaves the workers to
    be killed here by name: they are detached and would outlive this `up`."""
    controller = get_or_create_controller(redis_url, cluster, admin_token)
    try:
        ray.get(controller.shutdown.remote(), timeout=30)
    except ray.exceptions.RayError as exc:  # GetTimeoutError (30 s) included
        log.warning("the controller did not stop its expert workers (%s); killing them", type(exc).__name__)
        _kill_workers(redis_url, cluster)
    ray.kill(controller, no_restart=True)


def stop(options: UpOptions, redis_url: str, local_redis: LocalRedis | None) -> None:
    try:
        if ray.is_initialized():
            serve.delete(APP_NAME)  # only ours: a shared cluster may serve other apps
            _stop_workers(redis_url, options.app.cluster, options.app.admin_token)
    finally:
        ray.shutdown()
        if local_redis is not None:
            local_redis.stop()
        options.state_file.unlink(missing_ok=True)


def check_redis_reachable(ray_address: str | None, redis_url: str) -> None:
    """Joining a Ray cluster needs a Redis every node reaches: ours would listen on this host's loopback."""
    if ray_address and not redis_url:
        raise UsageError(f"RAY_ADDRESS={ray_address} joins a Ray cluster whose other nodes cannot reach a "
                         f"redis-server started here on 127.0.0.1; pass --redis-url of a Redis the nodes reach "
                         f"(e.g. redis://HOST:6379/0), or unset RAY_ADDRESS for a local cluster")


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def check_redis_reaches_nodes(redis_url: str, this_ip: str, node_ips: set[str]) -> None:
    """A Redis on this host's loopback serves only nodes on this host: refuse it when a node is elsewhere."""
    host = urlsplit(redis_url).hostname or ""
    elsewhere = sorted(node_ips - {this_ip})
    if (host in LOOPBACK_HOSTS or host.startswith("127.")) and elsewhere:
        raise UsageError(f"--redis-url {redacted_url(redis_url)} is this host's loopback, which the Ray nodes on "
                         f"{', '.join(elsewhere)} cannot reach; pass the URL of a Redis every node reaches "
                         f"(e.g. redis://{this_ip}:6379/0)")


def run_up(options: UpOptions) -> int:
    check_redis_reachable(options.ray_address, options.app.redis_url)
    stopped = threading.Event()
    # Before the try: a start that fails (or a Ctrl-C during it) still stops the redis-server it began.
    local_redis = None if options.app.redis_url else LocalRedis()
    app_args = options.app
    if not options.ray_address:  # every head is on this host
        app_args = app_args.model_copy(update={"expert_worker_host": LOCAL_WORKER_HOST})
    if local_redis is not None:  # the app reads the password from the environment, never from its args
        os.environ[REDIS_PASSWORD_ENV] = local_redis.password
        app_args = app_args.model_copy(update={"redis_url": local_redis.address_url,
                                               "redis_password_env": REDIS_PASSWORD_ENV})
    redis_url = app_args.with_redis_password(os.environ).redis_url
    try:
        base = start(options, app_args, redis_url)  # Ctrl-C here is a KeyboardInterrupt: the finally cleans up
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
            signal.signal(sig, lambda *_: stopped.set())
        print(f"nextserve is up: {base}/v1  (model {options.app.served_model_name()}, "
              f"{options.app.expert_workers} expert workers, {options.app.head_replicas} head replicas)", flush=True)
        stopped.wait()
        print("nextserve: shutting down", flush=True)
    finally:
        stop(options, redis_url, local_redis)
    return 0


def app_args_of(args: argparse.Namespace, environ: Mapping[str, str]) -> AppArgs:
    """`up`'s AppArgs: the fields given as flags, then what `up` fills in itself: the checkpoint `tiny`
    resolved (and named `tiny`), the API key from NEXTSERVE_API_KEY, the Redis password and the admin
    token from the variables named by --redis-password-env / --admin-token-env, else a fresh admin token."""
    values = field_values(args, AppArgs)
    if values["model"] == TINY:
        values.setdefault("model_name", TINY)
    values["model"] = str(resolve_model(values["model"]))
    if "api_key" not in values and environ.get("NEXTSERVE_API_KEY"):
        values["api_key"] = environ["NEXTSERVE_API_KEY"]
    if not values.get("admin_token_env"):
        values["admin_token"] = secrets.token_urlsafe(32)  # fresh per `up`: what LoadExperts/DropExperts need
    app = AppArgs(**values)
    try:
        app.tenant_directory()  # a keys file that does not parse fails here, naming its line, before Ray starts
        return app.with_redis_password(environ).with_admin_token(environ)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_up(args: argparse.Namespace) -> int:
    """`nextserve up` (its parser: cluster/cli/cluster_parsers.py)."""
    app = app_args_of(args, os.environ)
    # A checkpoint the heads or workers cannot load fails here, with the line `generate` prints, not as
    # Serve's "Failed to update the deployments" with the reason in a replica's log.
    validate_checkpoint(app.model, app.dtype)
    return run_up(UpOptions(app=app, host=args.host, port=args.port, ray_address=os.environ.get("RAY_ADDRESS"),
                            state_file=state_file(app.cluster), direct_ingress=args.direct_ingress))
