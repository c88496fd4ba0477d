"""`UpOptions`: what `nextserve up` runs with beyond the Serve app's arguments (AppArgs): the HTTP host and
port, the Ray to join, the state file, direct ingress. Its own module so that the parser reads its
defaults (--direct-ingress) without importing up.py's Ray."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nextserve.cluster.app_args import AppArgs


@dataclass(frozen=True)
class UpOptions:
    app: AppArgs
    host: str
    port: int
    ray_address: str | None
    """RAY_ADDRESS: the Ray cluster to join; None starts a local Ray of `up`'s own."""
    state_file: Path
    direct_ingress: bool = True
    """A local Ray runs Serve's throughput-optimized mode, the gateway replica serving HTTP itself."""
