"""How many CPUs this process may really use: the default number of workers.

The CPU affinity mask says which cores the scheduler may use, but in a container a CPU quota
(Kubernetes `limits.cpu`, `docker run --cpus`) caps the time as well: a pod limited to 2 CPUs on
a 64-core node must not start 64 workers, each with its own memory. The quota is read from the
process's cgroup and every parent up to the root (cgroup v2 `cpu.max`; v1 `cpu.cfs_quota_us`
over `cpu.cfs_period_us`); the smallest applies. Rounded down, never below one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(
    cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        membership = proc_cgroup.read_text()
    except OSError:
        return cores
    quota = cpu_quota(membership, lambda path: _read(cgroup_root / path))
    if quota is None:
        return cores
    return max(1, min(cores, math.floor(quota)))


def cpu_quota(membership: str, read: Callable[[str], str | None]) -> float | None:
    """The smallest CPU quota over this cgroup and its parents, in CPUs; None when unlimited.

    `membership` is the text of /proc/self/cgroup; `read(path)` returns the text of a file
    under the cgroup root, or None.
    """
    quotas = [q for q in _quotas(membership, read) if q is not None]
    return min(quotas) if quotas else None


def _quotas(membership: str, read: Callable[[str], str | None]) -> Iterator[float | None]:
    for line in membership.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2, the unified hierarchy
            for directory in _self_and_parents(path):
                yield _v2_quota(read(f"{directory}/cpu.max".lstrip("/")))
        elif "cpu" in controllers.split(","):  # cgroup v1, the cpu controller's hierarchy
            mount = controllers  # mounted as "cpu" or "cpu,cpuacct"
            for directory in _self_and_parents(path):
                yield _v1_quota(
                    read(f"{mount}{directory}/cpu.cfs_quota_us"),
                    read(f"{mount}{directory}/cpu.cfs_period_us"),
                )


def _self_and_parents(path: str) -> Iterator[str]:
    parts = [p for p in path.split("/") if p]
    for end in range(len(parts), -1, -1):
        yield "/" + "/".join(parts[:end]) if end else ""


def _v2_quota(text: str | None) -> float | None:
    """`cpu.max`: "max 100000" (no limit) or "<quota> <period>" in microseconds."""
    if text is None:
        return None
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _v1_quota(quota: str | None, period: str | None) -> float | None:
    if quota is None or period is None:
        return None
    return _ratio(quota.strip(), period.strip())  # a quota of -1 means no limit


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
