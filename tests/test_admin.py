"""The admin port: answers, bounds, bad requests, Host checks; and that it cannot starve the
data plane."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import urllib.request
from collections.abc import AsyncIterator

import pytest

from meshgw.admin import AdminServer, AdminViews
from meshgw.bench.hellos import python_hello
from tests.conftest import WAIT, connect, recv_all


async def _metrics() -> bytes:
    return b"meshgw_up 1\n"


async def _routes() -> dict:
    return {"routes": []}


VIEWS = AdminViews(
    routes=_routes,
    topology=lambda: {"datacenter": "dc1"},
    ready=lambda: (True, "ready"),
    metrics=_metrics,
)


@pytest.fixture
async def admin() -> AsyncIterator[AdminServer]:
    server = AdminServer(
        VIEWS,
        "127.0.0.1",
        0,
        allowed_hosts=["gw.example.com"],
        max_connections=4,
        request_timeout=0.5,
        idle_timeout=0.5,
    )
    await server.start()
    yield server
    await server.stop()


async def exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes (or WAIT passes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()


def get(path: str, host: str = "127.0.0.1", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode()


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [
        ("/healthz", 200, b"ok\n"),
        ("/ready", 200, b"ready\n"),
        ("/metrics", 200, b"meshgw_up 1\n"),
        ("/v1/topology?pretty", 200, b'"datacenter": "dc1"'),
        ("/nope", 404, b"not found"),
    ],
)
async def test_answers(admin: AdminServer, path: str, status: int, body: bytes) -> None:
    answer = await exchange(admin.port, get(path))
    assert answer.startswith(f"HTTP/1.1 {status} ".encode())
    assert body in answer
    assert admin.stats.requests[str(status)] == 1


async def test_keep_alive_and_pipelining(admin: AdminServer) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
    writer.write(request * 3 + get("/ready"))
    answer = await asyncio.wait_for(reader.read(), WAIT)
    writer.close()
    assert answer.count(b"HTTP/1.1 200 ") == 4


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:19100", 200),
        ("[::1]:19100", 200),
        ("10.0.0.5", 200),
        ("localhost:19100", 200),
        ("GW.example.com:19100", 200),  # configured
        ("rebound.attacker.example", 421),  # DNS rebinding: refused
        ("", 421),
    ],
)
async def test_only_ip_literals_localhost_and_configured_names(
    admin: AdminServer, host: str, status: int
) -> None:
    answer = await exchange(admin.port, get("/v1/topology", host=host))
    assert answer.startswith(f"HTTP/1.1 {status} ".encode())
    if status != 200:
        assert b"datacenter" not in answer
        assert admin.stats.refused["host"] == 1


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",  # 9 KB request line
        b"GET / HTTP/1.1\r\nHost: localhost\r\nX: " + b"b" * 9000 + b"\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # TLS to the HTTP port
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    ],
)
async def test_malformed_requests_get_a_4xx_a_count_and_no_log_above_debug(
    admin: AdminServer, caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    caplog.set_level(logging.DEBUG, logger="meshgw.admin")
    for _ in range(16):
        answer = await exchange(admin.port, request_bytes)
        assert answer.startswith(b"HTTP/1.1 4")
    assert admin.stats.refused["malformed"] == 16
    assert [r for r in caplog.records if r.levelno > logging.DEBUG] == []


async def test_methods_other_than_get_and_head(admin: AdminServer) -> None:
    post = b"POST /v1/routes HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}"
    assert (await exchange(admin.port, post)).startswith(b"HTTP/1.1 405 ")
    head = await exchange(admin.port, b"HEAD /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")  # no body


async def test_a_slow_request_is_cut_at_the_deadline(admin: AdminServer) -> None:
    answer = await exchange(admin.port, b"GET /healthz HTTP/1.1\r\nHost: loc")
    assert answer == b""  # closed, unanswered
    assert admin.stats.refused["request_timeout"] == 1


async def test_idle_connections_make_room_for_a_request(admin: AdminServer) -> None:
    idle = [await asyncio.open_connection("127.0.0.1", admin.port) for _ in range(10)]
    try:
        answer = await exchange(admin.port, get("/healthz"))
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert admin.stats.refused["evicted"] >= 7  # 10 idle + 1 newcomer into 4 places
        assert len(admin.connections) <= admin.max_connections
    finally:
        for _, writer in idle:
            writer.close()


@pytest.mark.slow
def test_an_admin_flood_does_not_starve_the_data_plane(gateway_process, backend_factory) -> None:
    """1,100 idle connections to the admin port of a gateway held to 1,024 descriptors."""

    def reply(conn: socket.socket) -> None:
        conn.sendall(conn.recv(65536)[:5])

    server = backend_factory(reply)
    gw = gateway_process(
        "--dc", "dc1", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--no-access-log",
        "--expose-servers", "--server", f"n={server.address}",
    ).wait_listening()  # fmt: skip
    resource.prlimit(gw.proc.pid, resource.RLIMIT_NOFILE, (1024, 1024))
    flood = []
    try:
        for _ in range(1100):
            flood.append(socket.create_connection(("127.0.0.1", gw.admin_port), timeout=WAIT))
        hello = python_hello("n.server.dc1.consul")
        for _ in range(20):
            with connect(gw.port) as client:
                client.sendall(hello)
                client.shutdown(socket.SHUT_WR)
                assert recv_all(client) == hello[:5]
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/healthz", timeout=WAIT) as r:
            assert r.read() == b"ok\n"
    finally:
        for sock in flood:
            sock.close()
