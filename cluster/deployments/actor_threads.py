"""How many torch CPU threads a Ray actor (head replica, expert worker) computes with.

Ray's own rule for OMP_NUM_THREADS: the CPUs the actor was given. Heads (num_cpus=0) and CPU expert
workers (num_cpus=0.1) were given less than one, and torch would then start a thread per core of
the node; between ops those OpenMP threads spin and take the cores the other actors need. Measured
with `nextserve bench step` (batch 32, 2 cores): the head alone 27.3 ms per step with 1 thread,
35.6 ms with 2; the step over gRPC 70.9 ms vs 95.8 ms.
"""

from __future__ import annotations

import ray
import torch


def use_assigned_cpus() -> int:
    """Set torch's intra-op threads to the CPUs Ray assigned this actor, at least 1; returns it."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    return threads
