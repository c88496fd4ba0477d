"""`nextserve up` on the tiny default, as `make serve` runs it: status lists the workers, SIGINT
leaves no Ray or redis process behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from cluster_harness import UpProcess, pids_alive
from nextserve.model.tiny import TINY_VERSION

pytestmark = pytest.mark.cluster


def test_up_tiny_default_then_sigint_leaves_nothing(tmp_path: Path) -> None:
    up = UpProcess(Path("tiny"), tmp_path, workers=2)
    try:
        status = up.status()
        assert len(status["workers"]) == 2 and all(w["pid"] > 0 and w["alive"] for w in status["workers"])
        assert (tmp_path / f"tiny-{TINY_VERSION}" / "config.json").exists()  # the tiny default was made on first use
        r = httpx.post(f"{up.base_url}/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        pids = [w["pid"] for w in status["workers"]] + [h["pid"] for h in status["heads"]]
        port = up.state()["redis_url"].split(":")[2].split("/")[0]
    finally:
        code = up.interrupt()
    assert code == 0, "".join(up.lines[-30:])
    assert pids_alive(pids) == []
    leftovers = subprocess.run(["pgrep", "-f", f"redis-server 127.0.0.1:{port}|raylet|gcs_server"],
                               capture_output=True, text=True).stdout.split()
    assert leftovers == [], leftovers
    assert not (tmp_path / "cluster-default.json").exists()
