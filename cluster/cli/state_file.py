"""The state file of a running `nextserve up` (NEXTSERVE_CACHE/cluster-<name>.json): `up` writes it once
the cluster serves and removes it when it stops; `status`, `scale` and `rebalance` read the cluster's
Redis URL from it, and test drivers its Ray address. Its own module so that those commands read it without
importing `up`'s Ray and Serve."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nextserve.cluster.cli.model_paths import cache_dir


def state_file(cluster: str) -> Path:
    return cache_dir() / f"cluster-{cluster}.json"


def write_state(path: Path, state: dict[str, Any]) -> None:
    """The state file `status`, `scale` and `rebalance` read: it holds the Redis password (in
    `redis_url`) and the cluster token (`admin_token`, what a tool calling the expert workers needs), so
    only its owner may read it (0600, set before anything is written). `ray_address` is the GCS address of
    the Ray cluster the app runs on (a driver attaches with `ray.init(address=...)`; with several Ray
    clusters on one host, "auto" finds only the newest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file left by an older `up` keeps its mode through O_CREAT
    with open(fd, "w") as f:
        f.write(json.dumps(state) + "\n")


def read_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"no running cluster found ({path} is missing); start one with "
                                f"`nextserve up` or pass --redis-url")
    return json.loads(path.read_text())
