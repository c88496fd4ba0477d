"""A local redis-server on a free loopback port, for `nextserve up` without --redis-url and for tests.

The server runs in its own process group with no persistence; `stop()` terminates it and waits, so
nothing is left behind. It is locked: a generated password (`requirepass`; a client without it gets
NOAUTH) and protected mode, so another local user cannot rewrite the placement. The password is
passed to redis-server in a config file only it and we read (mode 0600, never on its command line,
which `ps` shows), is part of `url` (what the cluster's processes connect with), and is masked in
`public_url`, the repr and the logs.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time

import redis

from nextserve.cluster.control.registry import redacted_url

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
PORT_ATTEMPTS = 3
"""Ports a LocalRedis that picks its own tries: the port `free_port` found is free only when it looked, and
another process may bind it before redis-server does (a client connection's ephemeral port, another test's
or cluster's server); redis-server then exits, and the next attempt picks another port."""
PING_TIMEOUT_S = 2.0
"""The readiness ping's socket timeouts: something else listening on the port must not hang the start."""


class RedisServerError(RuntimeError):
    pass


class PortTakenError(RedisServerError):
    """redis-server exited at start because another socket holds its port."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to now; whoever binds it later may find it taken (see PORT_ATTEMPTS)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_taken(host: str, port: int) -> bool:
    """Another socket is bound to `port` on `host` (as redis-server binds: SO_REUSEADDR, so a closed
    connection's TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise
    return False


class LocalRedis:
    def __init__(self, port: int | None = None, host: str = "127.0.0.1", password: str | None = None) -> None:
        """On `port` (default: a free one) of `host`, requiring `password` (default: a fresh random one)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError("redis-server is not installed; run `make install` (it installs it with "
                                   "apt-get) or pass --redis-url redis://HOST:PORT")
        self.binary = binary
        self.host, self.port = host, port or free_port(host)
        self._picks_port = port is None
        self.password = password or secrets.token_urlsafe(32)
        if set(self.password) & set('"\\\n'):
            raise ValueError("the Redis password may not hold a quote, a backslash or a newline (it is written "
                             "into redis.conf); pick another, or leave it out for a generated one")
        self._start(may_repick=self._picks_port)

    def __repr__(self) -> str:
        return f"LocalRedis({self.public_url})"

    def _start(self, may_repick: bool) -> None:
        """Start on self.port; when `may_repick` and another process took that port first, on a new free one."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self._launch()
                return
            except PortTakenError:
                if not may_repick or attempt == PORT_ATTEMPTS:
                    raise
                taken, self.port = self.port, free_port(self.host)
                log.info("port %d was taken before redis-server bound it; starting on port %d", taken, self.port)

    def _launch(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="nextserve-redis-")  # mode 0700
        config = os.path.join(self.workdir, "redis.conf")
        with open(os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(f'requirepass "{self.password}"\n')  # checked in __init__: nothing to escape
        self.process = subprocess.Popen(
            [self.binary, config, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
             "--dir", self.workdir, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self._wait_ready()
        log.info("redis-server pid %d on %s", self.process.pid, self.public_url)

    @property
    def url(self) -> str:
        """The URL with the password: what the cluster connects with. Never print it (see public_url)."""
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    @property
    def public_url(self) -> str:
        """The URL with the password masked, for messages and logs."""
        return redacted_url(self.url)

    @property
    def address_url(self) -> str:
        """The URL without credentials (the password then travels on its own, e.g. AppArgs.redis_password_env)."""
        return f"redis://{self.host}:{self.port}/0"

    def _wait_ready(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=PING_TIMEOUT_S, socket_connect_timeout=PING_TIMEOUT_S)
        deadline = time.monotonic() + START_TIMEOUT_S
        last_error: redis.RedisError | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()  # its work directory
                if port_is_taken(self.host, self.port):
                    raise PortTakenError(f"redis-server could not listen on {self.host}:{self.port}: another "
                                         f"process holds that port; pick another one")
                raise RedisServerError(f"redis-server exited with {self.process.returncode}: "
                                       f"{self.process.stderr.read().decode(errors='replace') if self.process.stderr else ''}")
            try:
                client.ping()  # another server on the port (one that took it first) refuses the password
                return
            except redis.RedisError as exc:  # not up yet, or not ours: until ours answers or exits
                last_error = exc
                time.sleep(0.05)
        self.stop()
        raise RedisServerError(f"redis-server did not answer on {self.public_url} within {START_TIMEOUT_S} s "
                               f"({type(last_error).__name__}: {last_error})")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start again on the same port (state is lost: no persistence)."""
        self.stop()
        self._start(may_repick=False)  # its URL is what the clients hold

    def __enter__(self) -> "LocalRedis":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
