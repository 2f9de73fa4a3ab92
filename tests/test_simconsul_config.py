"""Config entries on the simulated agent: /v1/config through py-consul and raw HTTP, Consul's
texts for refused writes and missing entries, permissions per kind, blocking reads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import consul as pyconsul
import pytest
from consul.exceptions import ACLPermissionDenied, BadRequest, ConsulException

from meshgw.simconsul import AclToken, SimConsul, SimConsulThread


@pytest.fixture(autouse=True)
def _clean_consul_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def sim(consul: Callable[..., SimConsulThread]) -> Iterator[SimConsulThread]:
    yield consul()


def client(sim: SimConsulThread, **kwargs: Any) -> pyconsul.Consul:
    return pyconsul.Consul(host=sim.host, port=sim.port, **kwargs)


def test_write_read_list_delete(sim: SimConsulThread) -> None:
    c = client(sim)
    body = {
        "protocol": "HTTP",
        "upstream_config": {"defaults": {"limits": {"max_connections": 64}}},
    }
    assert c.config.set("service-defaults", "web", body) is True
    entry = c.config.get("service-defaults", "web")
    # snake_case in, Consul's names out; Protocol lowercased; Go's always-present structs.
    assert entry == {
        "Kind": "service-defaults",
        "Name": "web",
        "Protocol": "http",
        "TransparentProxy": {},
        "MeshGateway": {},
        "Expose": {},
        "UpstreamConfig": {"Defaults": {"Limits": {"MaxConnections": 64}}},
        "CreateIndex": entry["CreateIndex"],
        "ModifyIndex": entry["CreateIndex"],
    }
    c.config.set("service-defaults", "api", {"Protocol": "tcp"})
    assert [e["Name"] for e in c.config.list("service-defaults")] == ["api", "web"]
    assert c.config.delete("service-defaults", "web") is True
    assert [e["Name"] for e in c.config.list("service-defaults")] == ["api"]


def test_check_and_set(sim: SimConsulThread) -> None:
    c = client(sim)
    assert c.config.set("service-defaults", "web", {"Protocol": "tcp"}, cas=0) is True
    assert c.config.set("service-defaults", "web", {"Protocol": "http"}, cas=0) is False
    index = c.config.get("service-defaults", "web")["ModifyIndex"]
    assert c.config.set("service-defaults", "web", {"Protocol": "http"}, cas=index) is True
    assert c.config.get("service-defaults", "web")["Protocol"] == "http"
    assert c.config.delete("service-defaults", "web", cas=index) is False  # moved on
    assert c.config.delete("service-defaults", "web", cas=index + 1) is True


def test_refused_writes_say_what_consul_says(sim: SimConsulThread) -> None:
    c = client(sim)
    with pytest.raises(BadRequest) as decoding:
        c.config.set("service-defaults", "web", {"Protocl": "http"})
    assert str(decoding.value) == (
        "400 Request decoding failed: 1 error(s) decoding:\n\n* '' has invalid keys: Protocl"
    )
    with pytest.raises(BadRequest, match="invalid config entry kind: nonsense"):
        c.config.set("nonsense", "x")
    cases = [
        ("proxy-defaults", "x", {}, 'invalid name ("x"), only "global" is supported'),
        ("mesh", "x", {}, 'invalid name ("x"), only "mesh" is supported'),
        ("exported-services", "x", {}, 'exported-services Name must be "default"'),
        (
            "service-resolver",
            "web",
            {"DefaultSubset": "v9", "Subsets": {"v1": {"Filter": "Service.Meta.v == v1"}}},
            'DefaultSubset "v9" is not a valid subset',
        ),
        (
            "service-resolver",
            "web",
            {"Redirect": {"Service": "api"}, "Failover": {"*": {"Datacenters": ["dc2"]}}},
            "Redirect and Failover cannot both be set",
        ),
        (
            "service-resolver",
            "web",
            {"Subsets": {"v1": {"Filter": "Service.Meta.v = v1"}}},
            'Filter for subset "v1" is not a valid expression: 1:16 (15): no match found',
        ),
        (
            "exported-services",
            "default",
            {"Services": [{"Name": "web", "Consumers": [{"Peer": "*"}]}]},
            "Services[0].Consumers[0]: exporting to all peers (wildcard) is not supported",
        ),
    ]
    for kind, name, body, text in cases:
        with pytest.raises(ConsulException) as refused:
            c.config.set(kind, name, body)
        assert str(refused.value).startswith(f"500 rpc error making call: {text}"), kind
    assert c.config.list("service-resolver") == []


async def test_missing_entry_is_404_and_a_blocking_read_waits_for_it() -> None:
    async with SimConsul() as sim, aiohttp.ClientSession() as session:
        url = sim.url + "/v1/config/service-defaults/web"
        async with session.get(url) as answer:
            assert answer.status == 404
            assert await answer.text() == 'Config entry not found for "service-defaults" / "web"'
            index = answer.headers["X-Consul-Index"]

        async def read_after(index: str) -> tuple[int, str, Any]:
            async with session.get(f"{url}?index={index}&wait=5s") as answer:
                return answer.status, answer.headers["X-Consul-Index"], await answer.json()

        pending = asyncio.create_task(read_after(index))
        await sim.raft.wait_blocked_async(1)
        sim.config.set_service_defaults("web", protocol="grpc")
        status, new_index, entry = await asyncio.wait_for(pending, 5)
        assert status == 200 and int(new_index) > int(index)
        assert entry["Protocol"] == "grpc"
        async with session.put(url) as refused:  # writes go to /v1/config
            assert (refused.status, await refused.text()) == (405, "method PUT not allowed")
        async with session.delete(sim.url + "/v1/config/nonsense/x") as refused:
            assert (refused.status, await refused.text()) == (
                400,
                "invalid config entry kind: nonsense",
            )
        async with session.delete(url) as deleted:
            assert (deleted.status, await deleted.json()) == (200, {})


def test_helpers_write_what_a_user_would(sim: SimConsulThread) -> None:
    sim.config.set_proxy_defaults({"protocol": "http", "connect_timeout_ms": 2000})
    sim.config.set_service_defaults("mesh-gateway", limits={"MaxConnections": 512})
    sim.config.set_mesh(peer_through_mesh_gateways=True)
    sim.config.export("web", peers=["east"])
    sim.config.export("web", peers=["west"], partitions=["part1"])
    c = client(sim)
    assert c.config.get("proxy-defaults", "global")["Config"] == {
        "protocol": "http",
        "connect_timeout_ms": 2000,
    }
    limits = c.config.get("service-defaults", "mesh-gateway")["UpstreamConfig"]["Defaults"]
    assert limits == {"Limits": {"MaxConnections": 512}}
    assert c.config.get("mesh", "mesh")["Peering"] == {"PeerThroughMeshGateways": True}
    assert c.config.get("exported-services", "default")["Services"] == [
        {
            "Name": "web",
            "Consumers": [{"Peer": "east"}, {"Peer": "west"}, {"Partition": "part1"}],
        }
    ]


@pytest.fixture
def acl_sim(consul: Callable[..., SimConsulThread]) -> Iterator[SimConsulThread]:
    tokens = [
        AclToken("reader", ("service:read:web",), accessor_id="r-1"),
        AclToken("operator", ("operator:write", "service:write"), accessor_id="o-1"),
    ]
    yield consul(acl_tokens=tokens)


def test_permissions_per_kind(acl_sim: SimConsulThread) -> None:
    operator, reader = client(acl_sim, token="operator"), client(acl_sim, token="reader")
    anonymous = client(acl_sim)
    # mesh, proxy-defaults and exported-services are written with mesh:write, which falls back
    # to operator:write for a token without a mesh rule.
    operator.config.set("mesh", "mesh", {"Peering": {"PeerThroughMeshGateways": True}})
    operator.config.set("proxy-defaults", "global", {"Config": {"protocol": "tcp"}})
    operator.config.set("service-defaults", "web", {"Protocol": "http"})
    operator.config.set("service-defaults", "api", {"Protocol": "http"})
    operator.config.set(
        "exported-services",
        "default",
        {"Services": [{"Name": "web", "Consumers": [{"Peer": "e"}]}]},
    )
    with pytest.raises(ACLPermissionDenied) as denied:
        reader.config.set("proxy-defaults", "global", {})
    assert str(denied.value) == (
        "Permission denied: token with AccessorID 'r-1' lacks permission 'mesh:write'"
    )
    # Reading mesh and proxy-defaults needs no permission at all.
    assert anonymous.config.get("mesh", "mesh")["Peering"]["PeerThroughMeshGateways"] is True
    assert anonymous.config.get("proxy-defaults", "global")["Config"] == {"protocol": "tcp"}
    assert reader.config.get("service-defaults", "web")["Protocol"] == "http"
    with pytest.raises(ACLPermissionDenied, match="lacks permission 'service:read' on \"api\""):
        reader.config.get("service-defaults", "api")
    with pytest.raises(ACLPermissionDenied, match="lacks permission 'mesh:read'"):
        reader.config.get("exported-services", "default")
    # Lists are filtered, not refused.
    assert [e["Name"] for e in reader.config.list("service-defaults")] == ["web"]


async def test_list_filtered_by_acls_says_so() -> None:
    tokens = [AclToken("reader", ("service:read:web",), accessor_id="r-1")]
    async with SimConsul(acl_tokens=tokens) as sim, aiohttp.ClientSession() as session:
        sim.config.set_service_defaults("web", protocol="http")
        sim.config.set_service_defaults("api", protocol="http")
        async with session.get(
            sim.url + "/v1/config/service-defaults", headers={"X-Consul-Token": "reader"}
        ) as answer:
            assert [e["Name"] for e in json.loads(await answer.text())] == ["web"]
            assert answer.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"


def test_a_state_file_can_carry_config_entries_and_peerings() -> None:
    from meshgw.simconsul.__main__ import load_state

    sim = SimConsul()
    load_state(
        sim,
        {
            "config_entries": [
                {"Kind": "mesh", "Name": "mesh", "Peering": {"PeerThroughMeshGateways": True}}
            ],
            "peerings": [{"name": "east", "peer_server_addresses": ["198.51.100.9:8443"]}],
        },
    )
    mesh = sim.config.get("mesh", "mesh")
    assert mesh is not None and mesh["Peering"] == {"PeerThroughMeshGateways": True}
    east = sim.peerings.render("east")
    assert east is not None and east["PeerServerAddresses"] == ["198.51.100.9:8443"]
