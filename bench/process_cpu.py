"""CPU seconds of processes and threads on this machine (Linux /proc), and of a local cluster by role.

`cluster_processes()` finds every process of this user but the benchmark itself and its children,
classified from its command line: the head replicas, the expert workers, the gateway, and the rest of
the serving stack (Ray's own processes, the Serve controller and proxy, the cluster controller, Redis,
`nextserve up`); given a root (a `nextserve up` pid: its Ray, Redis and every actor descend from it),
only that process and its descendants, so another cluster on a shared machine is not counted. Two
snapshots around a run give what each role spent on it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ROLES = ("head", "experts", "gateway", "ray")
"""Order of the roles in tables; "ray" is everything of the serving stack that is not one of the others."""

_ROLE_MARKERS = (("head", ("HeadDeployment",)),
                 ("experts", ("ExpertWorkerActor", "nextserve.experts.server")),
                 ("gateway", ("GatewayDeployment",)),
                 ("ray", ("ray::", "raylet", "gcs_server", "/ray/", "redis-server", "nextserve up",
                          "nextserve.cluster.cli up")))


def _stat_cpu_s(stat_path: str) -> float:
    """utime + stime of a /proc stat file, in seconds (Linux)."""
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    return _stat_cpu_s(f"/proc/{pid}/stat")


def thread_cpu_s(native_id: int | None) -> float:
    """CPU seconds of one thread of this process (0 for none)."""
    return _stat_cpu_s(f"/proc/self/task/{native_id}/stat") if native_id else 0.0


def role_of(cmdline: str) -> str | None:
    """The role of a process from its command line (NULs as spaces); None for one outside the cluster."""
    for role, markers in _ROLE_MARKERS:
        if any(m in cmdline for m in markers):
            return role
    return None


def _process_tree(root_pid: int) -> set[int]:
    """`root_pid` and its descendants (alive now)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, grew = {root_pid}, True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def cluster_processes(root_pid: int | None = None) -> dict[int, str]:
    """pid -> role of every cluster process of this user on this machine, the benchmark's tree excluded;
    with `root_pid`, only that process and its descendants (one `nextserve up` of several)."""
    own, uid, found = _process_tree(os.getpid()), os.getuid(), {}
    scope = None if root_pid is None else _process_tree(root_pid)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in own or (scope is not None and int(entry.name) not in scope):
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            role = role_of((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # gone meanwhile
            continue
        if role is not None:
            found[int(entry.name)] = role
    return found


def cpu_snapshot(processes: Mapping[int, str]) -> dict[int, float]:
    """pid -> CPU seconds so far, for those still alive."""
    out = {}
    for pid in processes:
        try:
            out[pid] = process_cpu_s(pid)
        except OSError:
            continue
    return out


def cpu_by_role(processes: Mapping[int, str], before: Mapping[int, float], after: Mapping[int, float]) -> dict[str, float]:
    """role -> CPU seconds spent between two snapshots (a process seen only after counts from 0; take
    `processes` at the end so that it knows those too)."""
    spent = dict.fromkeys(ROLES, 0.0)
    for pid, end in after.items():
        spent[processes[pid]] += end - before.get(pid, 0.0)
    return spent
