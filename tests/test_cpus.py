"""The default worker count: CPU affinity, capped by a container's CPU quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshgw.cpus import available_cpus, cpu_quota


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def reader(files: dict[str, str]):
    return files.get


@pytest.mark.parametrize(
    ("membership", "files", "quota"),
    [
        # cgroup v2 in its own namespace: the container's limit at the root of the mount
        ("0::/\n", {"cpu.max": "200000 100000\n"}, 2.0),
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        ("0::/\n", {}, None),
        # v2 without a namespace: the pod's limit on a parent applies to the container too
        (
            "0::/kubepods/pod1/ctr\n",
            {
                "kubepods/pod1/ctr/cpu.max": "max 100000",
                "kubepods/pod1/cpu.max": "150000 100000",
                "kubepods/cpu.max": "max 100000",
            },
            1.5,
        ),
        # v1, cpu mounted with cpuacct; -1 means no limit
        (
            "4:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n",
            {
                "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
                "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            },
            0.5,
        ),
        (
            "1:cpu:/\n",
            {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
            None,
        ),
        # garbage is no limit, not an error
        ("0::/\n", {"cpu.max": "lots\n"}, None),
        ("0::/\n", {"cpu.max": "abc 100000\n"}, None),
        ("not a cgroup file", {}, None),
    ],
)
def test_cpu_quota(membership: str, files: dict[str, str], quota: float | None) -> None:
    assert cpu_quota(membership, reader(files)) == quota


def test_available_cpus_takes_the_smaller_of_affinity_and_quota(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    membership = tree(tmp_path / "proc", {"cgroup": "0::/\n"}) / "cgroup"
    limited = tree(tmp_path / "limited", {"cpu.max": "150000 100000\n"})
    assert available_cpus(limited, membership) == min(cores, 1)  # 1.5 CPUs: one worker
    tiny = tree(tmp_path / "tiny", {"cpu.max": "25000 100000\n"})
    assert available_cpus(tiny, membership) == 1  # never below one
    generous = tree(tmp_path / "generous", {"cpu.max": "6400000 100000\n"})
    assert available_cpus(generous, membership) == cores  # a quota above the cores
    assert available_cpus(tmp_path / "none", membership) == cores
    assert available_cpus(tmp_path / "none", tmp_path / "missing") == cores
