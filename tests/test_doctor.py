"""`meshgw doctor` against the Consul API double and real in-process gateways."""

from __future__ import annotations

import json
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from meshgw.cli import main
from meshgw.control.catalog import AgentIdentity
from meshgw.control.consul import ConsulForbidden, ConsulHTTPError, ConsulTimeout
from meshgw.doctor.checks import (
    FEDERATION_STATE,
    GATEWAYS,
    Failure,
    FailureKind,
    Inventory,
    Status,
    check_agent,
    check_datacenters,
    check_federation_states,
    check_forwarding,
    check_gateways,
    check_names,
)
from meshgw.doctor.tls import name_matches
from meshgw.simconsul import AclToken, SimConsulThread, mesh_gateway_node
from meshgw.tls.certs import create_ca, create_cert

TOKEN = "6b0d3c52-8f1e-4a8c-9d3e-2f5a7c1b9e04"
ALL_CHECKS = {
    "agent", "gateways", "wan-address", "federation-state", "forwarding", "names", "tls", "peering",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _no_consul_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The doctor reads CONSUL_* like the consul CLI; the developer's own must not leak in.
    for var in (
        "CONSUL_HTTP_ADDR",
        "CONSUL_HTTP_TOKEN",
        "CONSUL_HTTP_TOKEN_FILE",
        "CONSUL_HTTP_SSL",
        "CONSUL_CACERT",
        "CONSUL_CAPATH",
        "CONSUL_CLIENT_CERT",
        "CONSUL_CLIENT_KEY",
    ):
        monkeypatch.delenv(var, raising=False)
    # Nor the developer's MESHGW_*: they would be taken as the gateway's settings.
    for var in [v for v in os.environ if v.startswith("MESHGW_")]:
        monkeypatch.delenv(var)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ca = create_ca()
    folder = tmp_path_factory.mktemp("pki")
    files = {"ca": folder / "ca.pem"}
    files["ca"].write_bytes(ca.cert_pem)
    # "wrong": a dc2 server that carries another datacenter's certificate.
    for label, dc, node in [
        ("dc1", "dc1", "node1"),
        ("dc2", "dc2", "node2"),
        ("wrong", "dc9", "node2"),
    ]:
        issued = create_cert(ca, "server", dc=dc, node=node)
        files[label] = folder / f"{label}.pem"
        files[f"{label}-key"] = folder / f"{label}-key.pem"
        files[label].write_bytes(issued.cert_pem)
        files[f"{label}-key"].write_bytes(issued.key_pem)
    return files


def tls_server(pki: dict[str, Path], label: str) -> Callable[[socket.socket], None]:
    """A Consul server's RPC port as far as TLS goes: mTLS against the CA, ALPN rpc-multi."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki[label], pki[f"{label}-key"])
    ctx.load_verify_locations(pki["ca"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["consul/rpc-multi"])

    def handle(conn: socket.socket) -> None:
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1024)  # until the doctor hangs up
        except (ssl.SSLError, OSError):
            pass  # the doctor hangs up without a close_notify, or sent no certificate

    return handle


def doctor(*args: str) -> Result:
    result = CliRunner().invoke(main, ["doctor", *args])
    # No traceback, ever: the only exception allowed out is the exit.
    assert isinstance(result.exception, SystemExit | None), result.output
    assert "Traceback" not in result.output
    return result


def as_json(*args: str) -> list[dict[str, Any]]:
    result = doctor(*args, "--json")
    return json.loads(result.stdout)


def rows(result: list[dict[str, Any]], check: str, status: str | None = None) -> list[dict]:
    return [r for r in result if r["check"] == check and (status is None or r["status"] == status)]


def failures(result: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["check"], r["subject"]) for r in result if r["status"] == "fail"]


# --- a two-datacenter federation ---------------------------------------------------------------


@dataclass
class Federation:
    double: SimConsulThread
    dc1_gateway_port: int | None = None


def catalog(double: SimConsulThread, dc1_port: int = 8443, dc2_port: int = 9443) -> None:
    """A healthy two-datacenter catalog: a server and a wanfed gateway with a WAN address in
    each datacenter (gateway addresses may be real meshgw gateways' ports)."""
    double.catalog.set_datacenters(["dc1", "dc2"])
    double.servers.add("node1", "127.0.0.1", port=8300)
    double.servers.add("node2", "127.0.0.1", port=8300, dc="dc2")
    double.gateways.add("dc1", "gw1", "127.0.0.1", dc1_port, wan=("127.0.0.1", dc1_port))
    double.gateways.add("dc2", "gw2", "127.0.0.1", dc2_port, wan=("127.0.0.1", dc2_port))


@pytest.fixture
def federation(consul, gateway_factory, backend_factory, pki) -> Callable[..., Federation]:
    """dc1's gateway → dc2's gateway → dc2's TLS server, and the catalog saying so."""

    def make(dc2_cert: str = "dc2") -> Federation:
        dc2_server = backend_factory(tls_server(pki, dc2_cert))
        dc2_gateway = gateway_factory(
            dc="dc2", expose_servers=True, server=[f"node2={dc2_server.address}"]
        )
        dc1_gateway = gateway_factory(
            dc="dc1", expose_servers=True, gateway=[f"dc2=127.0.0.1:{dc2_gateway.port}"]
        )
        double = consul()
        catalog(double, dc1_gateway.port, dc2_gateway.port)
        return Federation(double, dc1_gateway.port)

    return make


def tls_args(pki: dict[str, Path], *, cert: bool = True) -> list[str]:
    args = ["--server-ca-file", str(pki["ca"])]
    if cert:
        args += ["--cert", str(pki["dc1"]), "--key", str(pki["dc1-key"])]
    return args


# --- (a) healthy ---------------------------------------------------------------------------------


def test_healthy_federation_passes_every_check(federation, pki) -> None:
    fed = federation()
    result = doctor("--consul", fed.double.url, *tls_args(pki))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[-1].endswith("0 failed, 0 skipped"), result.output
    assert all(line.startswith(("PASS", " ")) for line in lines[:-1]), result.output
    # Every check ran, and the TLS check went through the gateway to both server names.
    assert {line.split()[1] for line in lines[:-1]} == ALL_CHECKS
    assert "PASS  tls               server.dc2.consul via 127.0.0.1:" in result.stdout
    assert "node2.server.dc2.consul via 127.0.0.1:" in result.stdout
    assert "mutual TLS accepted" in result.stdout


def test_json_output_parses_and_matches_the_text(federation, pki) -> None:
    fed = federation()
    args = ["--consul", fed.double.url, *tls_args(pki)]
    text = doctor(*args)
    report = as_json(*args)
    assert all(set(r) == {"check", "subject", "status", "detail", "fix"} for r in report)
    assert {r["status"] for r in report} == {"pass"}
    assert all(r["fix"] is None for r in report)
    # One JSON entry per text line (the fix lines and the summary aside), in the same order.
    text_lines = [line for line in text.stdout.splitlines()[:-1] if not line.startswith(" ")]
    assert len(text_lines) == len(report)
    for line, row in zip(text_lines, report, strict=True):
        assert line.split()[1] == row["check"]
        assert f"{row['subject']}: {row['detail']}" in line
    by_subject = {(r["check"], r["subject"]) for r in report}
    assert ("gateways", "dc1") in by_subject and ("gateways", "dc2") in by_subject
    assert ("wan-address", "dc2 gw2/mesh-gateway") in by_subject
    assert ("forwarding", "dc2") in by_subject


def test_without_a_client_certificate_the_name_is_still_checked(federation, pki) -> None:
    # TLS 1.3: the client verifies the server's certificate before the server sees the client's;
    # the server's "certificate required" alert comes after, and is not a failure of the name.
    fed = federation()
    report = as_json("--consul", fed.double.url, *tls_args(pki, cert=False))
    tls = rows(report, "tls")
    assert len(tls) == 2 and all(r["status"] == "pass" for r in tls), tls
    assert all("demanded a client certificate" in r["detail"] for r in tls)


def test_without_a_server_ca_file_the_tls_check_is_skipped(consul) -> None:
    double = consul()
    catalog(double)
    result = doctor("--consul", double.url)
    assert result.exit_code == 0, result.output
    assert "SKIP  tls               -: skipped: no --server-ca-file" in result.stdout


# --- (b) broken setups ---------------------------------------------------------------------------


def test_a_datacenter_without_the_wanfed_meta(consul) -> None:
    double = consul()
    catalog(double)
    double.gateways.update("dc2", "gw2", wanfed=False)
    report = as_json("--consul", double.url)
    assert failures(report) == [("gateways", "dc2")]
    (row,) = rows(report, "gateways", "fail")
    assert "none with Meta consul-wan-federation=1" in row["detail"]
    assert "gw2/mesh-gateway" in row["detail"]
    assert "-expose-servers" in row["fix"]


def test_a_datacenter_mixing_gateways_with_and_without_the_meta(consul) -> None:
    double = consul()
    catalog(double)
    double.gateways.add("dc2", "gw2b", "127.0.0.2", 8443, wan=("127.0.0.2", 8443), wanfed=False)
    report = as_json("--consul", double.url)
    assert failures(report) == [("gateways", "dc2")]
    (row,) = rows(report, "gateways", "fail")
    assert "dc2 mixes gateways: gw2b/mesh-gateway lack(s) Meta" in row["detail"]
    assert "Register every mesh gateway of dc2 with -expose-servers" in row["fix"]


def test_a_gateway_without_a_wan_address(consul) -> None:
    double = consul()
    catalog(double)
    double.gateways.remove("dc2", "gw2")
    double.gateways.add("dc2", "gw2", "10.2.0.5", 8443)  # no -wan-address
    report = as_json("--consul", double.url)
    assert failures(report) == [("wan-address", "dc2 gw2/mesh-gateway")]
    (row,) = rows(report, "wan-address", "fail")
    assert "other datacenters dial 10.2.0.5:8443 (its LAN address)" in row["detail"]
    assert "-wan-address" in row["fix"]


def test_a_missing_federation_state(consul) -> None:
    double = consul()
    catalog(double)
    double.federation.set("dc2", None)  # and the leader's anti-entropy stays off
    report = as_json("--consul", double.url)
    assert failures(report) == [("gateways", "dc2"), ("federation-state", "dc2")]
    (state,) = rows(report, FEDERATION_STATE, "fail")
    assert "no federation state for dc2" in state["detail"]
    assert "enable_mesh_gateway_wan_federation" in state["fix"]
    # The catalog shows the gateway, so the doctor says why the servers do not see it.
    (gateway,) = rows(report, GATEWAYS, "fail")
    assert "registered in dc2's catalog" in gateway["detail"]
    assert "but none in the federation states" in gateway["detail"]


def test_forwarding_without_a_path_to_the_datacenter(consul) -> None:
    double = consul()
    catalog(double)
    # The only ?dc= request the doctor makes first: every remote catalog request fails.
    double.faults.fail("/v1/catalog/services", 500, "No path to datacenter")
    result = doctor("--consul", double.url)
    assert result.exit_code == 1
    report = as_json("--consul", double.url)
    assert failures(report) == [("forwarding", "dc2")]
    (row,) = rows(report, "forwarding", "fail")
    assert "WAN federation with dc2 is not established" in row["detail"]
    assert "consul members -wan" in row["fix"] and "primary_gateways" in row["fix"]
    # dc2's servers cannot be listed without forwarding: that check says so, without failing.
    (names,) = rows(report, "names", "skip")
    assert names["subject"] == "dc2" and "?dc=dc2 requests fail" in names["detail"]


def test_forwarding_that_never_answers(consul) -> None:
    double = consul()
    catalog(double)
    double.faults.hang("/v1/catalog/services")
    report = as_json("--consul", double.url, "--timeout", "0.3")
    assert failures(report) == [("forwarding", "dc2")]
    (row,) = rows(report, "forwarding", "fail")
    assert "no answer within 0.3s" in row["detail"]
    double.faults.clear()


def test_a_dotted_server_node_name(consul) -> None:
    double = consul()
    catalog(double)
    double.servers.add("consul.server-2", "127.0.0.3", port=8300)
    report = as_json("--consul", double.url)
    assert failures(report) == [("names", "dc1")]
    (row,) = rows(report, "names", "fail")
    assert "'consul.server-2' contains a dot" in row["detail"]
    assert "SplitNodeName" in row["detail"]
    assert "Rename the server (node_name)" in row["fix"]


def test_a_remote_server_certificate_without_the_name(federation, pki) -> None:
    fed = federation(dc2_cert="wrong")
    result = doctor("--consul", fed.double.url, *tls_args(pki))
    assert result.exit_code == 1
    report = as_json("--consul", fed.double.url, *tls_args(pki))
    assert failures(report) == [
        ("tls", f"server.dc2.consul via 127.0.0.1:{fed.dc1_gateway_port}"),
        ("tls", f"node2.server.dc2.consul via 127.0.0.1:{fed.dc1_gateway_port}"),
    ]
    for row in rows(report, "tls"):
        assert "the certificate is not valid for" in row["detail"]
        assert "server.dc9.consul" in row["detail"]  # what it does carry
        assert "consul tls cert create -server -dc dc2" in row["fix"]


def free_port() -> int:
    """A port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_gateway_without_a_route_or_not_listening(consul, gateway_factory, pki) -> None:
    double = consul()
    catalog(double)
    lost = gateway_factory(dc="dc1", expose_servers=True)  # knows no gateway of dc2
    down = free_port()
    report = as_json(
        "--consul", double.url, *tls_args(pki), "--gateway", f"127.0.0.1:{lost.port}",
        "--gateway", f"127.0.0.1:{down}",
    )  # fmt: skip
    assert {check for check, _ in failures(report)} == {"tls"}
    closed = [r for r in rows(report, "tls") if r["subject"].endswith(f":{lost.port}")]
    refused = [r for r in rows(report, "tls") if r["subject"].endswith(f":{down}")]
    assert len(closed) == len(refused) == 2  # server.dc2.consul and node2.server.dc2.consul
    for row in closed:
        assert "the connection closed before the handshake finished" in row["detail"]
        assert "--gateway dc2=HOST:PORT" in row["fix"]
    for row in refused:
        assert row["detail"].startswith("cannot connect to the gateway")
        assert "Start the local gateway" in row["fix"]


def test_a_gateway_that_never_answers_the_hello(consul, backend_factory, pki) -> None:
    double = consul()
    catalog(double)

    def silent(conn: socket.socket) -> None:
        while conn.recv(65536):  # swallow the ClientHello, answer nothing, until the doctor quits
            pass

    mute = backend_factory(silent)
    report = as_json(
        "--consul", double.url, *tls_args(pki), "--gateway", mute.address, "--timeout", "0.3"
    )
    tls = rows(report, "tls")
    assert len(tls) == 2 and all(r["status"] == "fail" for r in tls)
    assert all("no handshake within 0.3s" in r["detail"] for r in tls)


def test_consul_down_is_one_failed_check() -> None:
    port = free_port()
    result = doctor("--consul", f"http://127.0.0.1:{port}")
    assert result.exit_code == 1
    assert result.stdout.count("FAIL") == 1
    assert f"FAIL  agent             http://127.0.0.1:{port}: cannot connect" in result.stdout
    assert "fix: Start the Consul agent" in result.stdout
    assert result.stdout.splitlines()[-1] == "0 passed, 1 failed, 7 skipped"


def test_consul_answering_garbage(consul) -> None:
    double = consul()
    catalog(double)
    double.faults.garbage("/v1/agent/self")
    report = as_json("--consul", double.url)
    assert failures(report) == [("agent", double.url)]
    assert "not with Consul's JSON" in rows(report, "agent")[0]["fix"]


def test_403_names_the_permission(consul, tmp_path) -> None:
    # A token that can read the catalog but not the federation states.
    token = AclToken(TOKEN, ("agent:read", "service:read", "node:read"))
    double = consul(acl_tokens=[token])
    catalog(double)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    report = as_json("--consul", double.url, "--token-file", str(token_file))
    assert failures(report) == [("federation-state", "dc1")]
    (row,) = rows(report, "federation-state", "fail")
    assert "operator:read" in row["detail"] and "operator:read" in row["fix"]
    assert TOKEN not in json.dumps(report)
    # Without any token the agent itself refuses: the first check names agent:read.
    report = as_json("--consul", double.url)
    assert failures(report) == [("agent", double.url)]
    assert "agent:read" in rows(report, "agent")[0]["fix"]


# --- usage errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--consul", "ftp://127.0.0.1:8500"], "unknown protocol scheme 'ftp'"),
        (["--gateway", "nowhere"], "--gateway 'nowhere'"),
        (["--timeout", "soon"], "--timeout"),
        (
            ["--server-ca-file", "/nonexistent/ca.pem"],
            "--server-ca-file /nonexistent/ca.pem: no such file",
        ),
        (["--ca-file", "/nonexistent/ca.pem"], "--ca-file=/nonexistent/ca.pem: no such file"),
        (["--config", "/nonexistent/meshgw.toml"], "--config /nonexistent/meshgw.toml: no such"),
        (["--cert", "x.pem", "--key", "y.pem"], "--cert/--key need --server-ca-file"),
        (["--cert", "x.pem"], "--cert and --key go together"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["doctor", *args])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert result.stderr.startswith("meshgw: error: ")


# --- the pure checks -----------------------------------------------------------------------------


def test_name_matching_is_one_label_per_wildcard() -> None:
    assert name_matches("server.dc2.consul", "SERVER.dc2.consul.")
    assert name_matches("*.server.dc2.consul", "node2.server.dc2.consul")
    assert not name_matches("*.server.dc2.consul", "a.b.server.dc2.consul")
    assert not name_matches("*.server.dc2.consul", "server.dc2.consul")
    assert not name_matches("server.dc9.consul", "server.dc2.consul")


def test_gateway_health_decides() -> None:
    critical = mesh_gateway_node(
        "gw", "10.0.0.5", dc="dc2", wan=("1.2.3.4", 443), status="critical"
    )
    warning = mesh_gateway_node("gw2", "10.0.0.6", dc="dc2", wan=("1.2.3.5", 443), status="warning")
    (row,) = check_gateways("dc2", Inventory([critical], "federation states", True))
    assert row.status is Status.FAIL and "every wanfed gateway of dc2 is critical" in row.detail
    (row,) = check_gateways("dc2", Inventory([critical, warning], "federation states", True))
    assert row.status is Status.PASS and "0 passing, 1 warning" in row.detail
    (row,) = check_gateways("dc2", Inventory([], "federation states", True), acls=True)
    assert row.status is Status.FAIL and "ACLs are on" in row.detail


def test_invalid_datacenter_and_node_names() -> None:
    servers = [
        {"Node": {"Node": name}, "Service": {"Service": "consul"}, "Checks": []}
        for name in ("n1", "bad/name")
    ]
    results = check_names("dc.east", servers)
    assert [r.status for r in results] == [Status.FAIL, Status.FAIL]
    assert "'dc.east' contains a dot" in results[0].detail
    assert "'bad/name' is not one DNS label" in results[1].detail


def test_federation_states_disabled_and_absent() -> None:
    disabled = ConsulHTTPError(
        "Consul answered GET /v1/internal/federation-states with 500",
        method="GET",
        path="/v1/internal/federation-states",
        address="http://127.0.0.1:8500",
        status=500,
        body="Federation states are currently disabled until all servers in the datacenter "
        "support the feature",
    )
    (row,) = check_federation_states("dc1", ["dc1", "dc2"], Failure.of(disabled))
    assert row.status is Status.FAIL and "Upgrade every server of dc1" in (row.fix or "")
    rows_ = check_federation_states("dc1", ["dc1", "dc2"], [{"Datacenter": "dc1"}])
    assert [r.status for r in rows_] == [Status.PASS, Status.FAIL]


def test_a_403_from_the_remote_datacenter_proves_forwarding() -> None:
    refused = ConsulForbidden(
        "Consul refused GET /v1/catalog/services (403 Permission denied)",
        permission="service:read",
        method="GET",
        path="/v1/catalog/services",
        address="http://127.0.0.1:8500",
        status=403,
        body="Permission denied",
    )
    failure = Failure.of(refused)
    assert failure.kind is FailureKind.FORBIDDEN and failure.permission == "service:read"
    row = check_forwarding("dc1", "dc2", failure, 5.0)
    assert row.status is Status.PASS and "was forwarded" in row.detail


def test_primary_missing_from_the_datacenters() -> None:
    identity = AgentIdentity("dc2", "consul", "dc1", "n")
    (row,), names = check_datacenters("http://x", identity, ["dc2", "dc3"])
    assert row.status is Status.FAIL and row.subject == "primary dc1"
    assert "primary_gateways" in (row.fix or "")
    assert names == ["dc2", "dc3"]


def test_odd_agent_documents_are_failures_not_crashes() -> None:
    documents: list[object] = [
        {"Config": "x"},
        {"Config": {}, "DebugConfig": [1]},
        {"Config": {}},
        [],
    ]
    for document in documents:
        (row,), identity, _ = check_agent("http://x", document)
        assert row.status is Status.FAIL and identity is None


def test_client_errors_become_failures() -> None:
    where = {"method": "GET", "path": "/v1/agent/self", "address": "http://x"}
    timeout = Failure.of(ConsulTimeout("no answer in 5.0s", **where))
    assert timeout.kind is FailureKind.TIMEOUT and str(timeout) == "no answer in 5.0s"
    missing = Failure.of(ConsulHTTPError("404", status=404, body="", **where))
    assert missing.kind is FailureKind.HTTP  # only ConsulNotFound is NOT_FOUND


# --- --ca-file is the agent's HTTPS CA, as for meshgw run ---------------------------------------


def test_ca_file_is_the_https_api_ca(consul, pki) -> None:
    https = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    https.load_cert_chain(pki["dc1"], pki["dc1-key"])  # valid for 127.0.0.1, signed by pki["ca"]
    double = consul(ssl_context=https)
    catalog(double)
    assert double.url.startswith("https://")
    report = as_json("--consul", double.url, "--ca-file", str(pki["ca"]))
    assert rows(report, "agent")[0]["status"] == "pass", rows(report, "agent")
    assert failures(report) == []
    # Without it the system's CAs do not know the agent's certificate.
    report = as_json("--consul", double.url)
    assert failures(report) == [("agent", double.url)]
    assert "CONSUL_CACERT" in rows(report, "agent")[0]["fix"]


# --- the gateway's own settings -----------------------------------------------------------------


def settings_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "meshgw.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("toml", "detail"),
    [
        ('dc = "dc1"\n', "these settings route nothing: no Consul to learn routes from"),
        (
            'dc = "dc1"\nserver = ["n1=10.0.0.1:8300"]\n',
            "--server is given but --expose-servers is off: server names are not routed",
        ),
        (
            'dc = "dc1"\nservice = ["web=10.0.0.1:21000"]\n',
            "--service is given without --trust-domain",
        ),
        ('dc = "dc1"\npump = "magic"\n', "the gateway would not start: "),
        ('dc = "dc1"\nexpose_server = true\n', "'expose_server' is not a setting"),
    ],
)
def test_settings_that_route_nothing(consul, tmp_path, toml: str, detail: str) -> None:
    double = consul()
    catalog(double)
    config = settings_file(tmp_path, toml)
    result = doctor("--consul", double.url, "--config", config)
    assert result.exit_code == 1
    report = as_json("--consul", double.url, "--config", config)
    assert set(failures(report)) == {("settings", f"--config {config}")}
    found = rows(report, "settings")
    assert any(detail in row["detail"] for row in found), found
    assert all(row["status"] == "fail" and row["fix"] for row in found)
    assert result.stdout.splitlines()[0].startswith("FAIL  settings")  # reported first


def test_settings_that_route_pass(consul, tmp_path) -> None:
    double = consul()
    catalog(double)
    toml = 'dc = "dc1"\nexpose_servers = true\nserver = ["n1=10.0.0.1:8300"]\n'
    config = settings_file(tmp_path, toml)
    report = as_json("--consul", double.url, "--config", config)
    assert failures(report) == []
    (row,) = rows(report, "settings")
    assert row["status"] == "pass" and "routes come from the settings alone" in row["detail"]


def test_settings_from_the_gateway_environment(consul, monkeypatch) -> None:
    """Inside the gateway's container (kubectl exec, docker exec) its MESHGW_* are its settings."""
    double = consul()
    catalog(double)
    monkeypatch.setenv("MESHGW_DC", "dc1")
    monkeypatch.setenv("MESHGW_SERVER", "n1=10.0.0.1:8300")
    monkeypatch.setenv("MESHGW_EXPOSE_SERVERS", "1")
    report = as_json("--consul", double.url)
    assert failures(report) == []
    assert rows(report, "settings")[0]["subject"] == "MESHGW_*"
    monkeypatch.setenv("MESHGW_EXPOSE_SERVERS", "0")
    report = as_json("--consul", double.url)
    assert set(failures(report)) == {("settings", "MESHGW_*")}
    assert "--expose-servers is off" in rows(report, "settings")[0]["detail"]


def test_registering_without_the_wanfed_meta_in_a_wanfed_datacenter(consul, tmp_path) -> None:
    double = consul()
    catalog(double)  # dc1's gateway carries the wanfed meta: dc1 federates through gateways
    toml = f'consul = "{double.url}"\nregister = true\n'
    report = as_json("--consul", double.url, "--config", settings_file(tmp_path, toml))
    (row,) = rows(report, "settings", "fail")
    assert "registers without --expose-servers" in row["detail"]
    assert "Add --expose-servers" in row["fix"]
    # With the meta it is what the datacenter needs.
    toml += 'expose_servers = true\nwan_address = "203.0.113.5:443"\n'
    report = as_json("--consul", double.url, "--config", settings_file(tmp_path, toml))
    (row,) = rows(report, "settings")
    assert row["status"] == "pass" and f"routes come from Consul at {double.url}" in row["detail"]


def test_settings_are_checked_when_consul_is_down(tmp_path) -> None:
    config = settings_file(tmp_path, 'dc = "dc1"\n')
    result = doctor("--consul", f"http://127.0.0.1:{free_port()}", "--config", config)
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0].startswith("FAIL  settings  ")
    assert result.stdout.splitlines()[-1] == "0 passed, 2 failed, 7 skipped"


def test_the_gateway_settings_name_the_agent_to_ask(consul, tmp_path) -> None:
    """Inside the gateway's container `meshgw doctor` asks the agent the gateway asks."""
    double = consul()
    catalog(double)
    toml = f'consul = "{double.url}"\nregister = true\nexpose_servers = true\n'
    toml += 'wan_address = "203.0.113.5:443"\n'
    report = as_json("--config", settings_file(tmp_path, toml))
    assert failures(report) == []
    assert rows(report, "agent")[0]["subject"] == double.url
    # A token file that is not there is named by where it was set.
    toml += 'token_file = "/nonexistent/token"\n'
    result = doctor("--config", settings_file(tmp_path, toml))
    assert result.exit_code == 2
    assert "token_file of --config" in result.stderr and "/nonexistent/token" in result.stderr
