"""Real Consul estates through the simulated agent: local services discovered end to end,
gateways of any name, weights and health, subsets, host names, central config, services on
demand, passive health. Every route is proven by a connection reaching the right backend."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections import Counter
from typing import Any

from meshgw.bench.hellos import python_hello
from tests.conftest import WAIT, ask, closed_by_peer, connect, eventually, marker, recv_all
from tests.hellos import TRUST_DOMAIN as TD


def admin_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=WAIT) as response:
        return json.loads(response.read())


def route(port: int, match: str) -> dict[str, Any] | None:
    return next((r for r in admin_json(port, "/v1/routes")["routes"] if r["match"] == match), None)


def endpoints(port: int, match: str, field: str = "address") -> list[Any]:
    found = route(port, match)
    return [e[field] for e in found["endpoints"]] if found else []


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as response:
        return response.read().decode()


def web(subset: str = "") -> str:
    return f"{subset + '.' if subset else ''}web.default.dc1.internal.{TD}"


# --- local services ------------------------------------------------------------------------------


def test_a_local_mesh_service_is_discovered_end_to_end(consul, gateway_factory, backend_factory):
    sidecar = marker(backend_factory, b"web-sidecar")
    double = consul()
    double.services.add("web", "node-1", "127.0.0.1", 8080, proxy_port=sidecar.port)
    gw = gateway_factory(consul=double.url)
    eventually(lambda: route(gw.admin_port, web()) is not None)
    assert ask(gw.port, web()) == b"web-sidecar"
    # A second instance joins: both serve, round robin.
    other = marker(backend_factory, b"web-2")
    double.services.add("web", "node-2", "127.0.0.1", 8080, proxy_port=other.port)
    eventually(lambda: len(endpoints(gw.admin_port, web())) == 2)
    assert {ask(gw.port, web()) for _ in range(4)} == {b"web-sidecar", b"web-2"}


def test_subsets_route_with_the_filters_consul_evaluates(consul, gateway_factory, backend_factory):
    v1, v2 = marker(backend_factory, b"v1"), marker(backend_factory, b"v2")
    double = consul()
    double.services.add("web", "n1", "127.0.0.1", 80, proxy_port=v1.port, meta={"version": "1"})
    double.services.add("web", "n2", "127.0.0.1", 80, proxy_port=v2.port, meta={"version": "2"})
    double.config.set_service_resolver(
        "web",
        DefaultSubset="v1",
        Subsets={
            "v1": {"Filter": 'Service.Meta.version == "1"'},
            "v2": {"Filter": 'Service.Meta.version == "2"'},
        },
        ConnectTimeout="3s",
    )
    gw = gateway_factory(consul=double.url)
    eventually(lambda: route(gw.admin_port, web("v2")) is not None)
    eventually(lambda: len(endpoints(gw.admin_port, web())) == 1)
    assert {ask(gw.port, web("v2")) for _ in range(3)} == {b"v2"}
    assert {ask(gw.port, web("v1")) for _ in range(3)} == {b"v1"}
    assert {ask(gw.port, web()) for _ in range(3)} == {b"v1"}  # the DefaultSubset
    assert (route(gw.admin_port, web("v2")) or {}).get("connect_timeout") == 3.0


def test_services_on_demand_in_a_large_catalog(consul, gateway_factory, backend_factory):
    backends = {name: marker(backend_factory, name.encode()) for name in ("a", "b", "c")}
    double = consul()
    for name, backend in backends.items():
        double.services.add(name, f"node-{name}", "127.0.0.1", 80, proxy_port=backend.port)
    # One watch at a time for three services: each is watched when a connection asks.
    gw = gateway_factory(consul=double.url, service_watch_limit=1)
    eventually(lambda: admin_json(gw.admin_port, "/v1/topology")["services_on_demand"])
    for _ in range(2):
        for name in backends:
            assert ask(gw.port, f"{name}.default.dc1.internal.{TD}") == name.encode()
    status = admin_json(gw.admin_port, "/v1/topology")["sources"]["consul"]["watches"]
    assert status["services"] == {"in_catalog": 3, "watched": 1, "on_demand": True}
    # A name the catalog does not have waits for nothing: refused at once.
    with connect(gw.port) as client:
        client.sendall(python_hello(f"nope.default.dc1.internal.{TD}"))
        assert closed_by_peer(client)


# --- remote gateways -----------------------------------------------------------------------------


def test_gateways_of_any_service_name_are_found_in_their_catalog(
    consul, gateway_factory, backend_factory
):
    old, k8s = marker(backend_factory, b"old"), marker(backend_factory, b"k8s")
    double = consul()
    double.catalog.set_datacenters(["dc1", "dc2"])
    double.gateways.add("dc2", "vm", "10.2.0.1", wan=("127.0.0.1", old.port))
    # Federation states stop following dc2 (its leader cannot reach the primary, say), then
    # consul-k8s registers a gateway under its own name and the old one goes.
    double.federation.set("dc2", double.federation.state("dc2")["MeshGateways"], freeze=True)
    double.gateways.add(
        "dc2", "k8s-node", "10.2.0.9", wan=("127.0.0.1", k8s.port),
        name="dc2-mesh-gateway", service_id="dc2-mesh-gateway",
    )  # fmt: skip
    double.gateways.remove("dc2", "vm")
    gw = gateway_factory(consul=double.url, expose_servers=True)
    wanted = [f"127.0.0.1:{k8s.port}"]
    eventually(lambda: endpoints(gw.admin_port, "server.dc2.consul") == wanted)
    assert ask(gw.port, "server.dc2.consul") == b"k8s"
    assert ask(gw.port, f"web.default.dc2.internal.{TD}") == b"k8s"


def test_weights_and_warnings_as_consul_gives_them(consul, gateway_factory, backend_factory):
    heavy, light = marker(backend_factory, b"heavy"), marker(backend_factory, b"light")
    double = consul()
    double.catalog.set_datacenters(["dc1", "dc2"])
    weights = {"Passing": 3, "Warning": 1}
    double.gateways.add("dc2", "a", "10.2.0.1", wan=("127.0.0.1", heavy.port), weights=weights)
    double.gateways.add("dc2", "b", "10.2.0.2", wan=("127.0.0.1", light.port))
    gw = gateway_factory(consul=double.url, expose_servers=True)

    def weights_now() -> list[int]:
        return sorted(endpoints(gw.admin_port, "server.dc2.consul", "weight"))

    eventually(lambda: weights_now() == [1, 3])
    answers = Counter(ask(gw.port, "server.dc2.consul") for _ in range(8))
    assert answers == {b"heavy": 6, b"light": 2}
    # A warning check takes the Warning weight; a critical one makes it a last resort.
    double.gateways.update("dc2", "a", status="warning")
    eventually(lambda: weights_now() == [1, 1])
    double.gateways.update("dc2", "a", status="critical")
    eventually(lambda: endpoints(gw.admin_port, "server.dc2.consul", "healthy") == [False, True])
    assert {ask(gw.port, "server.dc2.consul") for _ in range(4)} == {b"light"}


def test_a_gateway_behind_a_host_name_is_resolved(consul, gateway_factory, backend_factory):
    remote = marker(backend_factory, b"behind-a-name")
    double = consul()
    double.catalog.set_datacenters(["dc1", "dc2"])
    double.gateways.add("dc2", "lb", "10.2.0.1", wan=("localhost", remote.port))
    gw = gateway_factory(consul=double.url, expose_servers=True)

    eventually(lambda: f"127.0.0.1:{remote.port}" in endpoints(gw.admin_port, "server.dc2.consul"))
    assert admin_json(gw.admin_port, "/v1/topology")["addresses"]["localhost"]
    for _ in range(3):  # ::1 (if localhost has it) refuses: failover, then tried last
        assert ask(gw.port, "server.dc2.consul") == b"behind-a-name"


# --- central configuration and limits ------------------------------------------------------------


def test_the_gateways_central_config_and_its_connection_limit(
    consul, gateway_factory, backend_factory, pump
):
    def hold(conn: socket.socket) -> None:
        recv_all(conn)

    remote = backend_factory(hold)
    double = consul()
    double.catalog.set_datacenters(["dc1", "dc2"])
    double.gateways.add("dc2", "a", "10.2.0.1", wan=("127.0.0.1", remote.port))
    double.config.set_proxy_defaults({"connect_timeout_ms": 1500})
    double.config.set_service_defaults("mesh-gateway", limits={"MaxConnections": 1})
    gw = gateway_factory(consul=double.url, register=True, expose_servers=True, pump=pump)
    eventually(
        lambda: (route(gw.admin_port, "server.dc2.consul") or {}).get("max_connections") == 1
    )
    found = route(gw.admin_port, "server.dc2.consul")
    assert found is not None and found["connect_timeout"] == 1.5
    hello = python_hello("server.dc2.consul")
    with connect(gw.port) as first:
        first.sendall(hello)
        eventually(lambda: remote.accepted == 1)
        with connect(gw.port) as second:  # over the cluster's limit
            second.sendall(hello)
            assert closed_by_peer(second)
    assert 'meshgw_rejections_total{reason="cluster_limit"} 1.0' in metrics(gw.admin_port)
    gw.wait_idle()  # the first closed (in a kernel tunnel too): its place is free again
    with connect(gw.port) as third:
        third.sendall(hello)
        eventually(lambda: remote.accepted == 2)


def test_the_connect_timeout_setting_wins_over_central_config(consul, gateway_factory):
    double = consul()
    double.catalog.set_datacenters(["dc1", "dc2"])
    double.gateways.add("dc2", "a", "10.2.0.1", wan=("127.0.0.1", 9))
    double.config.set_proxy_defaults({"connect_timeout_ms": 1500})
    gw = gateway_factory(
        consul=double.url, register=True, expose_servers=True, connect_timeout="4s"
    )
    eventually(lambda: route(gw.admin_port, "server.dc2.consul") is not None)
    assert (route(gw.admin_port, "server.dc2.consul") or {}).get("connect_timeout") == 4.0


# --- passive health -----------------------------------------------------------------------------


def test_an_endpoint_that_refuses_is_shown_down_and_tried_last(gateway_factory, backend_factory):
    good = marker(backend_factory, b"good")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        refusing = taken.getsockname()[1]  # closed at once: connecting there is refused
    gw = gateway_factory(
        expose_servers=True, gateway=[f"dc2=127.0.0.1:{refusing}", f"dc2={good.address}"]
    )
    assert ask(gw.port, "server.dc2.consul") == b"good"
    addresses = endpoints(gw.admin_port, "server.dc2.consul")
    down = endpoints(gw.admin_port, "server.dc2.consul", "down")
    assert dict(zip(addresses, down, strict=True)) == {
        f"127.0.0.1:{refusing}": True,
        good.address: False,
    }
    text = metrics(gw.admin_port)
    assert (
        f'meshgw_upstream_down{{address="127.0.0.1:{refusing}",reason="econnrefused"}} 1.0' in text
    )
    # While it is down, every connection goes to the good one first: no more refusals.
    before = text.count("econnrefused")
    for _ in range(4):
        assert ask(gw.port, "server.dc2.consul") == b"good"
    assert metrics(gw.admin_port).count("econnrefused") == before
