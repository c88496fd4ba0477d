"""The tier of every test (its folder), how pytest-xdist schedules the tiers, and the shared fixtures
(tests/shared_fixtures.py, registered here in the processes that run tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from xdist.remote import Producer
from xdist.scheduler import LoadScopeScheduling

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "process", "grpc", "cluster")
"""The tier folders under tests/, cheapest first; each tier may also do what the ones before it do
(pyproject.toml's markers say what each starts)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test's tier marker is its folder's: tests/<tier>/test_*.py. A test module outside a tier folder,
    or a tier marker in a file that disagrees with its folder, is a usage error naming the file."""
    for item in items:
        parts = item.path.resolve().relative_to(TESTS).parts
        tier = parts[0] if len(parts) > 1 else None
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: test modules live in a tier folder, tests/{{{','.join(TIERS)}}}/;"
                                    " move it to the one that says what it starts")
        marked = {m.name for m in item.iter_markers()} & set(TIERS)
        if marked - {tier}:
            raise pytest.UsageError(f"{item.nodeid} is marked {sorted(marked)} but lives in tests/{tier}/: drop the"
                                    f" marker (the folder sets it) or move the file to tests/{sorted(marked)[0]}/")
        item.add_marker(getattr(pytest.mark, tier))


CLUSTER_CHAIN_A = ("tests/cluster/shared_cluster/", "tests/cluster/test_two_workers.py")
"""The cluster tier in two units of work, chain "a" (these) and chain "b" (the rest of tests/cluster/), each
one Ray cluster at a time, so that `pytest -n 2` runs two clusters side by side. Measured alone on 2 cores: a
(the shared cluster, the two-worker cluster) ~290 s, b (autoscale, elastic, multinode) ~330 s; a module's
place in its chain is its collection order."""


class TierScheduling(LoadScopeScheduling):
    """`pytest -n N` (`make test`, `make test-fast`): the cluster tier is two units of work (CLUSTER_CHAIN_A),
    each run by one worker, one Ray cluster at a time and in collection order (a cluster module's fixtures
    and the shared cluster's ordering rely on it), while the unit, process and grpc tests go a module at a
    time to whichever worker is free (a module's fixtures are made once: e.g. test_structured_outputs'
    `answers` sends all of the module's requests as one batch). The suite is bound by CPU (both cores busy
    from start to end): two clusters side by side fill the cores a single one left idle while it waited.
    (pytest-xdist's own `--dist loadgroup` would group by xdist_group marks, but it renames node ids in a way
    pytest 9.2 no longer sees.)"""

    def __init__(self, config: pytest.Config, log: Producer | None = None) -> None:
        super().__init__(config, log)
        config.option.loadscopereorder = False  # in collection order: the cluster chains, the longest, first

    def _split_scope(self, nodeid: str) -> str:
        if not nodeid.startswith("tests/cluster/"):
            return nodeid.split("::", 1)[0]
        return f"tests/cluster[{'a' if nodeid.startswith(CLUSTER_CHAIN_A) else 'b'}]"


def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> TierScheduling:
    return TierScheduling(config, log)


def pytest_configure(config: pytest.Config) -> None:
    """The shared fixtures, in every process that runs tests: not in pytest-xdist's controller (`-n N`),
    which collects nothing and would import torch and transformers for them before starting its workers."""
    if getattr(config.option, "dist", "no") == "no" or hasattr(config, "workerinput"):
        config.pluginmanager.import_plugin("shared_fixtures")
