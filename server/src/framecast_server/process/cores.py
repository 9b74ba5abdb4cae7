"""How many workers, and each one's share of the machine: the cores a container may use.

``--workers auto`` starts one worker per usable core, and a worker's ONNX Runtime gets its
share of them: the CPU affinity, capped by the cgroup CPU quota a container runs under.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from ..settings import ServerSettings

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this container's cgroup in CPUs, or None when there is none.

    cgroup v2 (``cpu.max``: "QUOTA PERIOD", or "max PERIOD") at ``root``; else cgroup v1
    (``cpu.cfs_quota_us``, -1 for none, and ``cpu.cfs_period_us``) in ``root``'s ``cpu`` or
    ``cpu,cpuacct`` hierarchy, where Docker and the kubelet put a container's own cgroup.
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        pass
    else:
        return _quota_cpus(quota, period)
    for hierarchy in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        directory = root / hierarchy
        try:
            quota = (directory / "cpu.cfs_quota_us").read_text().strip()
            period = (directory / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            continue
        return _quota_cpus(quota, period)
    return None


def _quota_cpus(quota: str, period: str) -> float | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None  # "max" (v2) or something unreadable: no limit we can use
    if quota_us <= 0 or period_us <= 0:
        return None  # -1: no quota (v1)
    return quota_us / period_us


def usable_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (containers).

    A pod limited to 4 CPUs on a 96-core node sees all 96 in its affinity; the quota (cgroup v2
    or v1) is what the kubelet sets from ``resources.limits.cpu``.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is None:
        return cores
    return max(1, min(cores, math.ceil(limit)))


def parse_workers(value: str) -> int:
    """``--workers``: a positive count, or ``auto`` (one per usable core); raises ValueError."""
    if value == "auto":
        return usable_cores()
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"workers must be a positive integer or 'auto', got {value!r}") from None
    if count < 1:
        raise ValueError(f"workers must be at least 1, got {count}")
    return count


def worker_settings(
    settings: ServerSettings, workers: int, port: int, health_port: int | None = None
) -> ServerSettings:
    """A worker's settings: the reserved ports, and its share of the cores for ONNX Runtime."""
    threads = settings.threads or max(1, usable_cores() // workers)
    return dataclasses.replace(
        settings, port=port, threads=threads, health_port=health_port or settings.health_port
    )
