"""Consul JSON → endpoints: Consul's address rules, and nonsense never raises."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgw.control import catalog, central
from meshgw.simconsul import check_service_node, mesh_gateway_node
from meshgw.topology import GatewayKey


def test_wan_best_address_order() -> None:
    with_wan = mesh_gateway_node("n", "10.0.0.1", 8443, dc="dc2", wan=("203.0.113.1", 443))
    assert catalog.wan_address(with_wan) == ("203.0.113.1", 443)
    without_wan = mesh_gateway_node("n", "10.0.0.1", 8443, dc="dc2")
    assert catalog.wan_address(without_wan) == ("10.0.0.1", 8443)
    node_only = {"Node": {"Address": "10.9.9.9", "TaggedAddresses": {"wan": "198.51.100.7"}},
                 "Service": {"Port": 8443}}  # fmt: skip
    assert catalog.wan_address(node_only) == ("198.51.100.7", 8443)


def test_a_wan_tagged_address_without_address_falls_to_the_node() -> None:
    # Consul's BestAddress(true): a `wan` tagged address with no Address skips the service
    # Address and goes to the node's wan tagged address, keeping the tagged port.
    entry = {
        "Node": {"Address": "10.9.9.9", "TaggedAddresses": {"wan": "198.51.100.7"}},
        "Service": {"Address": "10.0.0.1", "Port": 8443,
                    "TaggedAddresses": {"wan": {"Address": "", "Port": 443}}},
    }  # fmt: skip
    assert catalog.wan_address(entry) == ("198.51.100.7", 443)


def test_servers_use_the_node_address_and_service_port() -> None:
    entry = check_service_node("consul-server-0", "10.0.0.10", "consul", 8300, dc="dc1")
    found = catalog.local_servers([entry])
    endpoint = found.rpc["consul-server-0"]
    assert (endpoint.host, endpoint.port, endpoint.healthy) == ("10.0.0.10", 8300, True)


def server(node: str, address: str, **meta: str) -> dict:
    return check_service_node(node, address, "consul", 8300, dc="dc1", meta=meta)


def test_peers_dial_the_servers_that_are_not_read_replicas_at_their_grpc_tls_port() -> None:
    found = catalog.local_servers(
        [
            server("s1", "10.0.0.1", grpc_tls_port="8503", read_replica="false"),
            server("s2", "10.0.0.2", grpc_tls_port="8503", read_replica="true"),
            server("s3", "10.0.0.3"),  # no grpc_tls_port: peers cannot dial it
        ]
    )
    assert [str(e) for e in found.grpc_tls] == ["10.0.0.1:8503"]
    assert set(found.rpc) == {"s1", "s2", "s3"}
    assert any("s3" in reason for reason in found.skipped)


def with_checks(weights: dict | None, *statuses: str) -> dict:
    service = {"Address": "10.0.0.1", "Port": 1}
    if weights is not None:
        service["Weights"] = weights
    return {"Node": {}, "Service": service, "Checks": [{"Status": s} for s in statuses]}


@pytest.mark.parametrize(
    ("weights", "statuses", "only_passing", "expected"),
    [
        (None, ["passing"], False, (True, 1)),
        ({"Passing": 10, "Warning": 1}, ["passing"], False, (True, 10)),
        ({"Passing": 10, "Warning": 3}, ["passing", "warning"], False, (True, 3)),
        ({"Passing": 10, "Warning": 3}, ["critical"], False, (False, 10)),
        ({"Passing": 10, "Warning": 0}, ["warning"], False, (False, 1)),  # weight 0: unhealthy
        ({"Passing": 500, "Warning": 1}, [], False, (True, 128)),  # clamped
        (None, ["warning"], True, (False, 1)),  # a subset's OnlyPassing
    ],
)
def test_health_and_weight_as_consul_gives_them_to_envoy(
    weights, statuses, only_passing, expected
) -> None:
    entry = with_checks(weights, *statuses)
    assert catalog.health_and_weight(entry, only_passing=only_passing) == expected


def test_federation_state_gateways_and_modify_index() -> None:
    gateway = mesh_gateway_node("gw", "10.2.0.1", 8443, dc="dc2", wan=("203.0.113.2", 443),
                                status="critical")  # fmt: skip
    parsed = catalog.federation_state_gateways({"dc2": [gateway]})
    (endpoint,) = parsed.endpoints[GatewayKey("dc2")]
    assert (endpoint.host, endpoint.port, endpoint.healthy) == ("203.0.113.2", 443, False)
    assert GatewayKey("dc2") in parsed.max_modify_index


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
documents = st.one_of(
    json_values,
    st.lists(
        st.fixed_dictionaries({"Node": json_values, "Service": json_values, "Checks": json_values})
    ),
    st.dictionaries(st.text(max_size=4), st.lists(st.fixed_dictionaries({"Service": json_values}))),
)


@settings(max_examples=120, deadline=None)
@given(documents)
def test_nonsense_is_skipped_or_refused_never_raised(document) -> None:
    for parse in (
        catalog.local_servers,
        catalog.federation_state_gateways,
        lambda d: catalog.datacenter_gateways([d], "dc2"),
        lambda d: catalog.service_instances(d, "web"),
        lambda d: catalog.imported_instances(d, "web"),
        catalog.gateway_names,
        catalog.trust_domain,
        catalog.agent_identity,
        central.service_resolvers,
        central.proxy_config,
        central.gateway_limits,
        central.peer_through_mesh_gateways,
        lambda d: central.peer_servers(central.peerings(d)),
        central.exported_services,
        lambda d: central.chain_target(d, "dc1"),
    ):
        with contextlib.suppress(catalog.CatalogError):
            parse(document)


# --- central config and peering ---------------------------------------------------------------


def test_service_resolvers_subsets_default_and_timeout() -> None:
    resolvers = central.service_resolvers(
        [
            {
                "Kind": "service-resolver",
                "Name": "web",
                "DefaultSubset": "v1",
                "Subsets": {
                    "v1": {"Filter": "Service.Meta.version == v1"},
                    "v2": {"Filter": "Service.Meta.version == v2", "OnlyPassing": True},
                },
                "ConnectTimeout": "15s",
            },
            {"Kind": "service-resolver", "Name": "api", "DefaultSubset": "missing"},
        ]
    )
    web = resolvers["web"]
    assert web.default_subset == "v1" and web.connect_timeout == 15.0
    assert web.subsets["v2"] == central.Subset("Service.Meta.version == v2", True)
    assert resolvers["api"].default_subset is None  # a default that names no subset


def test_gateway_proxy_config_and_limits() -> None:
    config = central.proxy_config(
        {
            "Proxy": {
                "Config": {
                    "connect_timeout_ms": 2500,
                    "envoy_gateway_remote_tcp_enable_keepalive": True,
                    "envoy_gateway_remote_tcp_keepalive_time": 30,
                }
            }
        }
    )
    assert config.connect_timeout == 2.5 and config.keepalive == (30, 75, 9)
    assert (
        central.proxy_config({"Proxy": {"Config": {"connect_timeout_ms": 0}}}).connect_timeout
        is None
    )
    limits = {"UpstreamConfig": {"Defaults": {"Limits": {"MaxConnections": 512}}}}
    assert central.gateway_limits(limits) == 512
    assert central.gateway_limits({}) is None


def peering(name: str, server_name: str, addresses: list[str], index: int, state: str = "ACTIVE"):
    return {
        "Name": name,
        "State": state,
        "PeerServerName": server_name,
        "PeerServerAddresses": addresses,
        "ModifyIndex": index,
        "StreamStatus": {"ImportedServices": ["pay"]},
    }


def test_peer_servers_as_consul_dials_them() -> None:
    found = central.peerings(
        [
            peering("a", "server.dc2.peering.x.consul", ["192.0.2.1:8443"], 10),
            peering("b", "server.dc2.peering.x.consul", ["192.0.2.2:8443"], 20),  # newer wins
            peering("c", "server.dc3.peering.y.consul", [], 30),  # nothing to dial
            peering("d", "server.dc4.peering.z.consul", ["192.0.2.4:8443"], 40, "DELETING"),
            peering("e", "server.dc5.peering.w.consul", ["gw.example.com:443"], 50),
        ]
    )
    servers = central.peer_servers(found)
    assert set(servers) == {"server.dc2.peering.x.consul", "server.dc5.peering.w.consul"}
    peer, endpoints = servers["server.dc2.peering.x.consul"]
    assert peer == "b" and [str(e) for e in endpoints] == ["192.0.2.2:8443"]
    assert [str(e) for e in servers["server.dc5.peering.w.consul"][1]] == ["gw.example.com:443"]
    assert found[0].imported == ("pay",)


def test_exported_services_and_their_chain_target() -> None:
    exports = central.exported_services(
        [{"Service": "db", "Consumers": {"Peers": ["p2", "p1"]}}, {"Service": "x", "Consumers": {}}]
    )
    assert exports == [central.Export("db", "default", "default", ("p1", "p2"))]
    chain = {
        "Chain": {
            "Protocol": "tcp",
            "StartNode": "resolver:db-v2.default.default.dc1",
            "Nodes": {"resolver:db-v2.default.default.dc1": {
                "Type": "resolver", "Resolver": {"Target": "v2.db.default.default.dc1"}}},
            "Targets": {"v2.db.default.default.dc1": {
                "Service": "db", "ServiceSubset": "v2", "Datacenter": "dc1",
                "Subset": {"Filter": "Service.Meta.v == 2", "OnlyPassing": True},
                "ConnectTimeout": "7s"}},
        }
    }  # fmt: skip
    target = central.chain_target(chain, "dc1")
    assert target == central.ChainTarget(
        "tcp", "db", central.Subset("Service.Meta.v == 2", True), 7.0
    )
    assert central.chain_target(chain, "dc2") is None  # a target in another datacenter
