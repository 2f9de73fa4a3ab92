"""--workers N: several processes on one port, one route table, merged metrics, one drain."""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request
from pathlib import Path

from meshgw.dataplane.workers import merge_metrics
from tests.conftest import WAIT, connect, recv_all
from tests.hellos import python_hello


def test_merge_metrics_sums_samples_and_labels_process_families() -> None:
    a = (
        b"# HELP meshgw_bytes Bytes.\n# TYPE meshgw_bytes counter\n"
        b'meshgw_bytes_total{direction="up"} 10.0\n'
        b"# HELP process_open_fds fds\n# TYPE process_open_fds gauge\nprocess_open_fds 7.0\n"
    )
    b = (
        b"# HELP meshgw_bytes Bytes.\n# TYPE meshgw_bytes counter\n"
        b'meshgw_bytes_total{direction="up"} 5.0\nmeshgw_bytes_total{direction="down"} 1.0\n'
        b"# HELP process_open_fds fds\n# TYPE process_open_fds gauge\nprocess_open_fds 9.0\n"
    )
    merged = merge_metrics([a, b]).decode()
    assert 'meshgw_bytes_total{direction="up"} 15.0' in merged
    assert 'meshgw_bytes_total{direction="down"} 1.0' in merged
    assert 'process_open_fds{worker="0"} 7.0' in merged
    assert 'process_open_fds{worker="1"} 9.0' in merged


def active_connections(admin_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=WAIT) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("meshgw_active_connections "):
                return float(line.split()[1])
    return 0.0


def test_two_workers_share_the_port_and_the_routes(gateway_process, backend_factory) -> None:
    def reply(conn: socket.socket) -> None:
        conn.sendall(conn.recv(65536)[:5])

    server = backend_factory(reply)
    gw = gateway_process(
        "--dc", "dc1", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--workers", "2",
        "--expose-servers", "--server", f"n={server.address}", "--no-access-log",
    ).wait_listening()  # fmt: skip
    hello = python_hello("n.server.dc1.consul")
    for _ in range(40):
        with connect(gw.port) as client:
            client.sendall(hello)
            assert recv_all(client) == hello[:5]
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/metrics", timeout=WAIT) as r:
        text = r.read().decode()
    assert (
        'meshgw_connections_total{datacenter="dc1",outcome="closed",route_kind="local_server"} 40.0'
        in text
    )
    # The supervisor (worker="0") and both workers report their own process metrics.
    assert 'process_open_fds{worker="1"}' in text and 'process_open_fds{worker="2"}' in text
    # The drain counts what the workers hold: here one hello begun and never finished.
    held = connect(gw.port)
    try:
        held.sendall(b"\x16")
        deadline = time.monotonic() + WAIT
        while active_connections(gw.admin_port) != 1:
            assert time.monotonic() < deadline, "the held connection was never accepted"
            time.sleep(0.02)
        gw.signal(signal.SIGTERM)
        gw.wait_for("draining open_connections=1 ")
    finally:
        held.close()
    assert gw.wait_exit(WAIT * 2) == 0
    refused = socket.socket()
    try:
        assert refused.connect_ex(("127.0.0.1", gw.port)) != 0
    finally:
        refused.close()


def worker_pids(supervisor: int) -> set[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return {int(pid) for pid in children}


def test_a_worker_that_dies_is_replaced(gateway_process, backend_factory) -> None:
    def reply(conn: socket.socket) -> None:
        conn.sendall(conn.recv(65536)[:5])

    server = backend_factory(reply)
    gw = gateway_process(
        "--dc", "dc1", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--workers", "2",
        "--expose-servers", "--server", f"n={server.address}", "--no-access-log",
    ).wait_listening()  # fmt: skip
    before = worker_pids(gw.proc.pid)
    assert len(before) == 2
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    gw.wait_for(rf"worker \d \(pid {victim}\) died \(killed by SIGKILL\): starting another")
    deadline = time.monotonic() + WAIT
    while len(worker_pids(gw.proc.pid) - {victim}) < 2:
        assert time.monotonic() < deadline, "no worker took the dead one's place"
        time.sleep(0.02)
    # Both workers answer /metrics again, and every connection is routed.
    deadline = time.monotonic() + WAIT
    while 'process_open_fds{worker="2"}' not in metrics_text(gw.admin_port):
        assert time.monotonic() < deadline, "the new worker does not report"
        time.sleep(0.02)
    hello = python_hello("n.server.dc1.consul")
    for _ in range(40):
        with connect(gw.port) as client:
            client.sendall(hello)
            assert recv_all(client) == hello[:5]
    assert "meshgw_worker_restarts_total 1.0" in metrics_text(gw.admin_port)
    every_worker = before | worker_pids(gw.proc.pid)
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit(WAIT * 2) == 0
    assert still_running_workers(every_worker) == set()


def still_running_workers(pids: set[int]) -> set[int]:
    """Of these pids, those still running as a meshgw worker (pids can be reused)."""
    alive = set()
    for pid in pids:
        try:
            if b"meshgw.dataplane.workers" in Path(f"/proc/{pid}/cmdline").read_bytes():
                alive.add(pid)
        except OSError:
            pass
    return alive


def metrics_text(admin_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=WAIT) as r:
        return r.read().decode()
