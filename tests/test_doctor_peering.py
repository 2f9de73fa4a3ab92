"""`meshgw doctor`'s peering check against the simulated agent, with real meshgw gateways that
route the peering names and one that refuses them."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshgw.doctor.checks import Status
from meshgw.doctor.passage import Passage, PassageProbe, passage_probe
from meshgw.doctor.peering import NameKind, PeeringName, check_passages
from meshgw.simconsul import AclToken, SimConsulThread, mesh_gateway_node
from meshgw.tls.certs import create_ca, create_cert
from tests.conftest import GatewayThread, eventually
from tests.hellos import TRUST_DOMAIN as TD
from tests.test_doctor import as_json, doctor, failures, rows

TD2 = "0a1b2c3d-0000-4000-8000-000000000002.consul"
LOCAL_PEERING = f"server.dc1.peering.{TD}"
PEER_SERVER = f"server.dc9.peering.{TD2}"
IMPORTED = f"pay.default.default.dc1.external.{TD2}"
EXPORTED_TCP = f"db.default.default.cluster-02.external.{TD}"
EXPORTED_L7 = f"api.default.default.cluster-02.external.{TD}"
ROUTED = (LOCAL_PEERING, PEER_SERVER, IMPORTED, EXPORTED_TCP)
TOKEN = "9c1e7f3a-2b4d-4c6e-8f0a-1b3d5e7f9a2c"


@pytest.fixture(autouse=True)
def _no_consul_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE", "CONSUL_CACERT"):
        monkeypatch.delenv(var, raising=False)
    for var in [v for v in os.environ if v.startswith("MESHGW_")]:
        monkeypatch.delenv(var)


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    issued = create_cert(create_ca(), "server", dc="dc1")
    folder = tmp_path_factory.mktemp("peering-doctor")
    cert, key = folder / "server.pem", folder / "server-key.pem"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    return cert, key


def tls_answering(cert: tuple[Path, Path]) -> Callable[[socket.socket], None]:
    """Whatever sits behind a peering name (servers' gRPC TLS, sidecars, the peer's gateways):
    it answers the hello with its handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)

    def handle(conn: socket.socket) -> None:
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1024)
        except (ssl.SSLError, OSError):
            pass  # the doctor hangs up after the first bytes

    return handle


@dataclass
class Estate:
    double: SimConsulThread
    upstream_port: int


@pytest.fixture
def estate(consul, backend_factory, server_cert) -> Estate:
    """Peering both ways through dc1's gateways: the mesh entry lets the control plane through,
    one peering is dialled, one accepted (and imports pay), db and api (HTTP) are exported."""
    upstream = backend_factory(tls_answering(server_cert))
    double = consul()
    double.servers.add("s1", "127.0.0.1", grpc_tls_port=upstream.port)
    double.config.set_mesh(peer_through_mesh_gateways=True)
    double.peerings.add(
        "cluster-09", peer_server_name=PEER_SERVER, peer_server_addresses=[upstream.address]
    )
    double.peerings.add("cluster-01")
    exporter = mesh_gateway_node("gw9", "10.9.0.1", dc="dc9", wan=("127.0.0.1", upstream.port))
    double.peerings.import_services("cluster-01", ["pay"], gateways=[exporter], trust_domain=TD2)
    double.services.add("db", "n1", "127.0.0.1", 5432, proxy_port=upstream.port)
    double.services.add("api", "n2", "127.0.0.1", 8080, proxy_port=upstream.port)
    double.config.set_service_defaults("api", protocol="http")
    double.config.export("db", peers=["cluster-02"])
    double.config.export("api", peers=["cluster-02"])
    return Estate(double, upstream.port)


def routing_gateway(gateway_factory, double: SimConsulThread) -> GatewayThread:
    gateway = gateway_factory(consul=double.url)

    def learned() -> bool:
        table = gateway.gateway.table
        return all(table.resolve(name) for name in ROUTED) and EXPORTED_L7 in table.refused

    eventually(learned, what="the gateway did not learn the peering names")
    return gateway


def register(
    double: SimConsulThread, node: str, port: int, name: str = "mesh-gateway", wanfed: bool = True
) -> None:
    # Peering uses every mesh gateway, with or without the wanfed meta, whatever its name.
    double.gateways.add(
        "dc1", node, "127.0.0.1", port, name=name, service_id=name, wanfed=wanfed,
        wan=("127.0.0.1", port),
    )  # fmt: skip


def peering_rows(report: list[dict], port: int) -> dict[str, dict]:
    return {
        r["subject"].split(" via ")[0]: r
        for r in rows(report, "peering")
        if r["subject"].endswith(f" via 127.0.0.1:{port}")
    }


def test_a_gateway_that_refuses_peering_names_is_a_warning(estate, gateway_factory) -> None:
    routing = routing_gateway(gateway_factory, estate.double)
    blind = gateway_factory(dc="dc1")  # no Consul: routes no peering name
    register(estate.double, "gw-a", routing.port)
    register(estate.double, "gw-b", blind.port, name="meshgw-b")
    result = doctor("--consul", estate.double.url)
    assert result.exit_code == 0, result.output  # warnings do not fail the run
    assert "WARN  peering" in result.stdout
    report = as_json("--consul", estate.double.url)
    assert [r for r in report if r["status"] == "fail"] == []
    states = {
        r["subject"]: r for r in rows(report, "peering") if r["subject"].startswith("peering")
    }
    assert states["peering cluster-09"]["status"] == "pass"
    assert (
        f"ACTIVE: the peering stream is up; dials {PEER_SERVER}"
        in (states["peering cluster-09"]["detail"])
    )
    assert "accepted: the peer dials in; imports pay" in states["peering cluster-01"]["detail"]
    good, bad = peering_rows(report, routing.port), peering_rows(report, blind.port)
    assert set(good) == set(bad) == {*ROUTED, EXPORTED_L7}
    for name in ROUTED:
        assert good[name]["status"] == "pass", good[name]
        assert "forwarded: the TLS handshake proceeds" in good[name]["detail"]
        assert bad[name]["status"] == "warn", bad[name]
        assert "closed at once without a byte" in bad[name]["detail"]
        assert "while another gateway forwards it" in bad[name]["detail"]
        assert "Consul hands peering traffic to every mesh gateway" in bad[name]["detail"]
        assert bad[name]["fix"]
    assert "peer cluster-09's servers" in bad[PEER_SERVER]["detail"]
    assert f"--peer-server cluster-09/{PEER_SERVER}=HOST:PORT" in bad[PEER_SERVER]["fix"]
    assert "--peer-export db=cluster-02" in bad[EXPORTED_TCP]["fix"]
    for row in (good[EXPORTED_L7], bad[EXPORTED_L7]):
        assert row["status"] == "warn" and "(peered_l7)" in row["detail"]
        assert "Envoy mesh gateways" in row["fix"]


def test_peering_names_refused_by_every_gateway_fail(estate, gateway_factory) -> None:
    blind = gateway_factory(dc="dc1")
    register(estate.double, "gw-b", blind.port, wanfed=False)
    result = doctor("--consul", estate.double.url)
    assert result.exit_code == 1
    assert "WARN  peering" in result.stdout and "FAIL  peering" in result.stdout
    report = as_json("--consul", estate.double.url)
    subject = f"via 127.0.0.1:{blind.port}"
    assert [f for f in failures(report) if f[0] == "peering"] == [
        ("peering", f"{LOCAL_PEERING} {subject}"),
        ("peering", f"{PEER_SERVER} {subject}"),
        ("peering", f"{EXPORTED_TCP} {subject}"),
    ]
    (imported,) = [r for r in rows(report, "peering") if r["subject"].startswith(IMPORTED)]
    assert imported["status"] == "warn" and "local mesh-gateway mode" in imported["detail"]
    # The same through --gateway, without the catalog's gateways.
    routing = routing_gateway(gateway_factory, estate.double)
    report = as_json("--consul", estate.double.url, "--gateway", f"127.0.0.1:{routing.port}")
    assert [f for f in failures(report) if f[0] == "peering"] == []
    assert set(peering_rows(report, routing.port)) == {*ROUTED, EXPORTED_L7}


def test_peering_states(consul) -> None:
    double = consul()
    for name, state in [("p1", "FAILING"), ("p2", "TERMINATED"), ("p3", "PENDING")]:
        double.peerings.add(name, state=state)
    double.peerings.add("p4", state="DELETING")
    report = as_json("--consul", double.url)
    by_subject = {r["subject"]: r for r in rows(report, "peering")}
    assert by_subject["peering p1"]["status"] == "fail"
    assert "the peering stream is failing" in by_subject["peering p1"]["detail"]
    assert "servers' logs" in by_subject["peering p1"]["fix"]
    assert by_subject["peering p2"]["status"] == "fail"
    assert "consul peering delete -name" in by_subject["peering p2"]["fix"]
    assert by_subject["peering p3"]["status"] == "warn"
    assert "consul peering establish" in by_subject["peering p3"]["fix"]
    assert by_subject["peering p4"]["status"] == "skip"


def test_exports_without_a_gateway_fail(consul) -> None:
    double = consul()
    double.services.add("db", "n1", "127.0.0.1", 5432)
    double.config.export("db", peers=["cluster-02"])
    report = as_json("--consul", double.url)
    assert [f for f in failures(report) if f[0] == "peering"] == [("peering", "dc1")]
    (row,) = rows(report, "peering")
    assert "no mesh gateway of dc1 in the catalog" in row["detail"]
    assert "-gateway=mesh -register" in row["fix"]


def test_nothing_to_route_passes_and_a_token_without_peering_read_skips(consul, tmp_path) -> None:
    double = consul()
    (row,) = rows(as_json("--consul", double.url), "peering")
    assert row["status"] == "pass" and "no peering and nothing exported" in row["detail"]
    double = consul(acl_tokens=[AclToken(TOKEN, ("agent:read", "service:read", "node:read"))])
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    report = as_json("--consul", double.url, "--token-file", str(token_file))
    found = rows(report, "peering")
    assert {r["status"] for r in found} == {"skip"}
    details = " ".join(r["detail"] for r in found)
    assert "peerings not checked: the token may not read it (it needs peering:read)" in details
    assert "exported services not checked" in details and "mesh:read" in details


# --- the probe and the verdicts -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_probe_tells_refused_held_and_unreachable(backend_factory) -> None:
    def close_at_once(conn: socket.socket) -> None:
        conn.recv(65536)

    def hold(conn: socket.socket) -> None:
        while conn.recv(65536):  # until the probe hangs up
            pass

    closing, holding = backend_factory(close_at_once), backend_factory(hold)
    name = "server.dc9.peering.x.consul"

    async def probe(port: int) -> PassageProbe:
        return await passage_probe("127.0.0.1", port, name, 0.3, ("h2",))

    refused = asyncio.run(probe(closing.port))
    assert refused.passage is Passage.REFUSED and "at once" in refused.detail
    held = asyncio.run(probe(holding.port))
    assert held.passage is Passage.HELD and "stayed open 0.3s" in held.detail
    down = asyncio.run(probe(free_port()))
    assert down.passage is Passage.UNREACHABLE and down.gateway.startswith("127.0.0.1:")


def test_verdicts_across_gateways() -> None:
    name = PeeringName(LOCAL_PEERING, NameKind.LOCAL_SERVERS)

    def probe(gateway: str, passage: Passage) -> PassageProbe:
        return PassageProbe(gateway, name.sni, passage, "detail")

    held, refused = probe("a:1", Passage.HELD), probe("b:1", Passage.REFUSED)
    assert [c.status for c in check_passages(name, [held, refused])] == [Status.PASS, Status.WARN]
    assert [c.status for c in check_passages(name, [refused])] == [Status.FAIL]
    down = probe("c:1", Passage.UNREACHABLE)
    (row,) = check_passages(name, [down])
    assert row.status is Status.FAIL and "cannot connect to the gateway" in row.detail
    l7 = PeeringName(EXPORTED_L7, NameKind.EXPORT_L7, "cluster-02", "api")
    assert [c.status for c in check_passages(l7, [refused])] == [Status.WARN]
