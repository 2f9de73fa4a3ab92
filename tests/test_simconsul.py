"""The simulated Consul agent, checked against an independent client (py-consul) and raw HTTP.

py-consul is synchronous (requests), so those tests run the simulator in its own thread. The raw
aiohttp tests cover what py-consul has no call for: the internal federation-state endpoints,
fault injection, the listener going away.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import consul
import pytest
from consul.exceptions import ACLPermissionDenied, BadRequest, ConsulException
from cryptography import x509
from multidict import CIMultiDictProxy

from meshgw.simconsul import (
    GATEWAY_BODY,
    AclToken,
    SimConsul,
    SimConsulThread,
    check_service_node,
    decode_registration,
    parse_go_duration,
)

REPO = Path(__file__).resolve().parent.parent
GW_TOKEN = "4f6c1c3e-0000-4000-8000-00000000beef"
READ_TOKEN = "9a1d2e3f-0000-4000-8000-00000000cafe"


@pytest.fixture(autouse=True)
def _clean_consul_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # py-consul reads these behind our back (CONSUL_HTTP_TOKEN even beats token=).
    for name in (
        "CONSUL_HTTP_ADDR",
        "CONSUL_HTTP_TOKEN",
        "CONSUL_HTTP_SSL",
        "CONSUL_HTTP_SSL_VERIFY",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def threaded() -> Iterator[SimConsulThread]:
    with SimConsulThread() as runner:
        yield runner


@pytest.fixture
def acl_threaded() -> Iterator[SimConsulThread]:
    tokens = [
        AclToken(
            GW_TOKEN,
            (
                "service:write:mesh-gateway",
                "service:read",
                "node:read",
                "operator:read",
                "agent:read",
            ),
            accessor_id="11111111-2222-3333-4444-555555555555",
        ),
        AclToken(READ_TOKEN, ("service:read",), accessor_id="66666666-7777-8888-9999-000000000000"),
    ]
    with SimConsulThread(acl_tokens=tokens) as runner:
        yield runner


def client(runner: SimConsulThread, **kwargs: Any) -> consul.Consul:
    double = runner.sim
    assert double is not None
    return consul.Consul(host=double.host, port=double.port, **kwargs)


def register_gateway(c: consul.Consul, **extra: Any) -> bool:
    """The gateway registration through py-consul (which sends lower/snake-case keys)."""
    kwargs: dict[str, Any] = {
        "service_id": "mesh-gateway",
        "address": "10.0.0.5",
        "port": 8443,
        "tagged_addresses": {
            "lan": {"address": "10.0.0.5", "port": 8443},
            "wan": {"address": "203.0.113.5", "port": 443},
        },
        "meta": {"consul-wan-federation": "1"},
        "kind": "mesh-gateway",
        "proxy": {
            "Config": {
                "envoy_gateway_no_default_bind": True,
                "envoy_gateway_bind_tagged_addresses": True,
            }
        },
        "check": consul.Check.tcp("10.0.0.5", 8443, "10s", deregister="6h"),
    }
    kwargs.update(extra)
    return bool(c.agent.service.register("mesh-gateway", **kwargs))


# --- py-consul --------------------------------------------------------------------------------


def test_agent_self_has_datacenter_node_and_domain(threaded: SimConsulThread) -> None:
    me = client(threaded).agent.self()
    assert me["Config"]["Datacenter"] == "dc1"
    assert me["Config"]["NodeName"] == "consul-client-0"
    assert me["Config"]["PrimaryDatacenter"] == "dc1"
    assert me["DebugConfig"]["DNSDomain"] == "consul."  # Consul's default keeps the dot
    assert me["Member"]["Tags"]["dc"] == "dc1"


def test_register_mesh_gateway_then_agent_services(threaded: SimConsulThread) -> None:
    c = client(threaded)
    assert register_gateway(c)
    svc = c.agent.services()["mesh-gateway"]
    assert svc["Kind"] == "mesh-gateway"
    assert svc["Service"] == "mesh-gateway"
    assert svc["Port"] == 8443
    assert svc["Meta"] == {"consul-wan-federation": "1"}
    # snake_case input came back PascalCase; the agent added lan_ipv4/wan_ipv4 from Address.
    assert svc["TaggedAddresses"] == {
        "lan": {"Address": "10.0.0.5", "Port": 8443},
        "wan": {"Address": "203.0.113.5", "Port": 443},
        "lan_ipv4": {"Address": "10.0.0.5", "Port": 8443},
        "wan_ipv4": {"Address": "10.0.0.5", "Port": 8443},
    }
    # Proxy.Config is a map: its keys are kept verbatim.
    assert svc["Proxy"]["Config"] == {
        "envoy_gateway_no_default_bind": True,
        "envoy_gateway_bind_tagged_addresses": True,
    }
    checks = threaded.agent.checks("mesh-gateway")
    assert [(ch["CheckID"], ch["Type"], ch["Status"]) for ch in checks] == [
        ("service:mesh-gateway", "tcp", "critical")  # new checks start critical, as in Consul
    ]
    sent = threaded.requests.find("/v1/agent/service/register")[-1]
    assert sent.method == "PUT"
    assert sent.json["Kind"] == "mesh-gateway"  # py-consul mixes cases in one body
    assert sent.json["tagged_addresses"]["wan"] == {"address": "203.0.113.5", "port": 443}


def test_registration_lands_in_catalog_health_and_federation_state(
    threaded: SimConsulThread,
) -> None:
    c = client(threaded)
    register_gateway(c)
    _, entries = c.health.service("mesh-gateway")
    assert [e["Node"]["Node"] for e in entries] == ["consul-client-0"]
    assert entries[0]["Service"]["TaggedAddresses"]["wan"] == {
        "Address": "203.0.113.5",
        "Port": 443,
    }
    _, passing = c.health.service("mesh-gateway", passing=True)
    assert passing == []  # the TCP check has not passed yet
    threaded.agent.set_check_status("mesh-gateway", "passing")
    _, passing = c.health.service("mesh-gateway", passing=True)
    assert len(passing) == 1
    state = threaded.federation.state("dc1")
    assert state is not None
    assert [g["Service"]["ID"] for g in state["MeshGateways"]] == ["mesh-gateway"]
    assert state["MeshGateways"][0]["Checks"][-1]["Status"] == "passing"


def test_registration_rejected_like_consul(threaded: SimConsulThread) -> None:
    c = client(threaded)
    with pytest.raises(BadRequest, match="Key prefix 'consul-' is reserved for internal use"):
        register_gateway(c, kind=None)  # the reserved meta key needs Kind mesh-gateway
    with pytest.raises(BadRequest, match="Port must be non-zero for a mesh-gateway"):
        register_gateway(c, port=None)
    with pytest.raises(BadRequest, match="Invalid check: Interval must be > 0"):
        register_gateway(c, check={"tcp": "10.0.0.5:8443"})
    assert c.agent.services() == {}


def test_deregister_removes_service_and_checks(threaded: SimConsulThread) -> None:
    c = client(threaded)
    register_gateway(c)
    assert c.agent.service.deregister("mesh-gateway")
    assert c.agent.services() == {}
    assert c.health.service("mesh-gateway")[1] == []
    # An unknown ID: 404 on current agents (docs/consul.md#api-endpoints), 200 on older ones.
    assert not c.agent.service.deregister("never-registered")  # py-consul: 404 → False
    assert threaded.sim is not None
    threaded.sim.deregister_unknown_404 = False
    assert c.agent.service.deregister("never-registered")


def test_catalog_datacenters_and_cross_dc_forwarding(threaded: SimConsulThread) -> None:
    threaded.gateways.add("dc2", "gw-dc2-a", "10.2.0.5", wan=("198.51.100.7", 443))
    c = client(threaded)
    assert c.catalog.datacenters() == ["dc1", "dc2"]
    _, services = c.catalog.services(dc="dc2")
    assert services == {"mesh-gateway": []}
    with pytest.raises(ConsulException, match="No path to datacenter"):
        c.catalog.services(dc="dc9")


def test_catalog_service_flat_shape(threaded: SimConsulThread) -> None:
    index, nodes = client(threaded).catalog.service("consul")
    assert int(index) >= 1
    assert len(nodes) == 1
    entry = nodes[0]
    assert set(entry) >= {
        "ID",
        "Node",
        "Address",
        "Datacenter",
        "TaggedAddresses",
        "NodeMeta",
        "ServiceKind",
        "ServiceID",
        "ServiceName",
        "ServiceTags",
        "ServiceAddress",
        "ServiceMeta",
        "ServicePort",
        "ServiceWeights",
        "ServiceEnableTagOverride",
        "ServiceProxy",
        "ServiceConnect",
        "CreateIndex",
        "ModifyIndex",
    }
    assert entry["Node"] == "consul-server-0"
    assert entry["ServiceAddress"] == ""  # the leader registers `consul` without an Address
    assert entry["ServicePort"] == 8300
    assert entry["ServiceMeta"]["raft_version"] == "3"


def test_health_service_passing_filter_and_shape(threaded: SimConsulThread) -> None:
    threaded.gateways.add("dc1", "gw-a", "10.0.0.21")
    threaded.gateways.add("dc1", "gw-b", "10.0.0.22", status="critical")
    c = client(threaded)
    _, every = c.health.service("mesh-gateway")
    _, passing = c.health.service("mesh-gateway", passing=True)
    assert [e["Node"]["Node"] for e in every] == ["gw-a", "gw-b"]
    assert [e["Node"]["Node"] for e in passing] == ["gw-a"]
    node, service, checks = every[0]["Node"], every[0]["Service"], every[0]["Checks"]
    assert set(node) >= {"ID", "Node", "Address", "Datacenter", "TaggedAddresses", "Meta"}
    assert set(service) >= {"Kind", "ID", "Service", "Tags", "Address", "Meta", "Port", "Weights"}
    assert [ch["CheckID"] for ch in checks] == ["serfHealth", "service:mesh-gateway"]
    assert set(checks[0]) >= {
        "Node",
        "CheckID",
        "Name",
        "Status",
        "Notes",
        "Output",
        "ServiceID",
        "ServiceName",
        "ServiceTags",
        "Type",
    }


def test_health_connect_lists_proxies_and_native_services(threaded: SimConsulThread) -> None:
    threaded.services.add("web", "node-web", "10.0.0.30", 8080, proxy_port=21000)
    threaded.services.add("api", "node-api", "10.0.0.31", 9090, native=True)
    c = client(threaded)
    _, web = c.health.connect("web")
    assert [(e["Service"]["Kind"], e["Service"]["Port"]) for e in web] == [("connect-proxy", 21000)]
    assert web[0]["Service"]["Proxy"]["DestinationServiceName"] == "web"
    _, api = c.health.connect("api")
    assert [(e["Service"]["Service"], e["Service"]["Connect"]) for e in api] == [
        ("api", {"Native": True})
    ]
    assert c.health.connect("nothing")[1] == []


def test_blocking_query_returns_after_a_mutation(threaded: SimConsulThread) -> None:
    c = client(threaded)
    index, before = c.health.service("consul")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:

        def mutate() -> None:
            threaded.raft.wait_blocked(1)  # py-consul is parked in the blocking query
            threaded.servers.add("consul-server-1", "10.0.0.11")

        done = pool.submit(mutate)
        started = time.monotonic()
        new_index, after = c.health.service("consul", index=index, wait="10s")
        done.result(5)
    assert time.monotonic() - started < 5
    assert int(new_index) > int(index)
    assert len(after) == len(before) + 1


def test_blocking_query_times_out_with_the_same_index(threaded: SimConsulThread) -> None:
    c = client(threaded)
    index, _ = c.health.service("consul")
    threaded.gateways.add("dc2", "gw", "10.2.0.5")  # another view: must not wake this one
    started = time.monotonic()
    again, _ = c.health.service("consul", index=index, wait="1s")
    elapsed = time.monotonic() - started
    assert again == index
    assert 1.0 <= elapsed < 1.0 + 1 / 16 + 0.5  # wait plus Consul's jitter of up to wait/16


def test_status_leader_and_peers(threaded: SimConsulThread) -> None:
    c = client(threaded)
    threaded.servers.add("consul-server-1", "10.0.0.11")
    assert c.status.leader() == "10.0.0.10:8300"
    assert c.status.peers() == ["10.0.0.10:8300", "10.0.0.11:8300"]
    threaded.servers.remove("consul-server-0")
    assert c.status.leader() == "10.0.0.11:8300"  # the next server took over
    assert c.status.peers() == ["10.0.0.11:8300"]
    assert [e["Node"]["Node"] for e in c.health.service("consul")[1]] == ["consul-server-1"]
    threaded.servers.set_leader(None)
    assert c.status.leader() == ""


def test_connect_ca_roots(threaded: SimConsulThread) -> None:
    threaded.ca.set(trust_domain="7f42f496-fbc7-8692-05ed-334aa5340c1e.consul")
    roots = client(threaded).connect.ca.roots()
    assert roots["TrustDomain"] == "7f42f496-fbc7-8692-05ed-334aa5340c1e.consul"
    active = [r for r in roots["Roots"] if r["Active"]]
    assert [r["ID"] for r in active] == [roots["ActiveRootID"]]
    cert = x509.load_pem_x509_certificate(active[0]["RootCert"].encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://7f42f496-fbc7-8692-05ed-334aa5340c1e.consul"
    ]


def test_acl_token_accepted_and_sent(acl_threaded: SimConsulThread) -> None:
    c = client(acl_threaded, token=GW_TOKEN)
    assert register_gateway(c)
    assert acl_threaded.requests.find("/v1/agent/service/register")[-1].token == GW_TOKEN
    assert list(c.agent.services()) == ["mesh-gateway"]


def test_acl_missing_unknown_or_weak_token_is_refused(acl_threaded: SimConsulThread) -> None:
    with pytest.raises(
        ACLPermissionDenied, match="anonymous token lacks permission 'service:write'"
    ):
        register_gateway(client(acl_threaded))
    with pytest.raises(ACLPermissionDenied, match="ACL not found"):
        register_gateway(client(acl_threaded, token="not-a-token"))
    with pytest.raises(ACLPermissionDenied) as denied:
        register_gateway(client(acl_threaded, token=READ_TOKEN))
    assert str(denied.value) == (
        "Permission denied: token with AccessorID '66666666-7777-8888-9999-000000000000' "
        "lacks permission 'service:write' on \"mesh-gateway\""
    )
    assert acl_threaded.agent.service("mesh-gateway") is None


def test_acl_filters_lists_instead_of_refusing(acl_threaded: SimConsulThread) -> None:
    # READ_TOKEN has service:read but no node:read: Consul filters the entries out.
    _, entries = client(acl_threaded, token=READ_TOKEN).health.service("consul")
    assert entries == []
    _, entries = client(acl_threaded, token=GW_TOKEN).health.service("consul")
    assert len(entries) == 1


# --- raw HTTP: federation states ---------------------------------------------------------------


async def get(
    session: aiohttp.ClientSession, double: SimConsul, path: str
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    async with session.get(double.url + path) as answer:
        text = await answer.text()
        return answer.status, (json.loads(text) if text else None), answer.headers


async def test_federation_state_endpoints() -> None:
    async with SimConsul() as double, aiohttp.ClientSession() as session:
        double.gateways.add("dc2", "gw-dc2-a", "10.2.0.5", wan=("198.51.100.7", 443))
        double.catalog.set_datacenters(["dc2", "dc3"])  # dc3 exists but has no gateway

        status, states, headers = await get(session, double, "/v1/internal/federation-states")
        assert status == 200
        assert [s["Datacenter"] for s in states] == ["dc2"]
        dc2 = states[0]
        assert set(dc2) == {
            "Datacenter",
            "MeshGateways",
            "UpdatedAt",
            "PrimaryModifyIndex",
            "CreateIndex",
            "ModifyIndex",
        }
        assert dc2["MeshGateways"][0]["Service"]["TaggedAddresses"]["wan"] == {
            "Address": "198.51.100.7",
            "Port": 443,
        }
        assert int(headers["X-Consul-Index"]) >= dc2["ModifyIndex"]

        status, one, _ = await get(session, double, "/v1/internal/federation-state/dc2")
        assert status == 200
        assert one["State"] == dc2
        assert {"Index", "KnownLeader", "LastContact"} <= set(one)  # QueryMeta promoted

        async with session.get(double.url + "/v1/internal/federation-state/dc3") as answer:
            assert answer.status == 404
            assert await answer.read() == b""

        status, by_dc, _ = await get(
            session, double, "/v1/internal/federation-states/mesh-gateways"
        )
        assert list(by_dc) == ["dc2"]  # only datacenters with gateways

        # Registering a gateway locally makes the local DC appear too (leader anti-entropy).
        async with session.put(
            double.url + "/v1/agent/service/register", json=GATEWAY_BODY
        ) as answer:
            assert answer.status == 200
            assert await answer.read() == b""
        _, by_dc, _ = await get(session, double, "/v1/internal/federation-states/mesh-gateways")
        assert sorted(by_dc) == ["dc1", "dc2"]
        assert by_dc["dc1"][0]["Service"]["Meta"] == {"consul-wan-federation": "1"}


async def test_federation_state_modify_index_follows_gateway_changes() -> None:
    async with SimConsul() as double:
        double.gateways.add("dc2", "gw-dc2-a", "10.2.0.5")
        first = double.federation.state("dc2")
        assert first is not None
        double.services.add("web", "node-web", "10.0.0.30", 8080)  # unrelated
        assert double.federation.state("dc2") == first
        double.gateways.update("dc2", "gw-dc2-a", address="10.2.0.6")
        second = double.federation.state("dc2")
        assert second is not None
        assert second["CreateIndex"] == first["CreateIndex"]
        assert second["ModifyIndex"] > first["ModifyIndex"]
        assert second["MeshGateways"][0]["Service"]["Address"] == "10.2.0.6"
        double.gateways.update("dc2", "gw-dc2-a", status="critical")
        third = double.federation.state("dc2")
        assert third is not None and third["ModifyIndex"] > second["ModifyIndex"]
        double.gateways.remove("dc2", "gw-dc2-a")
        gone = double.federation.state("dc2")
        assert gone is not None and "MeshGateways" not in gone  # omitempty


async def test_stale_federation_state_can_be_frozen() -> None:
    async with SimConsul() as double:
        double.gateways.add("dc2", "gw-dc2-a", "10.2.0.5")
        stale = [check_service_node("gw-dc2-a", "10.2.0.1", "mesh-gateway", 8443, dc="dc2")]
        double.federation.set("dc2", stale)
        double.gateways.update("dc2", "gw-dc2-a", address="10.2.0.9")  # catalog moves on
        state = double.federation.state("dc2")
        assert state is not None
        assert state["MeshGateways"][0]["Service"]["Address"] == "10.2.0.1"


async def test_blocking_wakes_on_anti_entropy_after_delay() -> None:
    async with SimConsul(anti_entropy_delay=0.1) as double, aiohttp.ClientSession() as session:
        _, _, headers = await get(session, double, "/v1/internal/federation-states")
        index = headers["X-Consul-Index"]
        async with session.put(
            double.url + "/v1/agent/service/register", json=GATEWAY_BODY
        ) as answer:
            assert answer.status == 200
        assert double.federation.state("dc1") is None  # not synced yet
        started = time.monotonic()
        _, states, after = await get(
            session, double, f"/v1/internal/federation-states?index={index}&wait=5s"
        )
        assert time.monotonic() - started < 4
        assert int(after["X-Consul-Index"]) > int(index)
        assert [s["Datacenter"] for s in states] == ["dc1"]


async def test_federation_endpoints_need_operator_read() -> None:
    tokens = [AclToken("reader", ("service:read", "node:read"), accessor_id="a-1")]
    async with SimConsul(acl_tokens=tokens) as double, aiohttp.ClientSession() as session:
        double.gateways.add("dc2", "gw", "10.2.0.5")
        headers = {"X-Consul-Token": "reader"}
        async with session.get(
            double.url + "/v1/internal/federation-states", headers=headers
        ) as answer:
            assert answer.status == 403
            assert await answer.text() == (
                "Permission denied: token with AccessorID 'a-1' lacks permission 'operator:read'"
            )
        async with session.get(
            double.url + "/v1/internal/federation-states/mesh-gateways", headers=headers
        ) as answer:
            assert answer.status == 200  # filtered by service/node read, not operator:read
            assert list(await answer.json()) == ["dc2"]


# --- raw HTTP: registration decoding, blocking parameters, leader loss ---------------------


async def test_pascal_and_snake_case_registrations_are_the_same() -> None:
    snake = {
        "kind": "mesh-gateway",
        "id": "mesh-gateway",
        "name": "mesh-gateway",
        "address": "10.0.0.5",
        "port": 8443,
        "tagged_addresses": {
            "lan": {"address": "10.0.0.5", "port": 8443},
            "wan": {"address": "203.0.113.5", "port": 443},
        },
        "meta": {"consul-wan-federation": "1"},
        "check": {
            "name": "mesh-gateway listening",
            "tcp": "10.0.0.5:8443",
            "interval": "10s",
            "deregister_critical_service_after": "6h",
        },
    }
    assert decode_registration(snake) == decode_registration(GATEWAY_BODY)
    async with SimConsul() as first, SimConsul() as second:
        async with aiohttp.ClientSession() as session:
            for double, body in ((first, GATEWAY_BODY), (second, snake)):
                async with session.put(
                    double.url + "/v1/agent/service/register", json=body
                ) as answer:
                    assert answer.status == 200
        assert first.agent.service("mesh-gateway") == second.agent.service("mesh-gateway")
        assert first.agent.checks("mesh-gateway") == second.agent.checks("mesh-gateway")


async def test_registration_decode_errors() -> None:
    async with SimConsul() as double, aiohttp.ClientSession() as session:
        url = double.url + "/v1/agent/service/register"
        async with session.put(url, json={**GATEWAY_BODY, "Port": "8443"}) as answer:
            assert answer.status == 400
            assert (await answer.text()).startswith("Request decode failed: json: cannot unmarshal")
        async with session.put(url, data=b"{not json") as answer:
            assert answer.status == 400
        async with session.put(url, json={"Port": 1}) as answer:
            assert (answer.status, await answer.text()) == (400, "Missing service name")


async def test_reregistration_without_change_does_not_bump_the_catalog() -> None:
    async with SimConsul() as double, aiohttp.ClientSession() as session:
        url = double.url + "/v1/agent/service/register"
        async with session.put(url, json=GATEWAY_BODY):
            pass
        _, _, headers = await get(session, double, "/v1/health/service/mesh-gateway")
        async with session.put(url, json=GATEWAY_BODY):
            pass
        _, _, again = await get(session, double, "/v1/health/service/mesh-gateway")
        assert again["X-Consul-Index"] == headers["X-Consul-Index"]


async def test_blocking_parameters_are_validated() -> None:
    async with SimConsul() as double, aiohttp.ClientSession() as session:
        async with session.get(double.url + "/v1/health/service/consul?index=3&wait=soon") as r:
            assert (r.status, await r.text()) == (400, "Invalid wait time")
        async with session.get(double.url + "/v1/health/service/consul?index=-1") as r:
            assert (r.status, await r.text()) == (400, "Invalid index")


async def test_lost_leader_fails_consistent_reads_but_not_stale_ones() -> None:
    async with SimConsul() as double, aiohttp.ClientSession() as session:
        double.servers.set_leader(None)
        async with session.get(double.url + "/v1/health/service/consul") as r:
            assert (r.status, await r.text()) == (500, "No cluster leader")
        status, entries, headers = await get(session, double, "/v1/health/service/consul?stale")
        assert status == 200 and len(entries) == 1
        assert headers["X-Consul-KnownLeader"] == "false"


async def test_filter_subset_and_headers() -> None:
    async with SimConsul() as double, aiohttp.ClientSession() as session:
        double.gateways.add("dc1", "gw-fed", "10.0.0.21")
        double.gateways.add("dc1", "gw-plain", "10.0.0.22", wanfed=False)
        expr = 'Service.Meta["consul-wan-federation"] == "1"'
        async with session.get(
            double.url + "/v1/health/service/mesh-gateway", params={"filter": expr}
        ) as answer:
            entries = await answer.json()
            assert [e["Node"]["Node"] for e in entries] == ["gw-fed"]
            assert answer.headers["X-Consul-KnownLeader"] == "true"
            assert answer.headers["X-Consul-LastContact"] == "0"
        async with session.get(
            double.url + "/v1/catalog/service/mesh-gateway",
            params={"filter": 'ServiceMeta["consul-wan-federation"] != "1"'},
        ) as answer:
            assert [e["Node"] for e in await answer.json()] == ["gw-plain"]


async def test_agent_service_hash_blocking() -> None:
    async with SimConsul() as double, aiohttp.ClientSession() as session:
        async with session.get(double.url + "/v1/agent/service/mesh-gateway") as answer:
            assert answer.status == 404
        url = double.url + "/v1/agent/service/register"
        async with session.put(url, json=GATEWAY_BODY):
            pass
        status, svc, headers = await get(session, double, "/v1/agent/service/mesh-gateway")
        assert status == 200 and svc["ContentHash"] == headers["X-Consul-ContentHash"]
        assert svc["Datacenter"] == "dc1"
        path = f"/v1/agent/service/mesh-gateway?hash={svc['ContentHash']}&wait=5s"
        pending = asyncio.create_task(get(session, double, path))
        await double.requests.wait_for_async("/v1/agent/service/mesh-gateway", count=3)
        async with session.put(url, json={**GATEWAY_BODY, "Port": 8444}):
            pass
        _, changed, _ = await asyncio.wait_for(pending, 4)
        assert changed["Port"] == 8444
        assert changed["ContentHash"] != svc["ContentHash"]


async def test_tcp_checks_follow_the_target() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    body = {
        **GATEWAY_BODY,
        "Address": "127.0.0.1",
        "Port": port,
        "Check": {"TCP": f"127.0.0.1:{port}", "Interval": "10s"},
    }
    try:
        async with SimConsul(check_interval=0.02) as double, aiohttp.ClientSession() as s:
            async with s.put(double.url + "/v1/agent/service/register", json=body):
                pass
            path, index = "/v1/health/service/mesh-gateway", "1"
            for wanted, output in (("passing", "TCP connect"), ("critical", "dial tcp")):
                while True:  # each turn is a blocking query: it returns on a change
                    _, entries, headers = await get(s, double, f"{path}?index={index}&wait=5s")
                    index = headers["X-Consul-Index"]
                    check = entries[0]["Checks"][-1]
                    if check["Status"] == wanted:
                        break
                assert check["Output"].startswith(output)
                server.close()  # the gateway goes away: the next probe fails
    finally:
        server.close()
        await server.wait_closed()


# --- raw HTTP: fault injection ----------------------------------------------------------------


async def test_fail_for_a_number_of_times() -> None:
    async with SimConsul() as double, aiohttp.ClientSession() as session:
        double.faults.fail("/v1/health/", status=503, body="rpc error: no leader", times=2)
        statuses = []
        for _ in range(3):
            async with session.get(double.url + "/v1/health/service/consul") as answer:
                statuses.append(
                    (answer.status, await answer.text() if answer.status != 200 else "")
                )
        assert statuses == [(503, "rpc error: no leader")] * 2 + [(200, "")]


async def test_garbage_drop_and_hang() -> None:
    async with SimConsul() as double, aiohttp.ClientSession() as session:
        double.faults.garbage("/v1/catalog/*")
        async with session.get(double.url + "/v1/catalog/services") as answer:
            assert answer.status == 200
            with pytest.raises(json.JSONDecodeError):
                json.loads(await answer.text())
        double.faults.clear()

        double.faults.drop("/v1/status/leader")  # aiohttp retries a reused connection once
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with session.get(double.url + "/v1/status/leader") as answer:
                await answer.read()
        assert len(double.requests.find("/v1/status/leader")) == 2
        double.faults.clear()
        status, leader, _ = await get(session, double, "/v1/status/leader")
        assert (status, leader) == (200, "10.0.0.10:8300")

        double.faults.hang("/v1/agent/self")
        with pytest.raises(TimeoutError):
            async with session.get(
                double.url + "/v1/agent/self", timeout=aiohttp.ClientTimeout(total=0.2)
            ) as answer:
                await answer.read()
        pending = asyncio.create_task(get(session, double, "/v1/agent/self"))
        await double.requests.wait_for_async("/v1/agent/self", count=2)  # parked
        double.faults.clear("/v1/agent/self")
        status, me, _ = await asyncio.wait_for(pending, 5)
        assert status == 200 and me["Config"]["Datacenter"] == "dc1"


async def test_reset_index_goes_backwards() -> None:
    async with SimConsul() as double, aiohttp.ClientSession() as session:
        _, _, before = await get(session, double, "/v1/health/service/consul")
        assert int(before["X-Consul-Index"]) > 2
        double.raft.reset(1)
        _, _, after = await get(session, double, "/v1/health/service/consul")
        assert after["X-Consul-Index"] == "1"
        double.servers.add("consul-server-1", "10.0.0.11")
        _, _, later = await get(session, double, "/v1/health/service/consul")
        assert 1 < int(later["X-Consul-Index"]) < int(before["X-Consul-Index"]) + 5


async def test_down_refuses_connections_and_up_listens_again() -> None:
    async with SimConsul() as double, aiohttp.ClientSession() as session:
        url = double.url
        _, _, headers = await get(session, double, "/v1/health/service/consul")
        blocked = asyncio.create_task(
            get(session, double, f"/v1/health/service/consul?index={headers['X-Consul-Index']}")
        )
        await double.raft.wait_blocked_async(1)
        await double.down()
        with pytest.raises(aiohttp.ClientError):
            await blocked  # the open connection was cut
        with pytest.raises(aiohttp.ClientConnectorError):
            async with session.get(url + "/v1/status/leader"):
                pass
        await double.up()
        assert double.url == url
        status, _, _ = await get(session, double, "/v1/status/leader")
        assert status == 200


def test_thread_double_down_up(threaded: SimConsulThread) -> None:
    c = client(threaded)
    threaded.down()
    with pytest.raises(Exception, match=r"Connection refused|Max retries"):
        c.status.leader()
    threaded.up()
    assert c.status.leader() == "10.0.0.10:8300"


async def test_requests_are_recorded() -> None:
    async with SimConsul() as double, aiohttp.ClientSession() as session:
        async with session.get(
            double.url + "/v1/health/service/consul",
            params={"passing": "", "dc": "dc1"},
            headers={"X-Consul-Token": "abc"},
        ):
            pass
        (request,) = double.requests.find("/v1/health/service/*")
        assert request.method == "GET"
        assert request.query["dc"] == "dc1" and "passing" in request.query
        assert request.headers["x-consul-token"] == "abc"


def test_go_durations() -> None:
    assert parse_go_duration("10s") == 10
    assert parse_go_duration("5m") == 300
    assert parse_go_duration("500ms") == 0.5
    assert parse_go_duration("1m30s") == 90
    assert parse_go_duration("1.5h") == 5400
    for bad in ("10", "", "s", "10 s", "5x"):
        with pytest.raises(ValueError):
            parse_go_duration(bad)


def test_module_entry_point_serves(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text(
        json.dumps(
            {
                "gateways": {"dc2": [{"node": "gw", "address": "10.2.0.5", "wan": "1.2.3.4:443"}]},
                "trust_domain": "abc.consul",
            }
        )
    )
    command = [sys.executable, "-m", "meshgw.simconsul", "--port", "0", "--state", str(state)]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            url = child.stdout.readline().rsplit(" ", 1)[-1].strip()
            host, port = url.split("//")[1].rsplit(":", 1)
            c = consul.Consul(host=host, port=int(port))
            assert c.catalog.datacenters() == ["dc1", "dc2"]
            assert c.connect.ca.roots()["TrustDomain"] == "abc.consul"
        finally:
            child.terminate()
            child.wait(10)
