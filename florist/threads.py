"""How florist's processes compute on CPUs: how many threads torch runs, and how idle threads wait.

torch runs its CPU kernels on OpenMP threads, and GNU OpenMP (the runtime of torch's Linux wheels) lets a thread
that has finished its share spin for a while before it sleeps. On a machine of its own that saves a wake-up; beside
another busy process it is a collapse rather than a slowdown: the spinning threads take the cores the threads they
wait for need, and a small client job took 3 to 6 times as long beside one CPU-bound neighbour on 2 cores, where
sharing them costs about 2x (``bench/contention.py`` measures it). So:

- on import, florist asks OpenMP to wait passively (``OMP_WAIT_POLICY=PASSIVE``) unless the environment already says
  how (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set: ``OMP_WAIT_POLICY=ACTIVE`` gets the spinning back, a little
  faster on an otherwise idle machine). It must come before torch loads OpenMP, so ``import florist`` first; the
  processes florist starts (Flower's simulation workers among them) inherit it.
- before loading a model or aggregating, torch gets as many threads as the CPUs this process is allotted
  (``allotted_cpus``: its CPU affinity, and a cgroup's CPU quota, so that a container allowed 2 CPUs of a 64-core
  host runs 2 threads, not 64), or ``FLORIST_THREADS`` when set. A thread count the environment chose already
  (``OMP_NUM_THREADS``, as Ray sets it for each simulated SuperNode) is left as it is.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from pathlib import Path

THREADS_VARIABLE = "FLORIST_THREADS"
CGROUP = Path("/sys/fs/cgroup")


class ThreadsError(ValueError):
    """``FLORIST_THREADS`` is not a thread count."""


def set_wait_policy(environ: MutableMapping[str, str] = os.environ) -> None:
    """Passive waiting for OpenMP's idle threads, unless ``environ`` chooses already."""
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"


def cgroup_cpu_quota(root: Path = CGROUP) -> int | None:
    """The CPUs a cgroup's quota allows this process, rounded up (cgroup v2's ``cpu.max``, v1's CFS quota and
    period); None where there is no quota or no cgroup file to read."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def allotted_cpus(root: Path = CGROUP) -> int:
    """The CPUs this process may run on: its affinity, capped by a cgroup's CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    return max(1, min(cpus, quota) if quota else cpus)


def thread_count(environ: MutableMapping[str, str] = os.environ) -> int:
    """``FLORIST_THREADS`` if set (a whole number, at least 1), else the CPUs allotted."""
    value = environ.get(THREADS_VARIABLE, "").strip()
    if not value:
        return allotted_cpus()
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ThreadsError(f"{THREADS_VARIABLE}={value!r}: not a number of threads (a whole number, at least 1)")
    return threads


def configure_torch(environ: MutableMapping[str, str] = os.environ) -> int:
    """Give torch ``thread_count()`` threads, unless ``OMP_NUM_THREADS`` chose already and ``FLORIST_THREADS`` is
    not set; returns the threads torch runs."""
    import torch

    if "OMP_NUM_THREADS" in environ and not environ.get(THREADS_VARIABLE, "").strip():
        return torch.get_num_threads()
    threads = thread_count(environ)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
