"""How many CPUs this process may use: what `--workers auto` starts one worker per.

A leaf: imports nothing of the server, so that settings can use it.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterable
from pathlib import Path


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value by `nice` (Linux: a thread's own, not the
    process's; elsewhere nothing). Run as a thread's initializer."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def usable_cpus(
    cgroup_root: Path = Path("/sys/fs/cgroup"), own_cgroup: Path = Path("/proc/self/cgroup")
) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota
    (rounded down, at least 1: a worker per fraction of a core would only be throttled)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, own_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(cgroup_root: Path, own_cgroup: Path) -> float | None:
    """CPUs' worth of time the cgroup quota allows (v2 cpu.max, v1 cpu.cfs_quota_us), the
    tightest along this process's cgroup and its parents; None when there is no quota."""
    paths = ["/"]
    with contextlib.suppress(OSError):
        for line in own_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "" or "cpu" in controllers.split(","):
                paths.append(path)
    quotas: list[float] = []
    for path in paths:
        parts = Path(path.lstrip("/")).parts
        for depth in range(len(parts), -1, -1):
            below = Path(*parts[:depth]) if depth else Path()
            quotas.extend(_quota_in(cgroup_root / below))
            for v1 in ("cpu", "cpu,cpuacct"):
                quotas.extend(_quota_in(cgroup_root / v1 / below))
    return min(quotas) if quotas else None


def _quota_in(folder: Path) -> Iterable[float]:
    try:
        quota, period = (folder / "cpu.max").read_text().split()
        if quota != "max" and float(period) > 0:
            yield float(quota) / float(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = float((folder / "cpu.cfs_quota_us").read_text())
        period_us = float((folder / "cpu.cfs_period_us").read_text())
        if quota_us > 0 and period_us > 0:
            yield quota_us / period_us
    except (OSError, ValueError):
        pass
