"""--workers N: several processes on one port, one route table, merged metrics, one drain."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import urllib.request
from functools import partial
from pathlib import Path

import pytest

from meshgw.bench.hellos import python_hello
from meshgw.metrics import merge_metrics
from tests.conftest import (
    WAIT,
    GatewayProcess,
    connect,
    echo,
    eventually,
    pump_param,
    recv_all,
    recv_exactly,
)


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


HELLO = python_hello("n.server.dc1.consul")


@pytest.fixture
def two_workers(gateway_process, backend_factory):
    """A gateway of two worker processes in front of a server that answers 5 bytes."""

    def reply(conn: socket.socket) -> None:
        conn.sendall(conn.recv(65536)[:5])

    server = backend_factory(reply)
    return gateway_process(
        "--dc", "dc1", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--workers", "2",
        "--expose-servers", "--server", f"n={server.address}",
    ).wait_listening()  # fmt: skip


def route_some(port: int, count: int = 40) -> None:
    for _ in range(count):
        with connect(port) as client:
            client.sendall(HELLO)
            assert recv_all(client) == HELLO[:5]


def metrics_text(admin_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=WAIT) as r:
        return r.read().decode()


def active_connections(admin_port: int) -> float:
    for line in metrics_text(admin_port).splitlines():
        if line.startswith("meshgw_active_connections "):
            return float(line.split()[1])
    return 0.0


def has_joined(admin_port: int, count: int) -> bool:
    return joins(admin_port) == count


def joins(admin_port: int) -> float:
    for line in metrics_text(admin_port).splitlines():
        if line.startswith('meshgw_kernel_tunnel_joins_total{trigger="start"} '):
            return float(line.split()[1])
    return 0.0


def worker_pids(supervisor: int) -> set[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return {int(pid) for pid in children}


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


def workers_that_served(gw: GatewayProcess, connections: int) -> set[str]:
    """Which workers wrote the access-log lines of the last `connections` connections."""
    served = set()
    for _ in range(connections):
        line = gw.wait_for(r"meshgw.access connection .*worker=(\d)")
        served.add(line.group(1))
        gw.lines.remove(line.string)
    return served


def test_two_workers_share_the_port_and_the_routes(two_workers) -> None:
    gw = two_workers
    route_some(gw.port)
    # Both workers took connections: the kernel spreads them over the port's sockets.
    assert workers_that_served(gw, 40) == {"1", "2"}
    text = metrics_text(gw.admin_port)
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
        eventually(
            lambda: active_connections(gw.admin_port) == 1, what="held connection not accepted"
        )
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


def test_a_worker_that_dies_is_replaced(two_workers) -> None:
    gw = two_workers
    before = worker_pids(gw.proc.pid)
    assert len(before) == 2
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    gw.wait_for(rf"worker \d \(pid {victim}\) died \(killed by SIGKILL\): starting another")
    eventually(lambda: len(worker_pids(gw.proc.pid) - {victim}) == 2, what="no worker replaced it")
    # Both workers answer /metrics again, and every connection is routed.
    eventually(
        lambda: 'process_open_fds{worker="2"}' in metrics_text(gw.admin_port),
        what="the new worker does not report",
    )
    route_some(gw.port)
    assert "meshgw_worker_restarts_total 1.0" in metrics_text(gw.admin_port)
    every_worker = before | worker_pids(gw.proc.pid)
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit(WAIT * 2) == 0
    assert still_running_workers(every_worker) == set()


@pytest.mark.parametrize("pump", [pump_param("sockmap")])
def test_each_worker_joins_its_connections_to_its_own_kernel_tunnels(
    gateway_process, backend_factory, pump
) -> None:
    server = backend_factory(echo)
    gw = gateway_process(
        "--dc", "dc1", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--workers", "2",
        "--expose-servers", "--server", f"n={server.address}", "--pump", pump,
    ).wait_listening()  # fmt: skip
    assert "pump=sockmap" in "".join(gw.lines)
    for index in range(40):
        request = HELLO + b"request %d" % index
        with connect(gw.port) as client:
            client.sendall(request)
            assert recv_exactly(client, len(request)) == request
            # The FIN waits for the join: a join that meets an EOF is refused ("eof").
            eventually(partial(has_joined, gw.admin_port, index + 1), what="not joined")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b""
    assert workers_that_served(gw, 40) == {"1", "2"}
    text = metrics_text(gw.admin_port)
    # Merged over both workers: each joined what it accepted, in maps of its own.
    assert 'meshgw_kernel_tunnel_joins_total{trigger="start"} 40.0' in text
    assert "meshgw_kernel_tunnels 0.0" in text
    assert 'outcome="closed",route_kind="local_server"} 40.0' in text
    capacity = [line for line in text.splitlines() if line.startswith("meshgw_kernel_tunnel_cap")]
    assert capacity and float(capacity[0].split()[1]) > 0


DROP_CAPABILITIES = (
    "setpriv", "--bounding-set", "-bpf,-net_admin,-sys_admin", "--inh-caps", "-all",
)  # fmt: skip


@pytest.mark.skipif(
    shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root and setpriv"
)
def test_sockmap_without_capabilities_says_why_once_and_moves_bytes_all_the_same(
    gateway_process, backend_factory
) -> None:
    server = backend_factory(echo)
    gw = gateway_process(
        "--dc", "dc1", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--workers", "2",
        "--expose-servers", "--server", f"n={server.address}", "--pump", "sockmap",
        prefix=DROP_CAPABILITIES,
    ).wait_listening()  # fmt: skip
    assert "pump=auto" in "".join(gw.lines)  # splice and userspace, as the log says
    for index in range(10):
        request = HELLO + b"request %d" % index
        with connect(gw.port) as client:
            client.sendall(request)
            assert recv_exactly(client, len(request)) == request
    text = metrics_text(gw.admin_port)
    assert "meshgw_kernel_tunnel_capacity 0.0" in text
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit(WAIT * 2) == 0
    why = [line for line in gw.lines if "kernel tunnels unavailable" in line]
    assert len(why) == 1, why  # logged by one worker, not by each
    assert "bpf() refused: EPERM (needs CAP_BPF and CAP_NET_ADMIN)" in why[0]
    assert "--pump sockmap moves bytes with splice and userspace" in why[0]
