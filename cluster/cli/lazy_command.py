"""`LazyCommand`: a sub-command's implementation, named by module and function and imported when that
command runs.

The parser (cluster/cli/main.py, cluster/cli/cluster_parsers.py) is built from light modules only, so
`nextserve --help`, `plan` and a usage error load no Ray, no engine and no transformers model code;
`generate` imports the engine when it runs, `up` imports Ray when it runs. A parser sets
`func=LazyCommand(module, function)`; `main` calls `args.func(args)` as for any function.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class LazyCommand:
    module: str
    """The implementation's module, e.g. "nextserve.cluster.cli.generate"."""
    function: str
    """Its function taking the parsed arguments and returning the exit status, e.g. "cmd_generate"."""

    def __call__(self, args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(self.module), self.function)(args))
