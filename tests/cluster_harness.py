"""Run `nextserve up` as a user does (a subprocess of the real CLI) and talk to it over HTTP: greedy
streams that must equal transformers' text while the cluster changes under them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from nextserve.cluster.cli.cluster_commands import cluster_status
from nextserve.cluster.control.redis_server import LocalRedis, free_port
from nextserve.cluster.control.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
UP_TIMEOUT_S = 240.0


class UpProcess:
    def __init__(self, model: Path, cache: Path, workers: int, extra: list[str] | None = None,
                 ray_address: str | None = None, env: dict[str, str] | None = None) -> None:
        """`ray_address`: join that Ray cluster (RAY_ADDRESS), else `up` starts a local one; `env`: more
        environment for `up` (its local Ray inherits it)."""
        self.port = free_port()
        self.cache = cache
        self.env = {**os.environ, "NEXTSERVE_CACHE": str(cache), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        if ray_address:
            self.env["RAY_ADDRESS"] = ray_address
        cmd = [sys.executable, "-m", "nextserve.cluster.cli", "up", "--model", str(model), "--model-name", "tiny",
               "--expert-workers", str(workers), "--port", str(self.port), *(extra or [])]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self.owned: list[LocalRedis] = []
        """What a test started in place of the cluster's own (a restarted redis-server), stopped with the cluster."""
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + UP_TIMEOUT_S
        while not self.ready.wait(0.5):  # an `up` that already exited is reported at once, not at the deadline
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.send_signal(signal.SIGINT)  # a slow `up` stops its Ray and redis-server, not orphans them
                try:
                    self.proc.wait(60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                time.sleep(0.2)  # the reader thread takes the last lines
                raise RuntimeError(f"nextserve up did not come up (exit {self.proc.poll()}):\n"
                                   + "".join(self.lines[-60:]))
        self.base_url = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("nextserve is up"):
                self.ready.set()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nextserve.cluster.cli", *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=120)

    def status(self) -> dict:
        """What `nextserve status --json` prints, computed in this process by the function that command
        prints (cluster_status, through JSON as it goes): tests poll it, and each CLI process would import
        torch, transformers and Ray first (seconds of CPU per poll). `status_cli` runs the command itself."""
        registry = Registry(self.state()["redis_url"], "default")
        return json.loads(json.dumps(cluster_status(registry)))

    def status_cli(self) -> dict:
        """`nextserve status --json` run as a user runs it (a subprocess)."""
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def state(self) -> dict:
        return json.loads((self.cache / "cluster-default.json").read_text())

    def python_in_cluster(self, code: str) -> subprocess.CompletedProcess[str]:
        """Run `code` in a driver connected to this Ray cluster (namespace nextserve): its address from the state
        file, not "auto" (the newest Ray on this host, which may be another test worker's). A local Ray uses
        token authentication (its token in ~/.ray), which Ray turns on for an explicit address only when
        RAY_AUTH_MODE says so."""
        prelude = (f"import ray\nray.init(address={self.state()['ray_address']!r}, namespace='nextserve', "
                   f"logging_level='ERROR')\n")
        env = {**self.env, "RAY_AUTH_MODE": "token"}
        return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)

    def interrupt(self, timeout_s: float = 90.0) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout_s)


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def seeded_prompts(n: int) -> list[list[int]]:
    """n prompts of 4-39 token ids below the tiny vocab (2048), the same every call."""
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 2048, (int(torch.randint(4, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


_GREEDY_TOKENS: dict[tuple[str, tuple[int, ...]], list[int]] = {}
"""(the model's checkpoint path, prompt) -> the longest greedy continuation generated for it so far."""
_PENDING: dict[tuple[str, tuple[int, ...]], tuple[int, Future[None]]] = {}
"""(the model's checkpoint path, prompt) -> (max_tokens, its run in _REFERENCE_THREAD) started by prefetch."""
_REFERENCE_THREAD = ThreadPoolExecutor(1, thread_name_prefix="hf-reference")
"""transformers' runs started ahead of the test that checks them: a cluster's bring-up and its streams run
in other processes while this one waits, so the reference is computed then (one thread: torch computes
on one here) instead of after the streams, when the test would wait for it alone."""


def _generate(tiny_hf: tuple[Any, Any], prompt: list[int], max_tokens: int) -> None:
    model, _ = tiny_hf
    key = (str(model.name_or_path), tuple(prompt))
    if len(_GREEDY_TOKENS.get(key, ())) < max_tokens:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        _GREEDY_TOKENS[key] = out[0, len(prompt):].tolist()


def prefetch_greedy(tiny_hf: tuple[Any, Any], prompts: list[list[int]], max_tokens: int) -> None:
    """Start transformers' greedy runs of `prompts` (max_tokens long) in the background: hf_greedy_text
    waits for them. Called by a cluster fixture before its bring-up, whose prompts it knows."""
    model, _ = tiny_hf
    for prompt in prompts:
        key = (str(model.name_or_path), tuple(prompt))
        if key not in _PENDING or _PENDING[key][0] < max_tokens:
            _PENDING[key] = (max_tokens, _REFERENCE_THREAD.submit(_generate, tiny_hf, prompt, max_tokens))


def hf_greedy_tokens(tiny_hf: tuple[Any, Any], prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' greedy token ids after `prompt`, max_tokens of them (tiny_hf runs to max_new_tokens, as
    ignore_eos). Greedy without EOS is prefix-stable, so the first max_tokens of a longer run for the same
    prompt are reused (tests ask for the same prompts at 160 and 120 tokens); a run prefetch_greedy started
    is waited for."""
    model, _ = tiny_hf
    key = (str(model.name_or_path), tuple(prompt))
    if key in _PENDING:
        _PENDING[key][1].result()  # its error, if it failed, is this test's
    # in the one reference thread (a no-op when a long enough run is there): never two runs of a model at once
    _REFERENCE_THREAD.submit(_generate, tiny_hf, prompt, max_tokens).result()
    return _GREEDY_TOKENS[key][:max_tokens]


def hf_greedy_text(tiny_hf: tuple[Any, Any], prompt: list[int], max_tokens: int) -> str:
    """hf_greedy_tokens decoded, without a trailing U+FFFD (a text cut inside a UTF-8 sequence: the server
    holds those bytes back)."""
    return tiny_hf[1].decode(hf_greedy_tokens(tiny_hf, prompt, max_tokens), skip_special_tokens=True).rstrip("\ufffd")


def stream_completion(base: str, prompt: list[int], max_tokens: int) -> str:
    """One greedy streaming completion (ignore_eos); raises on any error event or status."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    parts = []
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                parts.append(event["choices"][0]["text"])
    return "".join(parts).rstrip("\ufffd")


def run_streams(up: UpProcess, prompts: list[list[int]], max_tokens: int, during: Callable[[], None]) -> list[str]:
    """Stream every prompt at once and run `during` meanwhile; the texts, in prompt order."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(stream_completion, up.base_url, p, max_tokens) for p in prompts]
        during()
        return [f.result(timeout=600) for f in futures]
