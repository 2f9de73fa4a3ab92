"""`meshgw routes` with Consul: the table a gateway would build from the agent, against the
simulated agent, and compared with the table a real gateway builds from the same agent."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import pytest
from click.testing import CliRunner, Result

from meshgw.cli import main
from meshgw.simconsul import AclToken, SimConsulThread, check_service_node, mesh_gateway_node
from tests.conftest import WAIT, eventually
from tests.hellos import TRUST_DOMAIN as TD

TD2 = "0a1b2c3d-0000-4000-8000-000000000002.consul"
TOKEN = "3f9e0c1a-5b7d-4e2f-8a6c-9d1b2e3f4a5b"
PEER_SERVER = f"server.dc9.peering.{TD2}"
IMPORTED = f"pay.default.default.dc1.external.{TD2}"
EXPORTED_TCP = f"db.default.default.cluster-02.external.{TD}"
EXPORTED_L7 = f"api.default.default.cluster-02.external.{TD}"


@pytest.fixture(autouse=True)
def _no_consul_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The settings read CONSUL_HTTP_ADDR and MESHGW_*; the developer's own must not leak in.
    for var in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE", "CONSUL_CACERT"):
        monkeypatch.delenv(var, raising=False)
    for var in [v for v in os.environ if v.startswith("MESHGW_")]:
        monkeypatch.delenv(var)


def routes(*args: str) -> Result:
    result = CliRunner().invoke(main, ["routes", *args])
    assert isinstance(result.exception, SystemExit | None), result.output
    assert "Traceback" not in result.output
    return result


def estate(double: SimConsulThread) -> None:
    """Servers, a remote datacenter whose gateways have a host name and weights, a service with
    weights, an unhealthy instance and subsets, and peering both ways (an L7 export too)."""
    double.catalog.set_datacenters(["dc1", "dc2"])
    double.servers.add("node1", "127.0.0.1", port=8300, grpc_tls_port=8503)
    double.gateways.add("dc2", "gw2a", "10.2.0.1", 8443, wan=("localhost", 9443))
    double.gateways.add(
        "dc2", "gw2b", "10.2.0.2", 8443, wan=("198.51.100.2", 443), weights={"Passing": 5}
    )
    for node, address, version, weight, status in [
        ("n1", "10.0.0.5", "v1", 3, "passing"),
        ("n2", "10.0.0.6", "v2", 1, "passing"),
        ("n3", "10.0.0.7", "v2", 1, "critical"),
    ]:
        double.catalog.add_instance(
            check_service_node(
                node, address, "web-sidecar-proxy", 21000, kind="connect-proxy",
                service_id=f"web-{node}-sidecar-proxy", meta={"version": version},
                weights={"Passing": weight, "Warning": 1}, status=status,
                proxy={"DestinationServiceName": "web", "DestinationServiceID": f"web-{node}"},
            )
        )  # fmt: skip
        double.catalog.add_instance(check_service_node(node, address, "web", 8080))
    double.config.set_service_resolver(
        "web",
        Subsets={
            "v1": {"Filter": 'Service.Meta.version == "v1"'},
            "v2": {"Filter": 'Service.Meta.version == "v2"', "OnlyPassing": True},
        },
        ConnectTimeout="3s",
    )
    double.config.set_mesh(peer_through_mesh_gateways=True)
    double.peerings.add(
        "cluster-09", peer_server_name=PEER_SERVER, peer_server_addresses=["10.9.0.1:8503"]
    )
    exporter = mesh_gateway_node("gw9", "10.9.0.2", 8443, dc="dc9", wan=("203.0.113.9", 443))
    double.peerings.import_services("cluster-09", ["pay"], gateways=[exporter], trust_domain=TD2)
    double.services.add("db", "n4", "10.0.0.8", 5432, proxy_port=21001)
    double.services.add("api", "n5", "10.0.0.9", 8080, proxy_port=21002)
    double.config.set_service_defaults("api", protocol="http")
    double.config.export("db", peers=["cluster-02"])
    double.config.export("api", peers=["cluster-02"])


def comparable(document: dict[str, Any]) -> dict[str, Any]:
    """A table as JSON, without what only a running gateway knows (endpoints it saw down)."""
    routes = {
        route["match"]: (
            route["kind"],
            route["datacenter"],
            route["connect_timeout"],
            sorted(
                (e["address"], e["endpoint"], e["healthy"], e["weight"], e["source"])
                for e in route["endpoints"]
            ),
        )
        for route in document["routes"]
    }
    return {"routes": routes, "refused": document["refused"], "skipped": document["skipped"]}


def test_the_table_is_the_one_a_gateway_builds_from_the_agent(consul, gateway_factory) -> None:
    double = consul()
    estate(double)
    result = routes("--consul", double.url, "--expose-servers", "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    view = json.loads(result.stdout)
    assert view["consul"]["failed"] == {} and view["consul"]["pending"] == []
    assert {"agent-self", "peerings", "service web subset v2", "import cluster-09/pay"} <= set(
        view["consul"]["answered"]
    )
    gateway = gateway_factory(consul=double.url, expose_servers=True)

    def same() -> bool:
        running = gateway.call(lambda: gateway.gateway.table.to_json())
        return comparable(running) == comparable(view)

    eventually(same, what="the running gateway's table differs from `meshgw routes`")
    routed = {route["match"] for route in view["routes"]}
    assert {PEER_SERVER, IMPORTED, EXPORTED_TCP, f"server.dc1.peering.{TD}"} <= routed
    assert view["refused"] == {EXPORTED_L7: "peered_l7"}
    assert view["unresolved"] == []


def test_names_are_explained_with_weights_health_subsets_and_host_names(consul) -> None:
    double = consul()
    estate(double)
    web = f"web.default.dc1.internal.{TD}"
    names = [web, f"v2.{web}", "server.dc2.consul", PEER_SERVER, IMPORTED, EXPORTED_L7]
    result = routes("--consul", double.url, "--expose-servers", *(f"--sni={n}" for n in names))
    assert result.exit_code == 1, result.output  # the L7 export is refused
    lines = dict(zip(names, result.stdout.splitlines(), strict=True))
    assert "(connect timeout 3s)" in lines[web]
    assert "10.0.0.5:21000 [weight 3]" in lines[web]
    assert "10.0.0.7:21000 [unhealthy]" in lines[web]
    assert "10.0.0.5" not in lines[f"v2.{web}"] and "10.0.0.6:21000" in lines[f"v2.{web}"]
    assert "127.0.0.1:9443 (localhost)" in lines["server.dc2.consul"]
    assert "198.51.100.2:443 [weight 5]" in lines["server.dc2.consul"]
    assert "remote_peering_server (peer cluster-09)" in lines[PEER_SERVER]
    assert "peered_import (peer cluster-09)" in lines[IMPORTED]
    assert "203.0.113.9:443" in lines[IMPORTED]
    assert lines[EXPORTED_L7].startswith(f"{EXPORTED_L7}: refused: peered_l7")


def test_the_text_table_says_where_it_came_from(consul, monkeypatch) -> None:
    double = consul()
    estate(double)
    monkeypatch.setenv("CONSUL_HTTP_ADDR", double.url)  # as for `meshgw run`: discovery is on
    result = routes("--expose-servers")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"datacenter dc1, domain consul, trust domain {TD}"
    assert lines[1].startswith(f"from Consul at {double.url}: ")
    assert lines[1].endswith(" source(s) answered")
    assert any(line.split()[:2] == [EXPORTED_L7, "refused"] for line in lines)
    assert any("198.51.100.2:443 [weight 5]" in line for line in lines)


def test_a_refused_source_is_named_with_its_permission(consul, tmp_path) -> None:
    token = AclToken(TOKEN, ("agent:read", "service:read", "node:read", "mesh:read"))
    double = consul(acl_tokens=[token])
    estate(double)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    args = ["--consul", double.url, "--token-file", str(token_file), "--expose-servers"]
    result = routes(*args, "--sni", PEER_SERVER, "--sni", "server.dc1.consul")
    assert result.exit_code == 1, result.output  # the peering's name is unknown without it
    (warning,) = result.stderr.splitlines()
    assert warning.startswith("meshgw: warning: Consul source 'peerings' failed: ")
    assert "needs peering:read" in warning and TOKEN not in result.output
    refused, served = result.stdout.splitlines()
    assert refused.startswith(f"{PEER_SERVER}: refused:")
    assert served.startswith("server.dc1.consul: any_local_server")


def test_an_agent_that_refuses_the_token_is_one_line_and_exit_2(consul) -> None:
    double = consul(acl_tokens=[])
    estate(double)
    result = routes("--consul", double.url)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("meshgw: error: Consul refused GET /v1/agent/self (403")
    assert "agent:read" in result.stderr


def test_an_unreachable_agent_is_one_line_and_exit_2() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = routes("--consul", f"http://127.0.0.1:{port}", "--sni", "server.dc1.consul")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert f"cannot connect to Consul at http://127.0.0.1:{port}" in result.stderr


def test_a_source_that_never_answers_is_cut_by_the_timeout(consul) -> None:
    double = consul()
    estate(double)
    double.faults.hang("/v1/exported-services")
    started = time.monotonic()
    result = routes("--consul", double.url, "--timeout", "0.5", "--json")
    assert time.monotonic() - started < WAIT
    assert result.exit_code == 0, result.output
    assert "no answer within 0.5s from Consul source(s) 'exported-services'" in result.stderr
    view = json.loads(result.stdout)
    assert view["consul"]["pending"] == ["exported-services"]
    assert any(route["match"] == PEER_SERVER for route in view["routes"])  # the rest is there
    assert EXPORTED_TCP not in {route["match"] for route in view["routes"]}


def test_an_agent_that_never_answers_is_one_line_and_exit_2(consul) -> None:
    double = consul()
    double.faults.hang("/v1/agent/self")
    started = time.monotonic()
    result = routes("--consul", double.url, "--timeout", "0.3")
    assert time.monotonic() - started < WAIT
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "did not answer GET /v1/agent/self within 0.3s" in result.stderr


def test_services_watched_on_demand_are_demanded_for_sni_names(consul) -> None:
    double = consul()
    for name, port in [("web", 21000), ("db", 21001), ("api", 21002)]:
        double.services.add(name, "n1", "10.0.0.5", 8080, proxy_port=port)
    args = ["--consul", double.url, "--service-watch-limit", "1"]
    result = routes(*args, "--sni", f"db.default.dc1.internal.{TD}")
    assert result.exit_code == 0, result.output
    assert "-> 10.0.0.5:21001" in result.stdout
    table = json.loads(routes(*args, "--json").stdout)
    assert table["routes"] == [] and "services" in table["consul"]["answered"]


@pytest.mark.parametrize("value", ["0", "soon", "-1"])
def test_a_bad_timeout_is_a_usage_error(value: str) -> None:
    result = routes("--dc", "dc1", "--timeout", value)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"meshgw: error: --timeout {value!r}: ")
