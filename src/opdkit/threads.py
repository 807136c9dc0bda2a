"""How many CPU threads torch should use: the cores this process may actually run on.

``os.cpu_count()`` (torch's default) counts the machine's cores, not the ones a container or a scheduler
gives this process. On a shared 2-core machine a 2-thread torch whose second core is busy runs 20-70x
slower than with 1 thread (measured here: every parallel region waits for the descheduled thread), so an
over-estimate is far worse than an under-estimate. :func:`available_cores` reads the CPU affinity mask and
the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``); :func:`configure_threads` divides them
among the processes of this machine (``LOCAL_WORLD_SIZE`` under torchrun).

Only the standard library is imported at module level.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

__all__ = ["available_cores", "configure_threads", "fixed_numerics"]


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup CPU quota in cores, or None when there is none (or it cannot be read)."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cores(root: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, capped by the cgroup quota (rounded up), >= 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def configure_threads(setting: int = 0, *, local_processes: int | None = None) -> int:
    """Set torch's intra-op threads: ``setting`` when > 0, else the available cores divided by the processes
    on this machine (``LOCAL_WORLD_SIZE``, 1 when unset); returns the number set."""
    import torch

    if setting and setting > 0:
        n = int(setting)
    else:
        procs = local_processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        n = max(1, available_cores() // max(1, procs))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def fixed_numerics(threads: int):
    """Inside: torch's intra-op threads fixed to ``threads`` and deterministic algorithms required, so that
    a computation gives the same bits whatever the machine's core count (a float reduction's order follows
    the thread count); the previous settings come back on exit."""
    import torch

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(int(threads))
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)
