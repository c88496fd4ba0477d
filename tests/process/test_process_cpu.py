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
        deadline = time.time() + 20  # it spins: 0.3 s of CPU within a second idle, within several at load 8
        while (spent := cpu_by_role(procs, before, cpu_snapshot(procs)))["experts"] < 0.3 and time.time() < deadline:
            time.sleep(0.25)
        assert set(spent) == set(ROLES)
        assert spent["experts"] >= 0.3
    finally:
        os.kill(pid, signal.SIGKILL)


def test_a_root_pid_scopes_the_count_to_its_tree() -> None:
    """Two clusters on one machine: with a root, only the root and its descendants are counted. The root is a
    shell re-parented away from this process (sh starts it in the background and exits), with a worker-like
    child; another worker-like process outside it is seen without a root and left out with one."""
    sleep = "import time; time.sleep(30)"
    tree = subprocess.run(["sh", "-c", f"sh -c '{sys.executable} -c \"{sleep}\" nextserve.experts.server & wait' "
                                       f">/dev/null 2>&1 & echo $!"], capture_output=True, text=True, check=True)
    other = subprocess.run(["sh", "-c", f"{sys.executable} -c '{sleep}' nextserve.experts.server >/dev/null 2>&1 & "
                                        f"echo $!"], capture_output=True, text=True, check=True)
    root, outside = int(tree.stdout.strip()), int(other.stdout.strip())
    try:
        deadline = time.time() + 10
        while len(inside := cluster_processes(root)) < 2 and time.time() < deadline:
            time.sleep(0.05)
        # the shell (its command line names the worker too) and its worker-like child; not the other one
        assert root in inside and len(inside) == 2 and set(inside.values()) == {"experts"}
        assert outside not in inside
        assert outside in cluster_processes()
    finally:
        for pid in [outside, root, *inside]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
