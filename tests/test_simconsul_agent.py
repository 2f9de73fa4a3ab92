"""The simulated agent and catalog as real estates have them: central config merged into a
gateway's Proxy.Config, a dual-stack agent, the servers' `consul` service Meta, and addresses
that are host names."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import consul as pyconsul
import pytest

from meshgw.simconsul import GATEWAY_BODY, SimConsul, SimConsulThread


@pytest.fixture(autouse=True)
def _clean_consul_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def sim(consul: Callable[..., SimConsulThread]) -> Iterator[SimConsulThread]:
    yield consul()


def client(sim: SimConsulThread) -> pyconsul.Consul:
    return pyconsul.Consul(host=sim.host, port=sim.port)


def registered_gateway(sim: SimConsulThread, **changes: Any) -> pyconsul.Consul:
    c = client(sim)
    body = {**GATEWAY_BODY, "Proxy": {"Config": {"envoy_gateway_no_default_bind": True}}}
    c.http.put(lambda r: r.code, "/v1/agent/service/register", data=json.dumps(body | changes))
    return c


def test_agent_service_merges_proxy_defaults_under_its_own_config(sim: SimConsulThread) -> None:
    sim.config.set_proxy_defaults(
        {"connect_timeout_ms": 2000, "envoy_gateway_no_default_bind": False, "protocol": "tcp"},
        MeshGateway={"Mode": "local"},
    )
    sim.config.set_service_defaults("mesh-gateway", protocol="http", limits={"MaxConnections": 9})
    c = registered_gateway(sim)
    proxy = c.agent.service_definition("mesh-gateway")["Proxy"]
    assert proxy["Config"] == {
        "connect_timeout_ms": 2000,
        "envoy_gateway_no_default_bind": True,  # its own value wins
        "protocol": "http",  # service-defaults of the gateway's name, over proxy-defaults
    }
    assert proxy["MeshGateway"] == {"Mode": "local"}
    # The catalog has what the agent has (anti-entropy syncs the merged service).
    _, entries = c.health.service("mesh-gateway")
    assert entries[0]["Service"]["Proxy"]["Config"]["connect_timeout_ms"] == 2000
    # A plain service gets nothing merged.
    c.agent.service.register("web", port=80)
    assert "Proxy" not in c.agent.services()["web"]


async def test_central_config_change_wakes_a_hash_blocking_read() -> None:
    async with SimConsul() as sim, aiohttp.ClientSession() as session:
        url = sim.url + "/v1/agent/service/register"
        async with session.put(url, json=GATEWAY_BODY) as answer:
            assert answer.status == 200
        path = sim.url + "/v1/agent/service/mesh-gateway"
        async with session.get(path) as answer:
            first = await answer.json()
        assert "Config" not in first["Proxy"]

        async def after(hash_: str) -> dict[str, Any]:
            async with session.get(f"{path}?hash={hash_}&wait=5s") as answer:
                body: dict[str, Any] = await answer.json()
                return body

        pending = asyncio.create_task(after(first["ContentHash"]))
        await sim.requests.wait_for_async("/v1/agent/service/mesh-gateway", count=2)
        sim.config.set_proxy_defaults({"connect_timeout_ms": 1500})
        changed = await asyncio.wait_for(pending, 4)
        assert changed["Proxy"]["Config"] == {"connect_timeout_ms": 1500}
        assert changed["ContentHash"] != first["ContentHash"]


def test_agent_self_reports_its_bind_address(consul: Callable[..., SimConsulThread]) -> None:
    # `consul connect envoy` calls the agent dual-stack when Config.BindAddr is IPv6, and then
    # gives a registered gateway's TCP check the fallback ::1 instead of 127.0.0.1.
    assert client(consul()).agent.self()["Config"]["BindAddr"] == "0.0.0.0"
    assert client(consul(bind_addr="::")).agent.self()["Config"]["BindAddr"] == "::"


def test_servers_consul_service_meta(sim: SimConsulThread) -> None:
    sim.servers.add("consul-server-0", "10.0.0.10")
    sim.servers.add("consul-server-1", "10.0.0.11", read_replica=True, version="1.18.1")
    sim.servers.add("consul-server-2", "10.0.0.12", grpc_tls_port=None)
    _, entries = client(sim).health.service("consul")
    meta = {e["Node"]["Node"]: e["Service"]["Meta"] for e in entries}
    assert meta["consul-server-0"]["grpc_tls_port"] == "8503"
    assert meta["consul-server-0"]["read_replica"] == "false"
    assert meta["consul-server-0"]["raft_version"] == "3"
    assert (meta["consul-server-1"]["read_replica"], meta["consul-server-1"]["version"]) == (
        "true",
        "1.18.1",
    )
    assert "grpc_tls_port" not in meta["consul-server-2"]
    assert all(e["Service"]["Address"] == "" for e in entries)  # the node address is the one


def test_addresses_may_be_host_names(sim: SimConsulThread) -> None:
    sim.services.add("web", "node-a.internal", "web-a.internal.example", 8080)
    sim.gateways.add("dc2", "gw-dc2", "gw.dc2.internal", wan=("gw-dc2.elb.example.com", 443))
    c = client(sim)
    _, web = c.health.service("web")
    assert web[0]["Service"]["Address"] == "web-a.internal.example"
    assert web[0]["Service"].get("TaggedAddresses") is None  # no lan_ipv4 for a host name
    assert web[0]["Node"]["TaggedAddresses"] == {
        "lan": "web-a.internal.example",
        "wan": "web-a.internal.example",
    }
    _, gateways = c.health.service("mesh-gateway", dc="dc2")
    assert gateways[0]["Service"]["TaggedAddresses"] == {
        "wan": {"Address": "gw-dc2.elb.example.com", "Port": 443},
        "lan": {"Address": "gw.dc2.internal", "Port": 8443},
    }
    state = sim.federation.state("dc2")
    assert state is not None
    assert state["MeshGateways"][0]["Service"]["TaggedAddresses"]["wan"]["Address"] == (
        "gw-dc2.elb.example.com"
    )
    _, flat = c.catalog.service("mesh-gateway", dc="dc2")
    assert flat[0]["ServiceAddress"] == "gw.dc2.internal"


def test_agent_registration_with_host_names(sim: SimConsulThread) -> None:
    wan = {"Address": "gw.example.net", "Port": 443}
    c = registered_gateway(
        sim,
        Address="gw.internal",
        TaggedAddresses={"lan": {"Address": "gw.internal", "Port": 8443}, "wan": wan},
        Check={"Name": "mesh-gateway listening", "TCP": "gw.internal:8443", "Interval": "10s"},
    )
    service = c.agent.services()["mesh-gateway"]
    assert service["Address"] == "gw.internal"
    assert service["TaggedAddresses"] == {
        "lan": {"Address": "gw.internal", "Port": 8443},
        "wan": wan,
    }
