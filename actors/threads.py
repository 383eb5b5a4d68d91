"""Each actor's CPU threads follow the CPUs Ray gave it (DESIGN.md section 8).

Every Ray actor of dsarl (rollout workers, reward workers, teachers, learner ranks) calls
`follow_cpu_share(num_threads)` first thing in its `__init__`. It sets torch's intra-op threads, which
also size the C kernels' thread pools (`dsarl.kernels.native` reads `torch.get_num_threads()`), and
`OMP_NUM_THREADS` / `MKL_NUM_THREADS` in this process's environment, so the processes the actor starts
(the reward worker's reward process, `dsarl.rewards.timeouts`) start with the same limit.

    threads = num_threads if num_threads > 0 (config)
              else max(1, floor(CPUs Ray assigned to this actor))

Why not leave it to Ray: Ray 2.60 (`ray._private.utils.set_omp_num_threads_if_unset`, called by
`_raylet.pyx` before an actor's creation task) sets `OMP_NUM_THREADS` to the same floor-at-least-1
number, but only when the variable is unset. A variable set in the driver's or the node's
environment (a shell profile, a job's env_vars, a cluster image) reaches every worker unchanged: a
1-CPU actor on a 16-core node with `OMP_NUM_THREADS=16` spins 16 OpenMP threads against its
neighbours (on a shared 2-core machine this made a GRPO step 30x slower), and a 4-CPU learner under
`OMP_NUM_THREADS=1` uses one core. Ray also leaves `MKL_NUM_THREADS` alone. Here the actor's share
wins over any inherited value; only an explicit `num_threads` overrides it.

Outside a Ray actor (the plain classes in tests, the driver) nothing is assigned, so only an explicit
`num_threads` changes anything.
"""
import math
import os

import ray
import torch

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read by OpenMP / MKL when a child process starts


def assigned_cpus() -> float | None:
    """CPUs Ray assigned to the current actor (placement-group bundles included), or None outside an
    actor. An actor created without num_cpus holds 0 CPUs while it runs."""
    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:  # the driver, or a task: not an actor
        return None
    return float(context.get_assigned_resources().get("CPU", 0.0))


def threads_for(cpus: float | None, num_threads: int | None) -> int | None:
    """The thread count for a CPU share: an explicit num_threads > 0 wins; a share below one CPU (or none
    at all, as Ray rounds it) still gets one thread; None when neither is known."""
    if num_threads is not None and num_threads < 0:
        raise ValueError(f"num_threads must be >= 0 (0: follow the actor's CPUs), got {num_threads}")
    if num_threads:
        return int(num_threads)
    if cpus is None:
        return None
    return max(1, math.floor(cpus))


def follow_cpu_share(num_threads: int | None = 0) -> int | None:
    """Set this process's torch threads and its children's OMP/MKL threads from its Ray CPU share (or
    num_threads > 0) -> the thread count set, or None when nothing was changed (not a Ray actor and no
    explicit count)."""
    threads = threads_for(assigned_cpus(), num_threads)
    if threads is None:
        return None
    torch.set_num_threads(threads)
    for key in THREAD_ENV:
        os.environ[key] = str(threads)
    return threads
