"""Consul JSON → endpoints: Consul's address rules, and nonsense never raises."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from meshgw.control import catalog
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


def test_servers_use_the_node_address_and_service_port() -> None:
    entry = check_service_node("consul-server-0", "10.0.0.10", "consul", 8300, dc="dc1")
    parsed = catalog.local_servers([entry])
    (endpoint,) = parsed.endpoints["consul-server-0"]
    assert (endpoint.host, endpoint.port, endpoint.healthy) == ("10.0.0.10", 8300, True)


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
        lambda d: catalog.datacenter_gateways(d, "dc2"),
        lambda d: catalog.local_service_instances(d, "web"),
        catalog.trust_domain,
        catalog.agent_identity,
    ):
        with contextlib.suppress(catalog.CatalogError):
            parse(document)
