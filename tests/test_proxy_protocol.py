"""PROXY protocol v1/v2 from a load balancer in front of the gateway: read only from trusted
sources, never forwarded, and the client address it carries is the one logs show."""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct

import pytest

from meshgw.bench.hellos import python_hello
from meshgw.settings import SettingsError
from tests.conftest import closed_by_peer, connect, eventually, recv_all
from tests.test_dataplane import metric

HELLO = python_hello("n.server.dc1.consul")
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(source: str, source_port: int, destination: str = "10.0.0.5", port: int = 443):
    addresses = ipaddress.ip_address(source).packed + ipaddress.ip_address(destination).packed
    block = addresses + struct.pack("!HH", source_port, port)
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(block)) + block


def v1_header(source: str, source_port: int) -> bytes:
    return f"PROXY TCP4 {source} 10.0.0.5 {source_port} 443\r\n".encode()


def echo_backend(backend_factory, received: list[bytes]):
    def handle(conn: socket.socket) -> None:
        data = recv_all(conn)
        received.append(data)

    return backend_factory(handle)


@pytest.fixture
def behind_a_balancer(gateway_factory, backend_factory, pump):
    received: list[bytes] = []
    server = echo_backend(backend_factory, received)
    gw = gateway_factory(
        expose_servers=True,
        server=[f"n={server.address}"],
        proxy_protocol="accept",
        proxy_protocol_from=["127.0.0.0/8"],
        access_log=True,
        pump=pump,
    )
    return gw, received


@pytest.mark.parametrize(
    "header", [v2_header("198.51.100.7", 40123), v1_header("198.51.100.7", 40123)]
)
def test_a_trusted_header_is_read_and_never_forwarded(behind_a_balancer, header, caplog) -> None:
    caplog.set_level(logging.INFO, logger="meshgw.access")
    gw, received = behind_a_balancer
    with connect(gw.port) as client:
        for piece in (header[:7], header[7:] + HELLO[:20], HELLO[20:]):  # any split
            client.sendall(piece)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
    gw.wait_idle()
    assert received == [HELLO]  # the header stays here: Consul servers do not speak it

    def clients() -> list[str | None]:
        return [
            getattr(r, "fields", {}).get("client")
            for r in caplog.records
            if r.name == "meshgw.access"
        ]

    eventually(lambda: clients() == ["198.51.100.7:40123"])


def test_a_trusted_source_without_a_header_is_refused(behind_a_balancer) -> None:
    gw, received = behind_a_balancer
    with connect(gw.port) as client:
        client.sendall(HELLO)
        assert closed_by_peer(client)
    assert received == []


def test_a_header_from_anyone_else_is_a_spoofing_attempt(gateway_factory, backend_factory):
    received: list[bytes] = []
    server = echo_backend(backend_factory, received)
    gw = gateway_factory(
        expose_servers=True,
        server=[f"n={server.address}"],
        proxy_protocol="accept",
        proxy_protocol_from=["192.0.2.0/24"],  # the balancers: not this test's loopback
    )
    with connect(gw.port) as client:
        client.sendall(v2_header("203.0.113.1", 1) + HELLO)
        assert closed_by_peer(client)
    # A direct client (a local server, a sidecar) is served as usual.
    with connect(gw.port) as client:
        client.sendall(HELLO)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
    gw.wait_idle()
    assert received == [HELLO]
    assert metric(gw.admin_port, "meshgw_rejections_total", reason="proxy_untrusted") == 1


def test_proxy_protocol_needs_the_balancers_addresses(gateway_factory) -> None:
    with pytest.raises(SettingsError, match="--proxy-protocol accept needs --proxy-protocol-from"):
        gateway_factory(proxy_protocol="accept")


def test_a_malformed_header_is_refused(behind_a_balancer) -> None:
    gw, received = behind_a_balancer
    with connect(gw.port) as client:
        client.sendall(b"PROXY TCP4 not-an-address 10.0.0.5 1 443\r\n" + HELLO)
        assert closed_by_peer(client)
    assert received == []
