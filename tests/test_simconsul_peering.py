"""Peerings, exported services and imported instances on the simulated agent: /v1/peerings,
/v1/peering/<name>, /v1/exported-services (raw HTTP: py-consul has no calls for them) and
/v1/health/connect/<svc>?peer= (py-consul)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import consul as pyconsul
import pytest
from multidict import CIMultiDictProxy

from meshgw.simconsul import AclToken, SimConsul, SimConsulThread, mesh_gateway_node

EAST_TD = "e57e57e5-0000-4000-8000-000000000001.consul"


@pytest.fixture(autouse=True)
def _clean_consul_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL"):
        monkeypatch.delenv(name, raising=False)


async def get(
    session: aiohttp.ClientSession, sim: SimConsul, path: str, token: str | None = None
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    headers = {"X-Consul-Token": token} if token else {}
    async with session.get(sim.url + path, headers=headers) as answer:
        body = (
            await answer.json()
            if answer.content_type == "application/json"
            else await answer.text()
        )
        return answer.status, body, answer.headers


def east_gateways() -> list[dict[str, Any]]:
    """The exporter's two mesh gateways: one behind a load balancer's host name."""
    return [
        mesh_gateway_node("gw-east-0", "10.9.0.5", dc="east-dc1", wan=("gw.east.example", 443)),
        mesh_gateway_node("gw-east-1", "10.9.0.6", dc="east-dc1", wan=("198.51.100.9", 8443)),
    ]


async def test_peerings_read_and_list() -> None:
    async with SimConsul() as sim, aiohttp.ClientSession() as session:
        sim.peerings.add(
            "east",
            peer_server_name=f"server.east-dc1.peering.{EAST_TD}",
            peer_server_addresses=["gw.east.example:443", "198.51.100.9:8443"],
            remote_datacenter="east-dc1",
        )
        sim.peerings.add("west", state="PENDING")  # accepted, not dialled
        sim.config.export("web", peers=["east"])
        status, east, headers = await get(session, sim, "/v1/peering/east")
        assert status == 200
        assert list(east) == [
            "ID",
            "Name",
            "State",
            "PeerID",
            "PeerServerName",
            "PeerServerAddresses",
            "StreamStatus",
            "CreateIndex",
            "ModifyIndex",
            "Remote",
        ]
        assert (east["Name"], east["State"]) == ("east", "ACTIVE")
        assert east["PeerServerName"] == f"server.east-dc1.peering.{EAST_TD}"
        assert east["PeerServerAddresses"] == ["gw.east.example:443", "198.51.100.9:8443"]
        assert east["StreamStatus"]["ExportedServices"] == ["web"]
        assert east["StreamStatus"]["ImportedServices"] is None  # a nil slice in Go
        assert east["Remote"] == {"Partition": "default", "Datacenter": "east-dc1"}
        assert int(headers["X-Consul-Index"]) >= east["ModifyIndex"]
        _, listed, _ = await get(session, sim, "/v1/peerings")
        assert [p["Name"] for p in listed] == ["east", "west"]
        west = listed[1]
        assert "PeerServerAddresses" not in west and "PeerServerName" not in west
        assert west["StreamStatus"]["LastHeartbeat"] is None
        status, text, _ = await get(session, sim, "/v1/peering/north")
        assert (status, text) == (404, 'Peering not found for "north"')


async def test_peerings_block_until_a_peering_changes() -> None:
    async with SimConsul() as sim, aiohttp.ClientSession() as session:
        sim.peerings.add("east", peer_server_addresses=["10.9.0.5:8443"])
        _, before, headers = await get(session, sim, "/v1/peerings")
        index = headers["X-Consul-Index"]
        pending = asyncio.create_task(get(session, sim, f"/v1/peerings?index={index}&wait=5s"))
        await sim.raft.wait_blocked_async(1)
        sim.peerings.update("east", peer_server_addresses=["gw.east.example:443"])
        _, after, again = await asyncio.wait_for(pending, 5)
        assert int(again["X-Consul-Index"]) > int(index)
        assert after[0]["PeerServerAddresses"] == ["gw.east.example:443"]
        assert after[0]["ModifyIndex"] > before[0]["ModifyIndex"]
        assert after[0]["CreateIndex"] == before[0]["CreateIndex"]


async def test_peering_and_exports_need_their_permissions() -> None:
    tokens = [
        AclToken("op", ("operator:read",), accessor_id="o-1"),
        AclToken("svc", ("service:read",), accessor_id="s-1"),
        AclToken("mesh", ("mesh:read", "peering:read"), accessor_id="m-1"),
    ]
    async with SimConsul(acl_tokens=tokens) as sim, aiohttp.ClientSession() as session:
        sim.peerings.add("east")
        sim.config.export("web", peers=["east"])
        for token in ("op", "mesh"):  # operator:read stands in for peering:read and mesh:read
            assert (await get(session, sim, "/v1/peerings", token))[0] == 200
            assert (await get(session, sim, "/v1/exported-services", token))[0] == 200
        status, text, _ = await get(session, sim, "/v1/peering/east", "svc")
        assert (status, text) == (
            403,
            "Permission denied: token with AccessorID 's-1' lacks permission 'peering:read'",
        )
        status, text, _ = await get(session, sim, "/v1/exported-services", "svc")
        assert status == 403 and text.endswith("lacks permission 'mesh:read'")


async def test_exported_services_list_consumers_and_block() -> None:
    async with SimConsul() as sim, aiohttp.ClientSession() as session:
        status, exported, headers = await get(session, sim, "/v1/exported-services")
        assert (status, exported) == (200, [])
        index = headers["X-Consul-Index"]
        pending = asyncio.create_task(
            get(session, sim, f"/v1/exported-services?index={index}&wait=5s")
        )
        await sim.raft.wait_blocked_async(1)
        sim.config.export("web", peers=["west", "east"], partitions=["part1"])
        sim.config.export("api", peers=["east"])
        _, exported, _ = await asyncio.wait_for(pending, 5)
        _, exported, _ = await get(session, sim, "/v1/exported-services")
        assert exported == [
            {"Service": "api", "Consumers": {"Peers": ["east"]}},
            {"Service": "web", "Consumers": {"Peers": ["east", "west"], "Partitions": ["part1"]}},
        ]


@pytest.fixture
def importer(consul: Callable[..., SimConsulThread]) -> Iterator[SimConsulThread]:
    sim = consul()
    sim.peerings.add(
        "east", peer_server_name=f"server.east-dc1.peering.{EAST_TD}", remote_datacenter="east-dc1"
    )
    sim.services.add("web", "local-node", "10.0.0.7", 8080)  # a local web, never mixed in
    yield sim


def test_imported_instances_are_synthetic_proxies_at_the_exporter_gateways(
    importer: SimConsulThread,
) -> None:
    importer.peerings.import_services(
        "east", ["web"], gateways=east_gateways(), trust_domain=EAST_TD, exporter_peer_name="dc1"
    )
    c = pyconsul.Consul(host=importer.host, port=importer.port)
    _, entries = c.health.connect("web", peer="east")
    assert [e["Service"]["ID"] for e in entries] == [
        "web-sidecar-proxy-instance-0",
        "web-sidecar-proxy-instance-1",
    ]
    first = entries[0]
    assert first["Node"]["Node"] == "gw-east-0" and first["Node"]["PeerName"] == "east"
    service = first["Service"]
    assert (service["Kind"], service["Service"], service["PeerName"]) == (
        "connect-proxy",
        "web-sidecar-proxy",
        "east",
    )
    assert service["Proxy"]["DestinationServiceName"] == "web"
    # At the gateway: its address and port, and its WAN address for a peer to dial.
    assert (service["Address"], service["Port"]) == ("10.9.0.5", 8443)
    assert service["TaggedAddresses"]["wan"] == {"Address": "gw.east.example", "Port": 443}
    assert service["Connect"]["PeerMeta"] == {
        "SNI": [f"web.default.default.dc1.external.{EAST_TD}"],
        "SpiffeID": [
            f"spiffe://{EAST_TD}/ns/default/dc/east-dc1/svc/web",
            f"spiffe://{EAST_TD}/gateway/mesh/dc/east-dc1",
        ],
        "Protocol": "tcp",
    }
    assert [(ch["CheckID"], ch["Status"]) for ch in first["Checks"]] == [
        ("web-sidecar-proxy-instance-0:overall-check", "passing")
    ]
    _, local = c.health.connect("web")
    assert [e["Node"]["Node"] for e in local] == ["local-node"]
    _, by_filter = c.health.connect("web", peer="east", filter_expr='Node.Node == "gw-east-1"')
    assert [e["Service"]["Address"] for e in by_filter] == ["10.9.0.6"]


def test_imports_follow_gateway_health_and_the_peering(importer: SimConsulThread) -> None:
    gateways = east_gateways()
    gateways[1]["Checks"][-1]["Status"] = "critical"
    importer.peerings.import_services("east", ["web"], gateways=gateways, trust_domain=EAST_TD)
    c = pyconsul.Consul(host=importer.host, port=importer.port)
    index, entries = c.health.connect("web", peer="east")
    assert [e["Checks"][0]["Status"] for e in entries] == ["passing", "critical"]
    _, passing = c.health.connect("web", peer="east", passing=True)
    assert [e["Node"]["Node"] for e in passing] == ["gw-east-0"]
    importer.peerings.delete("east")
    again, gone = c.health.connect("web", peer="east", index=index, wait="5s")
    assert gone == [] and int(again) > int(index)
