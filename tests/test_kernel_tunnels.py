"""Kernel tunnels inside the data plane: auto's promotion, sockmap's refusals and retries.

The data-plane suite (test_dataplane.py) runs every pump mode, sockmap included; here is what
only kernel tunnels do. Promotion thresholds are shortened so that tests take a second.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import pytest

from meshgw.bench.hellos import python_hello
from meshgw.dataplane import kernelplane, sockmap
from meshgw.dataplane.kernelplane import Promotion
from meshgw.dataplane.kerneltunnel import KernelTunnel
from meshgw.dataplane.sockmap import TunnelRefused
from tests.conftest import (
    SOCKMAP_UNAVAILABLE,
    WAIT,
    GatewayThread,
    closed_by_peer,
    connect,
    eventually,
    recv_all,
    recv_exactly,
    stream,
)
from tests.test_dataplane import metric, wait_for_tunnels

pytestmark = pytest.mark.skipif(
    SOCKMAP_UNAVAILABLE is not None, reason=f"kernel tunnels: {SOCKMAP_UNAVAILABLE}"
)

HELLO = python_hello("n.server.dc1.consul")
KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def quick_policies(monkeypatch):
    """Promotion after 0.2 s and 16 wake-ups (auto), retries after 0.2 s (sockmap)."""
    monkeypatch.setattr(
        kernelplane,
        "POLICIES",
        {
            "auto": Promotion(at_start=False, after=0.2, wakeups=16),
            "sockmap": Promotion(at_start=True, after=0.2, wakeups=0),
        },
    )


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def kernel_tunnels(gw: GatewayThread) -> list[KernelTunnel]:
    def find() -> list[KernelTunnel]:
        dp = gw.gateway.listener.dp  # type: ignore[union-attr]
        return [conn for conn in dp.connections if isinstance(conn, KernelTunnel)]

    return gw.call(find)


def deadlines(gw: GatewayThread) -> list[float]:
    """When each tunnel waiting for promotion is considered next (call on the loop)."""
    dp = gw.gateway.listener.dp  # type: ignore[union-attr]
    waiting = dp.kernel.waiting
    return [waiting.deadline(conn) for conn in dp.connections if waiting.deadline(conn)]


def joins(gw: GatewayThread, trigger: str) -> float:
    return metric(gw.admin_port, "meshgw_kernel_tunnel_joins_total", trigger=trigger)


def exchange(client: socket.socket, message: bytes) -> None:
    client.sendall(message)
    assert recv_exactly(client, len(message)) == message


# --- auto: promotion ----------------------------------------------------------------------------


def test_auto_promotes_a_busy_long_lived_connection_but_not_a_short_one(
    quick_policies, gateway_factory, backend_factory
):
    server = backend_factory(echo)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="auto")
    # Short: a few exchanges and gone, well before the age a promotion needs.
    with connect(gw.port) as client:
        exchange(client, HELLO)
        for index in range(3):
            exchange(client, b"short %d" % index)
    gw.wait_idle()
    assert joins(gw, "promotion") == 0
    # Long-lived and busy: promoted once old enough and past the wake-ups, then served by
    # the kernel with the same bytes.
    with connect(gw.port) as client:
        exchange(client, HELLO)
        deadline = time.monotonic() + WAIT
        count = 0
        while not kernel_tunnels(gw):
            assert time.monotonic() < deadline, "never promoted"
            exchange(client, b"before %d" % count)
            count += 1
        assert count >= 8  # 16 wake-ups: two per exchange
        for index in range(200):
            exchange(client, b"after %d" % index)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
    gw.wait_idle()
    assert joins(gw, "promotion") == 1
    assert metric(gw.admin_port, "meshgw_connections_total", route_kind="local_server",
                  datacenter="dc1", outcome="closed") == 2  # fmt: skip


def test_an_idle_connection_is_not_promoted(quick_policies, gateway_factory, backend_factory):
    """Old enough but quiet: the join would cost more than it saves."""
    server = backend_factory(echo)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="auto")
    with connect(gw.port) as client:
        exchange(client, HELLO)
        first = gw.call(lambda: deadlines(gw))
        assert len(first) == 1
        # A round found it of age, judged it and put it back to wait: not promoted.
        eventually(lambda: gw.call(lambda: deadlines(gw)) > first, what="never considered")
        assert kernel_tunnels(gw) == []
        exchange(client, b"still userspace")
    gw.wait_idle()
    assert joins(gw, "promotion") == 0


def paced(seed: bytes, total: int, chunk: int, pause: float, sent: list[int]):
    """`total` bytes in `chunk`s with a pause between them: a stream with quiet moments."""
    for block in stream(seed, total, block=chunk):
        yield block
        sent[0] += len(block)
        time.sleep(pause)


def test_auto_promotes_mid_stream_byte_exact_both_ways(
    quick_policies, gateway_factory, backend_factory
):
    """Streams both ways at once; the promotion lands in the middle of them. Every byte
    arrives once, in order: those moved before (Flows), during (the join's own catch-up) and
    after (the kernel)."""
    size = 24 * MiB
    got: dict[str, bytes] = {}
    server_sent = [0]

    def server_side(conn: socket.socket) -> None:
        digest = hashlib.sha256(recv_exactly(conn, len(HELLO)))

        def send() -> None:
            sent = hashlib.sha256()
            for block in paced(b"down", size, 16 * KiB, 0.0005, server_sent):
                conn.sendall(block)
                sent.update(block)
            conn.shutdown(socket.SHUT_WR)
            got["down_sent"] = sent.digest()

        sender = threading.Thread(target=send)
        sender.start()
        while data := conn.recv(1 << 20):
            digest.update(data)
        got["up_received"] = digest.digest()
        sender.join(WAIT * 3)

    server = backend_factory(server_side)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="auto")
    client_sent = [0]
    promoted: list[KernelTunnel] = []
    with connect(gw.port) as client:
        client.settimeout(WAIT * 3)

        def send() -> None:
            sent = hashlib.sha256(HELLO)
            client.sendall(HELLO)
            for block in paced(b"up", size, 16 * KiB, 0.0005, client_sent):
                client.sendall(block)
                sent.update(block)
            client.shutdown(socket.SHUT_WR)
            got["up_sent"] = sent.digest()

        def watch() -> None:
            deadline = time.monotonic() + WAIT * 3
            while not promoted and time.monotonic() < deadline:
                promoted.extend(kernel_tunnels(gw))
                time.sleep(0.01)

        threads = [threading.Thread(target=send), threading.Thread(target=watch)]
        for thread in threads:
            thread.start()
        digest = hashlib.sha256()
        received = 0
        while data := client.recv(1 << 20):
            digest.update(data)
            received += len(data)
        for thread in threads:
            thread.join(WAIT * 3)
    server.close()
    assert received == size
    assert got["up_sent"] == got["up_received"]
    assert got["down_sent"] == digest.digest()
    gw.wait_idle()
    assert joins(gw, "promotion") == 1 and len(promoted) == 1
    up_before, down_before = promoted[0].before
    assert len(HELLO) < up_before < len(HELLO) + size  # promoted mid-stream, both ways
    assert 0 < down_before < size
    for direction, total in (("upstream", len(HELLO) + size), ("downstream", size)):
        assert metric(gw.admin_port, "meshgw_bytes_total", route_kind="local_server",
                      datacenter="dc1", direction=direction) == total  # fmt: skip


# --- sockmap: refusals and retries --------------------------------------------------------------


def test_a_full_map_refuses_then_the_connection_is_joined_when_a_slot_frees(
    quick_policies, monkeypatch, gateway_factory, backend_factory
):
    monkeypatch.setattr(kernelplane, "MAX_KERNEL_TUNNELS", 1)
    server = backend_factory(echo)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="sockmap")
    first = connect(gw.port)
    exchange(first, HELLO)
    with connect(gw.port) as second:
        exchange(second, HELLO)
        assert metric(gw.admin_port, "meshgw_kernel_tunnel_refusals_total", reason="full") >= 1
        exchange(second, b"through userspace")
        first.close()  # its slot frees; the second is joined at a later round
        eventually(lambda: joins(gw, "promotion") == 1, what="the retry never joined")
        for index in range(20):
            exchange(second, b"through the kernel %d" % index)
        second.shutdown(socket.SHUT_WR)
        assert recv_all(second) == b""
    gw.wait_idle()
    assert joins(gw, "start") == 1


def test_a_failed_join_resets_both_sides(monkeypatch, gateway_factory, backend_factory):
    """ "error": the kernel tunnel failed half-way; neither side can be trusted to go on."""

    def fail(tunnels, a, b):
        raise TunnelRefused("error", "injected")

    monkeypatch.setattr(sockmap.KernelTunnels, "join", fail)
    ended = threading.Event()

    def wait_for_the_end(conn: socket.socket) -> None:
        try:
            recv_all(conn)
        except ConnectionResetError:
            ended.set()

    server = backend_factory(wait_for_the_end)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="sockmap")
    with connect(gw.port) as client:
        client.sendall(HELLO)
        assert closed_by_peer(client)
    assert ended.wait(WAIT)
    gw.wait_idle()
    assert metric(gw.admin_port, "meshgw_connections_total", route_kind="local_server",
                  datacenter="dc1", outcome="join_failed") == 1  # fmt: skip


# --- bugs stay with their connection ----------------------------------------------------------


def test_a_promotion_that_raises_closes_that_connection_only(
    quick_policies, monkeypatch, gateway_factory, backend_factory
):
    from meshgw.dataplane.tunnel import Tunnel

    real = Tunnel.promote
    broken: list[Tunnel] = []

    def promote_or_fail(tunnel: Tunnel, trigger: str) -> str:
        if not broken:
            broken.append(tunnel)
            raise RuntimeError("a bug")
        return real(tunnel, trigger)

    monkeypatch.setattr(Tunnel, "promote", promote_or_fail)
    server = backend_factory(echo)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="auto")
    with connect(gw.port) as first:
        exchange(first, HELLO)
        for index in range(20):
            exchange(first, b"busy %d" % index)
        eventually(lambda: bool(broken), what="never considered")
        assert closed_by_peer(first)
    # The rounds go on: the next busy connection is promoted.
    with connect(gw.port) as second:
        exchange(second, HELLO)
        for index in range(20):
            exchange(second, b"busy %d" % index)
        eventually(lambda: joins(gw, "promotion") == 1, what="the rounds stopped")
        exchange(second, b"in the kernel")
    gw.wait_idle()
    assert metric(gw.admin_port, "meshgw_internal_errors_total") == 1
    assert metric(gw.admin_port, "meshgw_connections_total", route_kind="local_server",
                  datacenter="dc1", outcome="internal_error") == 1  # fmt: skip


def test_a_flush_check_that_raises_closes_that_connection_only(
    monkeypatch, gateway_factory, backend_factory
):
    calls = [0]

    def not_yet_then_fail(tunnels, tunnel, src):
        calls[0] += 1
        if calls[0] == 1:
            return False  # retried on a timer...
        raise RuntimeError("a bug")  # ...where it fails

    monkeypatch.setattr(sockmap.KernelTunnels, "flushed", not_yet_then_fail)
    server = backend_factory(echo)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="sockmap")
    with connect(gw.port) as client:
        exchange(client, HELLO)
        wait_for_tunnels(gw, 1)  # an EOF before the join would have it refused
        client.shutdown(socket.SHUT_WR)
        assert closed_by_peer(client)
    gw.wait_idle()
    assert joins(gw, "start") == 1
    assert metric(gw.admin_port, "meshgw_internal_errors_total") == 1


def test_maps_the_kernel_refuses_leave_the_gateway_in_userspace(
    monkeypatch, caplog, gateway_factory, backend_factory
):
    import errno

    def no_memory(capacity: int, credit: int) -> sockmap.KernelTunnels:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(kernelplane, "KernelTunnels", no_memory)
    server = backend_factory(echo)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump="sockmap")
    assert gw.gateway.listener.pump_mode == "auto"
    assert "kernel tunnels off in this process: BPF maps for" in caplog.text
    assert "Cannot allocate memory" in caplog.text
    with connect(gw.port) as client:
        exchange(client, HELLO)
    assert metric(gw.admin_port, "meshgw_kernel_tunnel_capacity") == 0
