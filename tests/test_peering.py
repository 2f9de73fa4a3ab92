"""Cluster peering through meshgw, as Consul's gateway routes it (docs/consul.md#peering): the
control plane both ways, exported and imported services, L7 exports refused, peerings that come
and go. Real TLS end to end: the gateway never terminates it, the client verifies the name."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshgw.bench.hellos import python_hello
from meshgw.simconsul import mesh_gateway_node
from meshgw.tls.certs import create_ca, create_cert
from tests.conftest import WAIT, ask, closed_by_peer, connect, eventually, marker
from tests.hellos import TRUST_DOMAIN as TD

TD2 = "0a1b2c3d-0000-4000-8000-000000000002.consul"  # the peer's trust domain
LOCAL_PEERING = f"server.dc1.peering.{TD}"
PEER_SERVER = f"server.dc9.peering.{TD2}"


def admin_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=WAIT) as response:
        return json.loads(response.read())


def routed(port: int, match: str) -> list[str]:
    for route in admin_json(port, "/v1/routes")["routes"]:
        if route["match"] == match:
            return [e["address"] for e in route["endpoints"]]
    return []


def metric(port: int, sample: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.rpartition(" ")[2])
    return 0.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, and server certificates valid for the peering server names (as each cluster's
    servers present for gRPC TLS)."""
    ca = create_ca()
    folder = tmp_path_factory.mktemp("peering-pki")
    files = {"ca": folder / "ca.pem"}
    files["ca"].write_bytes(ca.cert_pem)
    for label, name in [("local", LOCAL_PEERING), ("peer", PEER_SERVER)]:
        issued = create_cert(ca, "server", dc="dc1", additional_dnsnames=[name])
        files[label] = folder / f"{label}.pem"
        files[f"{label}-key"] = folder / f"{label}-key.pem"
        files[label].write_bytes(issued.cert_pem)
        files[f"{label}-key"].write_bytes(issued.key_pem)
    return files


def grpc_tls_server(pki: dict[str, Path], label: str) -> Callable[[socket.socket], None]:
    """A server's gRPC TLS port as a peer dials it: TLS with ALPN h2, answers its label."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki[label], pki[f"{label}-key"])
    ctx.set_alpn_protocols(["h2"])

    def handle(conn: socket.socket) -> None:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1024)
            tls.sendall(f"{label}:{tls.selected_alpn_protocol()}".encode())

    return handle


def dial(pki: dict[str, Path], port: int, name: str) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki["ca"])
    ctx.set_alpn_protocols(["h2"])
    with connect(port) as raw, ctx.wrap_socket(raw, server_hostname=name) as tls:
        tls.sendall(b"PRI * HTTP/2.0")
        return tls.recv(1024)


# --- the control plane ---------------------------------------------------------------------------


def test_peers_reach_the_servers_that_are_not_read_replicas(
    pki, consul, gateway_factory, backend_factory
):
    server = backend_factory(grpc_tls_server(pki, "local"))
    replica = marker(backend_factory, b"replica")
    double = consul()
    double.servers.add("s1", "127.0.0.1", grpc_tls_port=server.port)
    double.servers.add("s2", "127.0.0.1", grpc_tls_port=replica.port, read_replica=True)
    gw = gateway_factory(consul=double.url)
    assert routed(gw.admin_port, LOCAL_PEERING) == []  # not until the mesh entry lets peers in
    double.config.set_mesh(peer_through_mesh_gateways=True)
    eventually(lambda: routed(gw.admin_port, LOCAL_PEERING) == [server.address])
    for _ in range(3):
        assert dial(pki, gw.port, LOCAL_PEERING) == b"local:h2"
    double.config.set_mesh(peer_through_mesh_gateways=False)
    eventually(lambda: routed(gw.admin_port, LOCAL_PEERING) == [])


def test_dialled_peerings_follow_their_addresses_and_state(
    pki, consul, gateway_factory, backend_factory
):
    first = backend_factory(grpc_tls_server(pki, "peer"))
    second = backend_factory(grpc_tls_server(pki, "peer"))
    double = consul()
    double.config.set_mesh(peer_through_mesh_gateways=True)
    double.peerings.add(
        "cluster-09", peer_server_name=PEER_SERVER, peer_server_addresses=[first.address]
    )
    gw = gateway_factory(consul=double.url)
    eventually(lambda: routed(gw.admin_port, PEER_SERVER) == [first.address])
    assert dial(pki, gw.port, PEER_SERVER) == b"peer:h2"
    # A connection in flight keeps its upstream while the peering changes.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki["ca"])
    with connect(gw.port) as raw, ctx.wrap_socket(raw, server_hostname=PEER_SERVER) as held:
        double.peerings.update("cluster-09", peer_server_addresses=[second.address])
        eventually(lambda: routed(gw.admin_port, PEER_SERVER) == [second.address])
        held.sendall(b"still here")
        assert held.recv(1024) == b"peer:None"
    assert first.accepted == 2 and dial(pki, gw.port, PEER_SERVER) == b"peer:h2"
    assert second.accepted == 1
    double.peerings.update("cluster-09", state="DELETING")
    eventually(lambda: routed(gw.admin_port, PEER_SERVER) == [])
    double.peerings.delete("cluster-09")
    with connect(gw.port) as client:
        client.sendall(python_hello(PEER_SERVER))
        assert closed_by_peer(client)


# --- services ------------------------------------------------------------------------------------


def test_exported_tcp_services_route_and_l7_ones_are_refused(
    consul, gateway_factory, backend_factory
):
    db, api = marker(backend_factory, b"db"), marker(backend_factory, b"api")
    double = consul()
    double.services.add("db", "n1", "127.0.0.1", 5432, proxy_port=db.port)
    double.services.add("api", "n2", "127.0.0.1", 8080, proxy_port=api.port)
    double.config.set_service_defaults("api", protocol="http")
    double.config.export("db", peers=["cluster-02", "cluster-03"])
    double.config.export("api", peers=["cluster-02"])
    gw = gateway_factory(consul=double.url)
    db_names = [f"db.default.default.{peer}.external.{TD}" for peer in ("cluster-02", "cluster-03")]
    eventually(lambda: all(routed(gw.admin_port, name) == [db.address] for name in db_names))
    for name in db_names:
        assert ask(gw.port, name) == b"db"
    api_name = f"api.default.default.cluster-02.external.{TD}"
    eventually(lambda: api_name in admin_json(gw.admin_port, "/v1/routes")["refused"])
    with connect(gw.port) as client:
        client.sendall(python_hello(api_name))
        assert closed_by_peer(client)
    assert api.accepted == 0  # refused, never connected anywhere
    assert metric(gw.admin_port, 'meshgw_rejections_total{reason="peered_l7"}') == 1
    # Connections per peer: the datacenter label of peering kinds is the peer.
    labels = 'datacenter="cluster-03",outcome="closed",route_kind="peered_export"'
    assert metric(gw.admin_port, f"meshgw_connections_total{{{labels}}}") == 1


def test_imported_services_go_to_the_exporters_gateways(consul, gateway_factory, backend_factory):
    exporter_gateway = marker(backend_factory, b"exporter-gw")
    double = consul()
    double.peerings.add("cluster-09")
    gateway = mesh_gateway_node(
        "gw", "10.9.0.1", 8443, dc="dc9", wan=("127.0.0.1", exporter_gateway.port)
    )
    double.peerings.import_services("cluster-09", ["pay"], gateways=[gateway], trust_domain=TD2)
    gw = gateway_factory(consul=double.url)
    sni = f"pay.default.default.dc1.external.{TD2}"  # as the exporter names this cluster
    eventually(lambda: routed(gw.admin_port, sni) == [exporter_gateway.address])
    assert ask(gw.port, sni) == b"exporter-gw"
    double.peerings.delete("cluster-09")
    eventually(lambda: routed(gw.admin_port, sni) == [])


# --- without Consul ------------------------------------------------------------------------------


def test_every_peering_route_from_static_settings(pki, gateway_factory, backend_factory):
    local = backend_factory(grpc_tls_server(pki, "local"))
    peer = backend_factory(grpc_tls_server(pki, "peer"))
    db, pay = marker(backend_factory, b"db"), marker(backend_factory, b"pay")
    gw = gateway_factory(
        trust_domain=TD,
        peering_server=[local.address],
        peer_server=[f"cluster-09/{PEER_SERVER}={peer.address}"],
        service=[f"db={db.address}"],
        peer_export=["db=cluster-02", "api=cluster-02/http"],
        peer_import=[f"pay.default.default.dc1.external.{TD2}={pay.address}"],
    )
    assert dial(pki, gw.port, LOCAL_PEERING) == b"local:h2"
    assert dial(pki, gw.port, PEER_SERVER) == b"peer:h2"
    assert ask(gw.port, f"db.default.default.cluster-02.external.{TD}") == b"db"
    assert ask(gw.port, f"pay.default.default.dc1.external.{TD2}") == b"pay"
    with connect(gw.port) as client:
        client.sendall(python_hello(f"api.default.default.cluster-02.external.{TD}"))
        assert closed_by_peer(client)
    # The peering each route belongs to, as given (PEER/), or `unnamed`: never read off the
    # name, whose labels are the peer's datacenter or this cluster as the exporter calls it.
    peers = {r["match"]: r["datacenter"] for r in admin_json(gw.admin_port, "/v1/routes")["routes"]}
    assert peers[PEER_SERVER] == "cluster-09"
    assert peers[f"pay.default.default.dc1.external.{TD2}"] == "unnamed"
    assert peers[f"db.default.default.cluster-02.external.{TD}"] == "cluster-02"
