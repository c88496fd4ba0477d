"""bench/process_cpu.py: roles from real command lines, and CPU that a real cluster-like process spends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from nextserve.bench.process_cpu import ROLES, cluster_processes, cpu_by_role, cpu_snapshot, role_of


def test_roles_from_command_lines() -> None:
    assert role_of("ray::ServeReplica:nextserve:HeadDeployment ") == "head"
    assert role_of("ray::ExpertWorkerActor ") == "experts"
    assert role_of("python -m nextserve.experts.server --model d --port 0") == "experts"
    assert role_of("ray::ServeReplica:nextserve:GatewayDeployment ") == "gateway"
    assert role_of("/x/ray/core/src/ray/raylet/raylet --node_id=1") == "ray"
    assert role_of("redis-server 127.0.0.1:6379") == "ray"
    assert role_of("python -m nextserve.cluster.cli up --model d") == "ray"  # how the tests start it
    assert role_of("/usr/bin/bash -l") is None
    assert role_of("python /home/raymond/array_tool.py") is None  # "ray" in a path is not Ray


def test_a_busy_cluster_process_outside_the_benchmark_tree_is_counted() -> None:
    """A worker-like process re-parented away from this one (sh starts it in the background and exits)
    spends CPU between two snapshots; its role gets it. Our own children would not count."""
    busy = "import sys, time\nend = time.time() + 30\nwhile time.time() < end: pass"
    sh = subprocess.run(["sh", "-c", f'{sys.executable} -c "{busy}" nextserve.experts.server >/dev/null 2>&1 & echo $!'],
                        capture_output=True, text=True, check=True)
    pid = int(sh.stdout.strip())
    try:
        deadline = time.time() + 10
        while pid not in (procs := cluster_processes()) and time.time() < deadline:
            time.sleep(0.05)
        assert procs.get(pid) == "experts"
        before = cpu_snapshot(procs)
        time.sleep(1.0)
        spent = cpu_by_role(procs, before, cpu_snapshot(procs))
        assert set(spent) == set(ROLES)
        assert spent["experts"] >= 0.3  # it spins on a core for the whole second (2 cores, shared)
    finally:
        os.kill(pid, signal.SIGKILL)
