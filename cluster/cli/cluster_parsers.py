"""The parsers of the cluster commands of the `nextserve` CLI: up, status, scale, rebalance. Their
implementations are imported only when one of them runs: `up`'s (cluster/cli/up.py: Ray, Serve, the app)
and the registry commands' (cluster/cli/cluster_commands.py: Redis, no Serve and no transformers, so that
`status` answers in about half the time); `up`'s flags are AppArgs' fields (cluster/cli/field_flags.py).
"""

from __future__ import annotations

import argparse

from nextserve.cluster.app_args import AppArgs, default_of
from nextserve.cluster.cli.field_flags import add_field_flags, not_flags_epilog
from nextserve.cluster.cli.lazy_command import LazyCommand
from nextserve.cluster.cli.model_paths import TINY
from nextserve.cluster.cli.up_options import UpOptions

COMMANDS = "nextserve.cluster.cli.cluster_commands"
"""The module of status, scale and rebalance."""


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="default: the cluster `nextserve up` started")
    p.add_argument("--cluster", default=AppArgs.model_fields["cluster"].default,
                   help="registry namespace in Redis (default: %(default)s)")


def add_cluster_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start the cluster and serve the model over HTTP until SIGINT/SIGTERM",
                       description="Start the cluster and serve the model over HTTP until SIGINT/SIGTERM. Every "
                                   "flag but --host, --port and --direct-ingress is the field of the Serve app's "
                                   "arguments (cluster/app_args.py, a RayService's serveConfigV2 args) of the "
                                   "same name.",
                       epilog=not_flags_epilog(AppArgs),
                       allow_abbrev=False)  # `--admin-token SECRET` must not pass as --admin-token-env
    add_field_flags(p, AppArgs, defaults={"model": TINY})
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP server listens on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="the HTTP port (default: %(default)s)")
    p.add_argument("--direct-ingress", action=argparse.BooleanOptionalAction,
                   default=default_of(UpOptions, "direct_ingress"),
                   help="a local Ray runs in Serve's throughput-optimized mode, the gateway replica serving HTTP "
                        "itself; --no-direct-ingress puts Serve's proxy in front (default: %(default)s)")
    p.set_defaults(func=LazyCommand("nextserve.cluster.cli.up", "cmd_up"))
    p = sub.add_parser("status", help="workers, heads, load and the placement epoch, from the Redis registry")
    _cluster_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=LazyCommand(COMMANDS, "cmd_status"))
    p = sub.add_parser("scale", help="re-shard the experts live onto N expert workers")
    _cluster_args(p)
    p.add_argument("--expert-workers", type=int, required=True, help="N: expert workers to serve on")
    p.add_argument("--wait-s", type=float, default=600.0)
    p.set_defaults(func=LazyCommand(COMMANDS, "cmd_scale"))
    p = sub.add_parser("rebalance", help="re-place experts for the load measured since the last rebalance")
    _cluster_args(p)
    p.add_argument("--wait-s", type=float, default=600.0)
    p.set_defaults(func=LazyCommand(COMMANDS, "cmd_rebalance"))
