"""The data plane over real loopback sockets: routing, byte-exactness, half-close, limits."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hashlib
import logging
import os
import resource
import signal
import socket
import ssl
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from meshgw.bench.hellos import padded_to, python_hello, reframe, with_mlkem_key_share
from meshgw.dataplane import splice
from meshgw.dataplane.budget import (
    MAX_AUTO_CONNECTIONS,
    MIN_AUTO_CONNECTIONS,
    DescriptorBudget,
    descriptors_for,
)
from meshgw.dataplane.poller import Poller
from meshgw.metrics import DataPlaneStats
from meshgw.tls.certs import create_ca, create_cert
from tests.conftest import (
    WAIT,
    Backend,
    GatewayProcess,
    GatewayThread,
    closed_by_peer,
    connect,
    eventually,
    open_fds,
    pump_param,
    recv_all,
    recv_exactly,
    stream,
)
from tests.hellos import TRUST_DOMAIN as TD


def metric(admin_port: int, name: str, **labels: str) -> float:
    """The value of one sample from /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=WAIT) as r:
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if "{" in key:
            metric_name, _, rest = key.partition("{")
            parsed = ",".join(sorted(rest.rstrip("}").split(",")))
        else:
            metric_name, parsed = key, ""
        if metric_name == name and parsed == want:
            return float(value)
    return 0.0


def assert_joined(gw: GatewayThread | GatewayProcess, pump: str, joins: int) -> None:
    """In sockmap mode, the connections really went through kernel tunnels (no fallback)."""
    if pump == "sockmap":
        assert metric(gw.admin_port, "meshgw_kernel_tunnel_joins_total", trigger="start") == joins


def handed_over(admin_port: int) -> float:
    """Connections whose hello the upstream took: past their Opening (and, in sockmap mode,
    past the join, which follows in the same turn of the loop)."""
    return metric(admin_port, "meshgw_upstream_connect_seconds_count", route_kind="local_server")


def wait_for_tunnels(gw: GatewayThread, count: int) -> None:
    """Until `count` connections are past their hello (a Tunnel, or a KernelTunnel)."""
    from meshgw.dataplane.opening import Opening

    def tunnels() -> int:
        dp = gw.gateway.listener.dp  # type: ignore[union-attr]
        return sum(not isinstance(conn, Opening) for conn in dp.connections)

    eventually(lambda: gw.call(tunnels) == count, what=f"not {count} tunnels")


def recorder(store: list[bytes]):
    """A backend handler that keeps everything it receives until EOF, then closes."""

    def handle(conn: socket.socket) -> None:
        store.append(recv_all(conn))

    return handle


# --- real TLS through the gateway --------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = create_ca()
    folder = tmp_path_factory.mktemp("pki")
    (folder / "ca.pem").write_bytes(ca.cert_pem)
    files = {"ca": folder / "ca.pem"}
    for dc, node in [("dc1", "node1"), ("dc2", "node2")]:
        issued = create_cert(ca, "server", dc=dc, node=node)
        (folder / f"{dc}.pem").write_bytes(issued.cert_pem)
        (folder / f"{dc}-key.pem").write_bytes(issued.key_pem)
        files[dc] = folder / f"{dc}.pem"
        files[f"{dc}-key"] = folder / f"{dc}-key.pem"
    return files


def tls_server(pki, dc: str):
    """A Consul-server-like TLS endpoint: mTLS, answers with its name and what it was sent."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki[dc], pki[f"{dc}-key"])
    ctx.load_verify_locations(pki["ca"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["consul/rpc-multi"])

    def handle(conn: socket.socket) -> None:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            data = tls.recv(1024)
            tls.sendall(f"{dc}:{tls.selected_alpn_protocol()}:".encode() + data)

    return handle


def tls_client(pki, dc: str, port: int, name: str) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki["ca"])
    ctx.load_cert_chain(pki[dc], pki[f"{dc}-key"])
    ctx.set_alpn_protocols(["consul/rpc-multi"])
    with (
        connect(port) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as tls,
    ):
        tls.sendall(b"ping")
        return tls.recv(1024)


def test_tls_with_hostname_verification_to_local_and_remote_servers(
    pki, gateway_factory, backend_factory, pump
):
    dc1_server = backend_factory(tls_server(pki, "dc1"))
    dc2_server = backend_factory(tls_server(pki, "dc2"))
    dc2_gateway = gateway_factory(
        dc="dc2", expose_servers=True, server=[f"node2={dc2_server.address}"], pump=pump
    )
    dc1_gateway = gateway_factory(
        dc="dc1",
        expose_servers=True,
        server=[f"node1={dc1_server.address}"],
        gateway=[f"dc2=127.0.0.1:{dc2_gateway.port}"],
        pump=pump,
    )
    port = dc1_gateway.port
    assert tls_client(pki, "dc1", port, "node1.server.dc1.consul") == b"dc1:consul/rpc-multi:ping"
    assert tls_client(pki, "dc1", port, "server.dc1.consul") == b"dc1:consul/rpc-multi:ping"
    # dc1 → dc2's gateway → dc2's server, by exact node name, wildcard and bare server name.
    assert tls_client(pki, "dc1", port, "node2.server.dc2.consul") == b"dc2:consul/rpc-multi:ping"
    assert tls_client(pki, "dc1", port, "server.dc2.consul") == b"dc2:consul/rpc-multi:ping"
    # The gateway never terminates TLS: a server whose certificate lacks the name is caught by
    # the client's own verification, end to end.
    dc3_gateway = gateway_factory(
        dc="dc3", expose_servers=True, server=[f"imposter={dc1_server.address}"], pump=pump
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_client(pki, "dc1", dc3_gateway.port, "imposter.server.dc3.consul")
    assert metric(dc1_gateway.admin_port, "meshgw_alpn_offered_total", protocol="consul/rpc-multi")


def test_openssl_s_client_through_the_gateway(pki, gateway_factory, backend_factory, pump):
    server = backend_factory(tls_server(pki, "dc1"))
    gw = gateway_factory(expose_servers=True, server=[f"node1={server.address}"], pump=pump)
    import subprocess

    result = subprocess.run(
        [
            "openssl", "s_client", "-connect", f"127.0.0.1:{gw.port}",
            "-servername", "node1.server.dc1.consul", "-verify_hostname",
            "node1.server.dc1.consul", "-CAfile", str(pki["ca"]), "-cert", str(pki["dc1"]),
            "-key", str(pki["dc1-key"]), "-alpn", "consul/rpc-multi", "-verify_return_error",
            "-quiet",
        ],
        input=b"hello-openssl",
        capture_output=True,
        timeout=WAIT,
    )  # fmt: skip
    assert b"dc1:consul/rpc-multi:hello-openssl" in result.stdout, result.stderr


# --- byte-exactness ----------------------------------------------------------------------------


BULK_HELLO = python_hello("node1.server.dc1.consul")


def bulk_backend(
    backend_factory, size: int, got: dict[str, str], speaks_first: bool = False
) -> Backend:
    """A server that sends `size` bytes while it reads until EOF; digests go into `got`. It
    starts sending once the client's stream has begun after the hello, or at once
    (`speaks_first`)."""

    def backend(conn: socket.socket) -> None:
        digest = hashlib.sha256()
        if not speaks_first:
            digest.update(recv_exactly(conn, len(BULK_HELLO)))
            digest.update(conn.recv(1 << 20))  # the client's stream has begun

        def send() -> None:
            sent = hashlib.sha256()
            for chunk in stream(b"down", size):
                conn.sendall(chunk)
                sent.update(chunk)
            conn.shutdown(socket.SHUT_WR)
            got["down_sent"] = sent.hexdigest()

        sender = threading.Thread(target=send)
        sender.start()
        while chunk := conn.recv(1 << 20):
            digest.update(chunk)
        got["up_received"] = digest.hexdigest()
        sender.join(60)

    return backend_factory(backend)


def bulk_both_ways(gw: GatewayThread, server: Backend, size: int, got: dict[str, str]) -> None:
    """`size` bytes each way at once through `gw` to `bulk_backend`, byte-exact."""
    hello = BULK_HELLO
    with connect(gw.port) as client:
        client.settimeout(60)

        # As a TLS client waits for the server's answer: the stream starts once the hello is
        # upstream, so a kernel tunnel is joined before any of it (the server waits for it).
        client.sendall(hello)
        wait_for_tunnels(gw, 1)

        def send() -> None:
            digest = hashlib.sha256(hello)
            for chunk in stream(b"up", size):
                client.sendall(chunk)
                digest.update(chunk)
            client.shutdown(socket.SHUT_WR)
            got["up_sent"] = digest.hexdigest()

        sender = threading.Thread(target=send)
        sender.start()
        digest = hashlib.sha256()
        received = 0
        while chunk := client.recv(1 << 20):
            digest.update(chunk)
            received += len(chunk)
        sender.join(60)
    got["down_received"] = digest.hexdigest()
    server.close()
    assert not server.errors
    assert received == size
    assert got["up_sent"] == got["up_received"]
    assert got["down_sent"] == got["down_received"]
    gw.wait_idle()


@pytest.mark.parametrize(
    ("pump", "size"),
    [
        pump_param("auto", 256 << 20),
        pump_param("splice", 256 << 20),
        pump_param("userspace", 64 << 20),
        pump_param("sockmap", 256 << 20),
    ],
)
def test_bulk_both_ways_at_once_is_byte_exact(gateway_factory, backend_factory, pump, size):
    got: dict[str, str] = {}
    server = bulk_backend(backend_factory, size, got)
    gw = gateway_factory(expose_servers=True, server=[f"node1={server.address}"], pump=pump)
    bulk_both_ways(gw, server, size, got)
    assert_joined(gw, pump, 1)
    for direction, total in (("downstream", size), ("upstream", len(BULK_HELLO) + size)):
        assert metric(gw.admin_port, "meshgw_bytes_total", route_kind="local_server",
                      datacenter="dc1", direction=direction) == total  # fmt: skip


def queued(sock: socket.socket) -> int:
    """Bytes waiting in a socket's receive queue (FIONREAD)."""
    import fcntl
    import struct
    import termios

    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


@pytest.mark.parametrize("pump", [pump_param("sockmap")])
def test_a_join_refused_as_busy_leaves_the_bytes_to_the_flows(
    gateway_factory, backend_factory, pump, monkeypatch
):
    """More is queued at the join than it forwards itself: the kernel tunnel is refused
    ("busy"), the Flows take over, and what the join forwarded before it gave up is counted."""
    from meshgw.dataplane import sockmap

    monkeypatch.setattr(sockmap, "CATCH_UP_LIMIT", 16 << 10)
    real_join = sockmap.KernelTunnels.join

    def join_once_the_server_spoke(tunnels, a, b):
        eventually(lambda: queued(b) >= 32 << 10, what="the server's bytes never came")
        return real_join(tunnels, a, b)

    monkeypatch.setattr(sockmap.KernelTunnels, "join", join_once_the_server_spoke)
    got: dict[str, str] = {}
    server = bulk_backend(backend_factory, 64 << 20, got, speaks_first=True)
    gw = gateway_factory(expose_servers=True, server=[f"node1={server.address}"], pump=pump)
    bulk_both_ways(gw, server, 64 << 20, got)
    assert metric(gw.admin_port, "meshgw_kernel_tunnel_refusals_total", reason="busy") >= 1
    for direction, total in (("downstream", 64 << 20), ("upstream", len(BULK_HELLO) + (64 << 20))):
        assert metric(gw.admin_port, "meshgw_bytes_total", route_kind="local_server",
                      datacenter="dc1", direction=direction) == total  # fmt: skip


@pytest.mark.parametrize("shortage", ["budget", "emfile"])
def test_no_pipe_to_be_had_moves_the_burst_through_userspace(
    gateway_factory, backend_factory, monkeypatch, shortage
):
    got: dict[str, str] = {}
    server = bulk_backend(backend_factory, 16 << 20, got)
    gw = gateway_factory(expose_servers=True, server=[f"node1={server.address}"], pump="splice")
    if shortage == "budget":
        gw.call(lambda: setattr(gw.gateway.listener.dp.pipes, "max_pipes", 0))
    else:

        def out_of_descriptors(flags: int) -> tuple[int, int]:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(splice.os, "pipe2", out_of_descriptors)
    bulk_both_ways(gw, server, 16 << 20, got)
    assert metric(gw.admin_port, "meshgw_splice_pipe_shortages_total") > 0
    assert metric(gw.admin_port, "meshgw_splice_pipes_open") == 0


async def test_a_handler_that_raises_does_not_lose_the_other_events() -> None:
    loop = asyncio.get_running_loop()
    failures: list[tuple[object, Exception]] = []
    delivered: asyncio.Future[int] = loop.create_future()
    poller = Poller(loop, lambda handler, error: failures.append((handler, error)))
    pairs = [socket.socketpair() for _ in range(2)]

    def broken(events: int) -> None:
        raise RuntimeError("a bug")

    try:
        poller.register(pairs[0][0].fileno(), broken)
        poller.register(pairs[1][0].fileno(), delivered.set_result)
        for _, peer in pairs:
            peer.send(b"x")
        await asyncio.wait_for(delivered, WAIT)  # one batch delivers both events
        assert [handler for handler, _ in failures] == [broken]
    finally:
        poller.close()
        for a, b in pairs:
            a.close()
            b.close()


@pytest.fixture
def routing_bug(monkeypatch: pytest.MonkeyPatch) -> str:
    """An ALPN protocol that makes the data plane meet a bug while routing (counting it raises:
    DataPlaneStats lives in metrics.py, which both builds leave pure)."""
    trigger = "meshgw-test-bug"
    offered = DataPlaneStats.offered

    def buggy(stats: DataPlaneStats, protocol: str) -> None:
        if protocol == trigger:
            raise RuntimeError("a bug met while routing")
        offered(stats, protocol)

    monkeypatch.setattr(DataPlaneStats, "offered", buggy)
    return trigger


def test_a_bug_in_a_connections_handler_closes_only_that_connection(
    gateway_factory, backend_factory, routing_bug
):
    """The poller finds the connection that owns a failing handler (a bound method's
    __self__, in either build) and closes it, counted; the gateway serves on."""
    received: list[bytes] = []
    server = backend_factory(recorder(received))
    gw = gateway_factory(expose_servers=True, server=[f"node1={server.address}"])
    hello = python_hello("node1.server.dc1.consul", alpn=(routing_bug,))
    with connect(gw.port) as client:
        # The hello's first bytes get the connection accepted and its handler registered;
        # the rest then reaches it through the poller, where the bug is met.
        client.sendall(hello[:40])
        eventually(lambda: gw.active() == 1, what="the connection was not accepted")
        client.sendall(hello[40:])
        assert closed_by_peer(client)
    gw.wait_idle()
    assert metric(gw.admin_port, "meshgw_internal_errors_total") == 1
    assert server.accepted == 0
    good = python_hello("node1.server.dc1.consul")
    with connect(gw.port) as client:
        client.sendall(good)
        client.shutdown(socket.SHUT_WR)
        assert closed_by_peer(client)
    gw.wait_idle()
    assert received == [good]
    assert metric(gw.admin_port, "meshgw_internal_errors_total") == 1


def test_a_bug_met_on_accept_closes_only_that_connection(
    gateway_factory, backend_factory, routing_bug
):
    """A hello that is whole at accept is read there, before the poller has a handler: a bug
    met in that first read is contained the same way, counted, the connection closed."""
    server = backend_factory(recorder([]))
    gw = gateway_factory(expose_servers=True, server=[f"node1={server.address}"])
    with connect(gw.port) as client:
        client.sendall(python_hello("node1.server.dc1.consul", alpn=(routing_bug,)))
        assert closed_by_peer(client)
    gw.wait_idle()
    assert metric(gw.admin_port, "meshgw_internal_errors_total") == 1
    assert server.accepted == 0


def test_half_close_each_way(gateway_factory, backend_factory, pump):
    hello = python_hello("server.dc1.consul")

    def server_answers_after_eof(conn: socket.socket) -> None:
        request = recv_all(conn)  # until the client's FIN
        conn.sendall(b"answer:" + hashlib.sha256(request).digest())

    a = backend_factory(server_answers_after_eof)
    gw = gateway_factory(expose_servers=True, server=[f"a={a.address}"], pump=pump)
    with connect(gw.port) as client:
        client.sendall(hello)
        # The FIN comes once the tunnel runs (a kernel tunnel is joined only before an EOF).
        wait_for_tunnels(gw, 1)
        client.sendall(b"request body")
        client.shutdown(socket.SHUT_WR)
        reply = recv_all(client)
    assert reply == b"answer:" + hashlib.sha256(hello + b"request body").digest()

    # The server finishes first; the client keeps sending after the server's FIN.
    tail: list[bytes] = []

    def server_closes_first(conn: socket.socket) -> None:
        recv_exactly(conn, len(hello) + 2)
        conn.sendall(b"bye")
        conn.shutdown(socket.SHUT_WR)
        tail.append(recv_all(conn))

    b = backend_factory(server_closes_first)
    gw2 = gateway_factory(expose_servers=True, server=[f"b={b.address}"], pump=pump)
    with connect(gw2.port) as client:
        client.sendall(hello)
        wait_for_tunnels(gw2, 1)  # the server ends once the tunnel runs
        client.sendall(b"go")
        assert recv_all(client) == b"bye"  # EOF from the server came through
        client.sendall(b"still talking")
        client.shutdown(socket.SHUT_WR)
        b.close()
    assert tail == [b"still talking"]
    assert_joined(gw, pump, 1)
    assert_joined(gw2, pump, 1)


@pytest.mark.parametrize("shape", ["one_byte_at_a_time", "multi_record", "mlkem_multi_record"])
def test_split_and_multi_record_hellos_are_forwarded_verbatim(
    gateway_factory, backend_factory, shape, pump
):
    received: list[bytes] = []
    server = backend_factory(recorder(received))
    gw = gateway_factory(expose_servers=True, server=[f"n1={server.address}"], pump=pump)
    hello = python_hello("n1.server.dc1.consul")
    if shape == "multi_record":
        hello = reframe(hello, [60, 7, 100])
    elif shape == "mlkem_multi_record":
        hello = reframe(with_mlkem_key_share(hello), [1200])
    with connect(gw.port) as client:
        if shape == "one_byte_at_a_time":
            for i in range(len(hello)):
                client.send(hello[i : i + 1])
        else:
            client.sendall(hello)
        client.sendall(b"after")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
    server.close()
    assert received == [hello + b"after"]


# --- failover, refusals, deadlines, limits -----------------------------------------------------


def refused_address() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connecting is refused
    return f"127.0.0.1:{port}"


def test_failover_past_a_refusing_endpoint(gateway_factory, backend_factory, pump):
    received: list[bytes] = []
    server = backend_factory(recorder(received))
    gw = gateway_factory(
        expose_servers=True,
        gateway=[f"dc2={refused_address()}", f"dc2={server.address}"],
        pump=pump,
    )
    hello = python_hello("server.dc2.consul")
    for _ in range(4):  # whichever endpoint comes first, the client gets through
        with connect(gw.port) as client:
            client.sendall(hello)
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b""
    server.close()
    assert received == [hello] * 4
    failures = metric(
        gw.admin_port,
        "meshgw_upstream_connect_failures_total",
        route_kind="remote_server",
        datacenter="dc2",
        reason="econnrefused",
    )
    # Once refused, the endpoint is tried last for a while (passive health): at least once.
    assert failures >= 1


def test_every_endpoint_down_closes_the_client(gateway_factory):
    gw = gateway_factory(expose_servers=True, gateway=[f"dc2={refused_address()}"])
    with connect(gw.port) as client:
        client.sendall(python_hello("server.dc2.consul"))
        assert closed_by_peer(client)
    assert metric(gw.admin_port, "meshgw_rejections_total", reason="no_upstream") == 1


def test_connect_timeout_fails_over(gateway_factory, backend_factory, pump):
    received: list[bytes] = []
    server = backend_factory(recorder(received))
    # A listener whose backlog is full never completes new handshakes: a black hole.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(hole.getsockname())
        fillers.append(s)
    try:
        gw = gateway_factory(
            expose_servers=True,
            connect_timeout=0.3,
            gateway=[f"dc2=127.0.0.1:{hole.getsockname()[1]}", f"dc2={server.address}"],
            pump=pump,
        )
        hello = python_hello("server.dc2.consul")
        for _ in range(2):
            with connect(gw.port) as client:
                client.sendall(hello)
                client.shutdown(socket.SHUT_WR)
                assert recv_all(client) == b""
        server.close()
        assert received == [hello] * 2
        timeouts = metric(
            gw.admin_port,
            "meshgw_upstream_connect_failures_total",
            route_kind="remote_server",
            datacenter="dc2",
            reason="etimedout",
        )
        assert timeouts == 1
    finally:
        for s in fillers:
            s.close()
        hole.close()


def _sockets_short(monkeypatch, count: int | None) -> list[int]:
    """The next `count` upstream sockets (every one if None) fail as at the open-file limit."""
    from meshgw.dataplane.dialer import Dialer

    real = Dialer._socket
    refused = [0]

    def short_then_real(dialer: Dialer, target):
        if count is None or refused[0] < count:
            refused[0] += 1
            raise OSError(errno.EMFILE, "Too many open files")
        return real(dialer, target)

    monkeypatch.setattr(Dialer, "_socket", short_then_real)
    return refused


def test_no_descriptor_for_the_upstream_waits_and_marks_nobody_down(
    monkeypatch, gateway_factory, backend_factory
):
    """The process's shortage is not the endpoint's fault: the connection waits for a
    descriptor and goes through; the endpoint is not marked down."""
    refused = _sockets_short(monkeypatch, 3)
    received: list[bytes] = []
    server = backend_factory(recorder(received))
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"])
    hello = python_hello("n.server.dc1.consul")
    with connect(gw.port) as client:
        client.sendall(hello)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
    server.close()
    assert received == [hello] and refused == [3]
    failures = metric(gw.admin_port, "meshgw_upstream_connect_failures_total",
                      route_kind="local_server", datacenter="dc1", reason="emfile")  # fmt: skip
    assert failures == 3
    assert gw.call(lambda: gw.gateway.listener.dp.outliers.down_now()) == {}
    assert metric(gw.admin_port, "meshgw_rejections_total", reason="no_upstream") == 0


def test_no_descriptor_until_the_connect_timeout_closes_the_client(
    monkeypatch, caplog, gateway_factory
):
    caplog.set_level(logging.INFO, logger="meshgw.access")
    refused = _sockets_short(monkeypatch, None)
    address = refused_address()
    gw = gateway_factory(
        expose_servers=True, server=[f"n={address}"], connect_timeout=0.3, access_log=True
    )
    with connect(gw.port) as client:
        client.sendall(python_hello("n.server.dc1.consul"))
        assert closed_by_peer(client)
    assert refused[0] >= 2  # asked again, not given up at once
    assert metric(gw.admin_port, "meshgw_rejections_total", reason="no_upstream") == 1
    lines = [getattr(r, "fields", {}) for r in caplog.records if r.name == "meshgw.access"]
    assert [line.get("tried") for line in lines] == [f"{address} no descriptor"]
    assert gw.call(lambda: gw.gateway.listener.dp.outliers.down_now()) == {}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not_tls"),
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "not_client_hello"),
        (python_hello(None), "no_sni"),
        (python_hello("node1.server.dc9.consul"), "unknown_sni"),
        (python_hello("example.com"), "unknown_sni"),
        (python_hello("web.default.dc1.internal." + TD), "unknown_sni"),
    ],
)
def test_unknown_and_malformed_input_is_refused(gateway_factory, backend_factory, payload, reason):
    server = backend_factory(recorder([]))
    gw = gateway_factory(expose_servers=True, server=[f"node1={server.address}"])
    with connect(gw.port) as client:
        client.sendall(payload)
        assert closed_by_peer(client)
    assert server.accepted == 0
    assert metric(gw.admin_port, "meshgw_rejections_total", reason=reason) == 1


def test_without_expose_servers_no_server_name_is_routed(gateway_factory, backend_factory):
    server = backend_factory(recorder([]))
    gw = gateway_factory(server=[f"node1={server.address}"], gateway=["dc2=127.0.0.1:9"])
    for name in ["node1.server.dc1.consul", "server.dc1.consul", "server.dc2.consul"]:
        with connect(gw.port) as client:
            client.sendall(python_hello(name))
            assert closed_by_peer(client)
    assert server.accepted == 0


def test_hello_deadline(gateway_factory):
    gw = gateway_factory(hello_timeout=0.3)
    hello = python_hello("server.dc1.consul")
    with connect(gw.port) as client:
        client.sendall(hello[:40])  # a slow client: part of a hello, then nothing
        started = time.monotonic()
        assert closed_by_peer(client)
        assert 0.2 < time.monotonic() - started < 3
    assert metric(gw.admin_port, "meshgw_rejections_total", reason="hello_timeout") == 1


def test_hello_over_the_cap_is_refused(gateway_factory):
    gw = gateway_factory(max_hello_bytes=2048)
    with connect(gw.port) as client:
        client.sendall(padded_to(with_mlkem_key_share(python_hello("server.dc1.consul")), 4096))
        assert closed_by_peer(client)
    assert metric(gw.admin_port, "meshgw_rejections_total", reason="too_large") == 1


def test_max_connections(gateway_factory):
    gw = gateway_factory(max_connections=2)
    held = [connect(gw.port) for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(b"\x16")  # the start of a hello: accepted, waiting for the rest
        deadline = time.monotonic() + WAIT
        while gw.active() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            third = connect(gw.port)
            third.sendall(b"\x16")
        except ConnectionResetError:
            pass  # reset so fast that sending already failed: refused all the same
        else:
            with third:
                assert closed_by_peer(third)
        assert metric(gw.admin_port, "meshgw_rejections_total", reason="max_connections") == 1
    finally:
        for sock in held:
            sock.close()


class FakeLimits:
    """RLIMIT_NOFILE as the descriptor budget sees it, without touching this process's own."""

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse

    def getrlimit(self, which: int) -> tuple[int, int]:
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed")
        self.soft, self.hard = limits


@pytest.mark.parametrize(
    ("requested", "others", "soft", "hard", "budget", "soft_after"),
    [
        # auto: up to the hard limit; 2 descriptors a connection, 2 a pipe, at most 512 pipes
        (None, 0, 1024, 20000, (9424, 512), 20000),
        (None, 0, 20000, 20000, (9424, 512), 20000),
        (None, 0, 2048, 2048, (768, 192), 2048),  # a pipe per 4 connections below the pipe cap
        (None, 0, 1024, resource.RLIM_INFINITY, (65536, 512), 2 * 65536 + 2 * 512 + 128),
        (None, 0, 300, 300, (68, 17), 300),  # a tiny limit still leaves a usable cap
        (None, 1124, 1024, 20000, (8862, 512), 20000),  # room kept for the agent's connections
        (100, 0, 1024, 20000, (100, 25), 1024),  # enough already: left alone
        (5000, 0, 1024, 20000, (5000, 512), 11152),  # raised to what the cap needs
        (5000, 1124, 1024, 20000, (5000, 512), 12276),  # and to the agent's connections
        (50000, 0, 1024, 20000, (50000, 512), 20000),  # as far as it goes (and a warning)
    ],
)
def test_descriptor_budget_follows_the_open_file_limit(
    monkeypatch, requested, others, soft, hard, budget, soft_after
):
    limits = FakeLimits(soft, hard)
    monkeypatch.setattr(resource, "getrlimit", limits.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", limits.setrlimit)
    found = DescriptorBudget.for_limit(requested, others)
    assert (found.connections, found.pipes) == budget
    assert limits.soft == soft_after
    if requested is None and found.connections > MIN_AUTO_CONNECTIONS:
        assert descriptors_for(found.connections, others) <= limits.soft  # everything fits


def test_descriptor_budget_when_the_limit_cannot_be_raised(monkeypatch, caplog):
    limits = FakeLimits(1024, 20000, refuse=True)
    monkeypatch.setattr(resource, "getrlimit", limits.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", limits.setrlimit)
    assert DescriptorBudget.for_limit(None) == DescriptorBudget(358, 89)
    assert "cannot raise the open-file limit" in caplog.text


def test_default_cap_is_what_the_descriptors_allow(gateway_process):
    """9,000 idle connections fit one process under a 20,000 descriptor limit, as the
    benchmark's idle scenario needs, without --max-connections."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    gw = gateway_process("--dc", "dc1", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0")
    gw.wait_listening()
    found = int(gw.wait_for(r"max_connections=(\d+)").group(1))
    if hard == resource.RLIM_INFINITY:
        assert found == MAX_AUTO_CONNECTIONS
    else:
        assert descriptors_for(found) <= hard < descriptors_for(found + 1)
        assert hard < 20000 or found >= 9000


def test_idle_timeout_closes_quiet_connections(gateway_factory, backend_factory, pump):
    def hold(conn: socket.socket) -> None:
        recv_all(conn)

    server = backend_factory(hold)
    gw = gateway_factory(
        expose_servers=True, server=[f"n={server.address}"], idle_timeout=0.4, pump=pump
    )
    with connect(gw.port) as client:
        client.sendall(python_hello("n.server.dc1.consul"))
        started = time.monotonic()
        assert closed_by_peer(client)
        assert 0.3 < time.monotonic() - started < 3
    assert_joined(gw, pump, 1)
    assert metric(gw.admin_port, "meshgw_connections_total", route_kind="local_server",
                  datacenter="dc1", outcome="idle_timeout") == 1  # fmt: skip


def test_client_reset_resets_the_upstream(gateway_factory, backend_factory, pump):
    import struct

    hello = python_hello("n.server.dc1.consul")
    got_hello = threading.Event()
    outcome: list[str] = []

    def wait_for_the_end(conn: socket.socket) -> None:
        recv_exactly(conn, len(hello))
        got_hello.set()
        try:
            while conn.recv(65536):
                pass
            outcome.append("eof")
        except ConnectionResetError:
            outcome.append("reset")

    server = backend_factory(wait_for_the_end)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump=pump)
    with connect(gw.port) as client:
        client.sendall(hello)
        assert got_hello.wait(WAIT)
        wait_for_tunnels(gw, 1)  # the reset comes once the tunnel (or kernel tunnel) runs
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.close()
    assert outcome == ["reset"]
    gw.wait_idle()
    assert_joined(gw, pump, 1)
    assert metric(gw.admin_port, "meshgw_connections_total", route_kind="local_server",
                  datacenter="dc1", outcome="client_reset") == 1  # fmt: skip


def test_upstream_reset_resets_the_client(gateway_factory, backend_factory, pump):
    import struct

    hello = python_hello("n.server.dc1.consul")

    def reset(conn: socket.socket) -> None:
        recv_exactly(conn, len(hello) + 2)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    server = backend_factory(reset)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump=pump)
    with connect(gw.port) as client:
        client.sendall(hello)
        wait_for_tunnels(gw, 1)  # the reset comes once the tunnel (or kernel tunnel) runs
        client.sendall(b"go")
        with pytest.raises(ConnectionResetError):
            while client.recv(65536):
                pass
    gw.wait_idle()
    assert_joined(gw, pump, 1)
    assert metric(gw.admin_port, "meshgw_connections_total", route_kind="local_server",
                  datacenter="dc1", outcome="upstream_reset") == 1  # fmt: skip


# --- a child process: drain on SIGTERM, descriptors -------------------------------------------


def test_sigterm_drains_a_transfer_in_flight(gateway_process, backend_factory, pump):
    size = 32 << 20
    got: dict[str, str] = {}
    started = threading.Event()

    def backend(conn: socket.socket) -> None:
        recv_exactly(conn, len(hello) + 2)
        started.set()
        digest = hashlib.sha256()
        for chunk in stream(b"drain", size, block=256 << 10):
            conn.sendall(chunk)
            digest.update(chunk)
            time.sleep(0.002)  # a transfer that outlives the signal
        got["sent"] = digest.hexdigest()

    hello = python_hello("n.server.dc1.consul")
    server = backend_factory(backend)
    gw = gateway_process(
        "--dc", "dc1", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--expose-servers", "--server", f"n={server.address}", "--drain-timeout", "20",
        "--pump", pump,
    ).wait_listening()  # fmt: skip
    with connect(gw.port) as client:
        client.settimeout(30)
        client.sendall(hello)
        eventually(lambda: handed_over(gw.admin_port) == 1)
        client.sendall(b"go")  # the transfer starts once the tunnel runs
        assert started.wait(WAIT)
        assert_joined(gw, pump, 1)
        gw.signal(signal.SIGTERM)
        gw.wait_for("draining")
        # New connections are refused while the old one finishes.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", gw.port), timeout=WAIT).close()
        digest = hashlib.sha256()
        while chunk := client.recv(1 << 20):
            digest.update(chunk)
    assert gw.wait_exit(30) == 0
    server.close()
    assert digest.hexdigest() == got["sent"]
    assert any("closed_at_deadline=0" in line for line in gw.lines)


def test_no_descriptor_growth_after_thousands_of_mixed_connections(
    gateway_process, backend_factory, pump
):
    def echo_some(conn: socket.socket) -> None:
        data = conn.recv(65536)
        conn.sendall(data[:10])

    server = backend_factory(echo_some)
    gw = gateway_process(
        "--dc", "dc1", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--no-access-log",
        "--expose-servers", "--server", f"n={server.address}",
        "--gateway", f"dc2={refused_address()}", "--hello-timeout", "0.2", "--pump", pump,
    ).wait_listening()  # fmt: skip
    good = python_hello("n.server.dc1.consul")
    partial = good[:30]
    kinds = [
        good,  # routed and answered
        python_hello("x.example.org"),  # unknown name
        b"\x00garbage" * 20,  # not TLS
        python_hello("server.dc2.consul"),  # every upstream refuses
        partial,  # slow client hitting the hello deadline
        b"",  # connect and leave
    ]
    baseline = open_fds(gw.proc.pid)
    slow: list[socket.socket] = []
    for i in range(3000):
        payload = kinds[i % len(kinds)]
        client = connect(gw.port)
        if payload is partial:
            client.sendall(payload)
            slow.append(client)
            continue
        if payload:
            client.sendall(payload)
        if i % 12 == 0:  # abort with RST instead of FIN
            import struct

            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif payload is good:
            recv_all(client)
        client.close()
    for client in slow:
        closed_by_peer(client)
        client.close()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        active = metric(gw.admin_port, "meshgw_active_connections")
        if active == 0 and open_fds(gw.proc.pid) <= baseline:
            break
        time.sleep(0.05)
    assert metric(gw.admin_port, "meshgw_active_connections") == 0
    # The pipe pool may keep a few idle pipes (two descriptors each) for reuse.
    assert open_fds(gw.proc.pid) <= baseline + 2 * 64
    assert metric(gw.admin_port, "meshgw_rejections_total", reason="hello_timeout") == 500
    if pump == "sockmap":
        # Every connection that reached its tunnel was joined or refused: a server that answers
        # and closes before the join is done gets "eof", a client reset met by the join is an
        # "error" (reported as the client's reset). None is left in the kernel.
        tunnels = sum(
            metric(gw.admin_port, "meshgw_connections_total", route_kind="local_server",
                   datacenter="dc1", outcome=outcome)
            for outcome in ("closed", "client_reset")
        )  # fmt: skip
        assert tunnels >= 250 and _join_attempts(gw.admin_port) == tunnels
        assert metric(gw.admin_port, "meshgw_kernel_tunnels") == 0


def test_closed_connections_are_freed_without_the_cycle_collector(
    gateway_factory, backend_factory, pump
):
    """A connection and its flows go as soon as it closes: no garbage left for the collector,
    whose walks over thousands of connections would cost every connection CPU."""
    from meshgw.dataplane.dialer import Dialer
    from meshgw.dataplane.kerneltunnel import KernelTunnel
    from meshgw.dataplane.opening import Opening
    from meshgw.dataplane.pump import Flow
    from meshgw.dataplane.tunnel import Tunnel

    def reply(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"hi")

    server = backend_factory(reply)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"], pump=pump)
    hello = python_hello("n.server.dc1.consul")
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep what the collector finds, to look at it
    try:
        for _ in range(50):
            with connect(gw.port) as client:
                client.sendall(hello)
                assert recv_all(client) == b"hi"
        gw.wait_idle()
        gc.collect()
        kinds = Opening | Dialer | Tunnel | Flow | KernelTunnel
        left = [o for o in gc.garbage if isinstance(o, kinds)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


def test_out_of_descriptors_pauses_accepting_without_spinning(
    gateway_process, backend_factory, pump
):
    def reply(conn: socket.socket) -> None:
        conn.sendall(conn.recv(65536)[:3])

    server = backend_factory(reply)
    gw = gateway_process(
        "--dc", "dc1", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--no-access-log",
        "--expose-servers", "--server", f"n={server.address}", "--pump", pump,
    ).wait_listening()  # fmt: skip
    spare = 8
    limit = open_fds(gw.proc.pid) + spare
    resource.prlimit(gw.proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
    held = [connect(gw.port) for _ in range(spare + 4)]  # more than the gateway can accept
    try:
        for client in held:
            client.sendall(b"\x16")  # one byte: accepted ones wait for the rest of a hello
        gw.wait_for("accept failed \\(EMFILE\\)")
        cpu_before = _cpu_seconds(gw.proc.pid)
        time.sleep(1.0)  # a spinning accept loop would burn this second of CPU
        assert _cpu_seconds(gw.proc.pid) - cpu_before < 0.3
    finally:
        for client in held:
            client.close()
    # Descriptors come back: the gateway accepts and routes again.
    hello = python_hello("n.server.dc1.consul")
    deadline = time.monotonic() + WAIT
    while True:
        with connect(gw.port) as client:
            client.sendall(hello)
            client.shutdown(socket.SHUT_WR)
            if recv_all(client) == hello[:3]:
                break
        assert time.monotonic() < deadline
    assert metric(gw.admin_port, "meshgw_accept_errors_total", error="EMFILE") >= 1


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the descriptor limit with bulk transfers ---------------------------------------------------


STREAM_CHUNKS = 64  # of 64 KiB: 4 MiB, more than a loopback send buffer takes (about 3 MB)


def _chunk_of(seed: int) -> bytes:
    return hashlib.sha256(seed.to_bytes(4, "big")).digest() * 2048  # 64 KiB


async def _send_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A backend that answers a hello carrying a seed with that seed's 4 MiB stream."""
    hello = await reader.readexactly(len(python_hello("n.server.dc1.consul")) + 4)
    chunk = _chunk_of(int.from_bytes(hello[-4:], "big"))
    for _ in range(STREAM_CHUNKS):
        writer.write(chunk)
        await writer.drain()
    writer.close()


async def _held_reader(port: int, seed: int, go: asyncio.Event) -> bool:
    """Ask for a stream, take its first bytes, then hold the rest until `go`: meanwhile the
    gateway's flow towards this client is paused, holding a pipe if it got one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(python_hello("n.server.dc1.consul") + seed.to_bytes(4, "big"))
    digest = hashlib.sha256(await reader.readexactly(1))
    await go.wait()
    while chunk := await reader.read(1 << 16):
        digest.update(chunk)
    writer.close()
    return digest.digest() == hashlib.sha256(_chunk_of(seed) * STREAM_CHUNKS).digest()


async def _pipes_short(gw: GatewayProcess, limit: int) -> None:
    """Until no pipe can be had: the gateway counted a shortage, or it holds every descriptor
    it may open (then its admin port cannot answer either, so ask /proc)."""
    deadline = time.monotonic() + 60
    while open_fds(gw.proc.pid) < limit - 2:
        with contextlib.suppress(OSError):
            shortages = metric(gw.admin_port, "meshgw_splice_pipe_shortages_total")
            if shortages > 0:
                return
        assert time.monotonic() < deadline, "pipes never ran short"
        await asyncio.sleep(0.05)


def _join_attempts(admin_port: int) -> float:
    joins = metric(admin_port, "meshgw_kernel_tunnel_joins_total", trigger="start")
    refusals = sum(
        metric(admin_port, "meshgw_kernel_tunnel_refusals_total", reason=reason)
        for reason in ("full", "busy", "eof", "error")
    )
    return joins + refusals


async def _all_joined_or_refused(gw: GatewayProcess, transfers: int) -> None:
    """Until every transfer is in a kernel tunnel (no pipe: two descriptors), or was refused
    one (a server that answered before the join: "busy") and moves through Flows."""
    deadline = time.monotonic() + 60
    while await asyncio.to_thread(_join_attempts, gw.admin_port) < transfers:
        assert time.monotonic() < deadline, "the transfers were not all joined"
        await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("transfers", "max_connections"),
    [
        (280, 300),  # the pipe budget (75) runs out first
        (420, 2000),  # the open-file limit runs out first: pipe2 fails with EMFILE
    ],
)
@pytest.mark.parametrize("pump", [pump_param("splice"), pump_param("sockmap")])
async def test_bulk_at_the_descriptor_limit_never_stalls(
    gateway_process, transfers: int, max_connections: int, pump: str
) -> None:
    server = await asyncio.start_server(_send_stream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gw = gateway_process(
        "--dc", "dc1", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--no-access-log",
        "--expose-servers", "--server", f"n=127.0.0.1:{port}", "--pump", pump,
        "--max-connections", str(max_connections),
    ).wait_listening()  # fmt: skip
    baseline = open_fds(gw.proc.pid)
    resource.prlimit(gw.proc.pid, resource.RLIMIT_NOFILE, (1024, 1024))
    go = asyncio.Event()
    readers = [asyncio.create_task(_held_reader(gw.port, seed, go)) for seed in range(transfers)]
    try:
        # Every client reads only once pipes ran short (from then on some flows can move only
        # through userspace), or once every transfer is in the kernel.
        if pump == "sockmap":
            await _all_joined_or_refused(gw, transfers)
        else:
            await _pipes_short(gw, 1024)
        go.set()
        results = await asyncio.wait_for(asyncio.gather(*readers), 120)
    finally:
        for task in readers:
            task.cancel()
        server.close()
    assert all(results)
    if pump == "splice":
        assert metric(gw.admin_port, "meshgw_splice_pipe_shortages_total") > 0
    else:
        assert metric(gw.admin_port, "meshgw_kernel_tunnel_joins_total", trigger="start") > 0
        assert metric(gw.admin_port, "meshgw_kernel_tunnel_refusals_total", reason="error") == 0
    # Every descriptor is back but the pipes kept for reuse (and the admin request's socket).
    deadline = time.monotonic() + WAIT
    while True:
        pipes = await asyncio.to_thread(metric, gw.admin_port, "meshgw_splice_pipes_open")
        if open_fds(gw.proc.pid) <= baseline + 2 * pipes + 2:
            break
        assert time.monotonic() < deadline, (open_fds(gw.proc.pid), baseline, pipes)
        await asyncio.sleep(0.05)
