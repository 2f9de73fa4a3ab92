"""Route table rules (docs/consul.md#matching-rule): exact first, longest wildcard suffix, the
rest refused."""

from __future__ import annotations

import pytest

from meshgw.routing import Cluster, RouteKind, RouteTable, Target
from meshgw.topology import (
    ClusterSettings,
    Endpoint,
    GatewayKey,
    Peering,
    PeerRoute,
    ServiceKey,
    Source,
    TopologyPart,
    merge,
)
from tests.hellos import TRUST_DOMAIN as TD


def ep(host: str, port: int = 8443, healthy: bool = True) -> Endpoint:
    return Endpoint(host, port, healthy=healthy)


def table(expose: bool = True, trust_domain: str | None = TD) -> RouteTable:
    part = TopologyPart(
        source=Source.STATIC,
        datacenter="dc1",
        trust_domain=trust_domain,
        servers={"s1": ep("10.0.0.1", 8300), "s2": ep("10.0.0.2", 8300)},
        gateways={
            GatewayKey("dc1"): (ep("10.0.0.9"),),  # this gateway's own key: never routed
            GatewayKey("dc2"): (ep("10.2.0.1"), ep("10.2.0.2")),
            GatewayKey("dc3"): (ep("10.3.0.1"),),
            GatewayKey("dc2", "ap1"): (ep("10.2.1.1"),),
        },
        services={ServiceKey("web"): (ep("10.0.1.1", 20000),)},
    )
    return RouteTable.build(merge([part], expose_servers=expose))


DC2 = ["10.2.0.1:8443", "10.2.0.2:8443"]
ROUTES = [
    ("s1.server.dc1.consul", RouteKind.LOCAL_SERVER, ["10.0.0.1:8300"]),
    ("server.dc1.consul", RouteKind.ANY_LOCAL_SERVER, ["10.0.0.1:8300", "10.0.0.2:8300"]),
    ("server.dc2.consul", RouteKind.REMOTE_SERVER, DC2),
    ("s9.server.dc2.consul", RouteKind.REMOTE_SERVER, DC2),
    ("a.b.server.dc3.consul", RouteKind.REMOTE_SERVER, ["10.3.0.1:8443"]),
    (f"web.default.dc2.internal.{TD}", RouteKind.REMOTE_DATACENTER, DC2),
    (f"v1.web.default.dc3.internal.{TD}", RouteKind.REMOTE_DATACENTER, ["10.3.0.1:8443"]),
    (f"dc2.internal.{TD}", RouteKind.REMOTE_DATACENTER, DC2),
    (f"web.default.ap1.dc2.internal-v1.{TD}", RouteKind.REMOTE_DATACENTER, ["10.2.1.1:8443"]),
    (f"web.default.dc1.internal.{TD}", RouteKind.LOCAL_SERVICE, ["10.0.1.1:20000"]),
]  # fmt: skip


@pytest.mark.parametrize(("sni", "kind", "targets"), ROUTES)
def test_routes(sni: str, kind: RouteKind, targets: list[str]) -> None:
    route = table().resolve(sni)
    assert route is not None
    assert route.kind is kind
    assert sorted(str(t.endpoint) for t in route.cluster.targets) == targets


REFUSED = [
    "s3.server.dc1.consul",  # no such local server
    "x.s1.server.dc1.consul",  # no wildcard for the local datacenter's servers
    "server.dc9.consul",  # unknown datacenter
    "s1.server.dc9.consul",
    "server.dc2.consul.evil.com",
    "dc2.consul",
    "consul",
    f"api.default.dc1.internal.{TD}",  # unknown local service
    f"web.default.ap2.dc2.internal-v1.{TD}",  # partition without known gateways
    f"web.default.dc2.internal.{TD[:-1]}x",  # another trust domain
    f"x.dc1.internal.{TD}",  # the local datacenter via its own gateways
    "example.com",
]


@pytest.mark.parametrize("sni", REFUSED)
def test_everything_else_is_refused(sni: str) -> None:
    t = table()
    assert t.resolve(sni) is None
    assert ": refused:" in t.explain(sni)


def test_without_expose_servers_no_server_name_routes() -> None:
    t = table(expose=False)
    for sni in [
        "s1.server.dc1.consul",
        "server.dc1.consul",
        "server.dc2.consul",
        "a.server.dc2.consul",
    ]:
        assert t.resolve(sni) is None
        assert "--expose-servers" in t.explain(sni)
    assert t.resolve(f"web.default.dc2.internal.{TD}") is not None


def test_without_trust_domain_mesh_names_are_refused() -> None:
    t = table(trust_domain=None)
    assert t.resolve(f"web.default.dc2.internal.{TD}") is None
    assert t.resolve("server.dc2.consul") is not None
    assert any("trust domain" in note for note in t.notes)


def test_exact_beats_wildcard_and_longest_suffix_wins() -> None:
    t = table()
    # server.dc2.consul is an exact route; node names under it take the wildcard.
    assert t.resolve("server.dc2.consul").pattern == "server.dc2.consul"  # type: ignore[union-attr]
    assert t.resolve("n.server.dc2.consul").pattern == "*.server.dc2.consul"  # type: ignore[union-attr]
    route = t.resolve(f"web.default.dc2.internal.{TD}")
    assert route is not None and route.pattern == f"*.dc2.internal.{TD}"


def test_round_robin_then_failover_order_and_unhealthy_last() -> None:
    part = TopologyPart(
        source=Source.STATIC,
        datacenter="dc1",
        gateways={GatewayKey("dc2"): (ep("a"), ep("b", healthy=False), ep("c"))},
    )
    cluster = (
        RouteTable.build(merge([part], expose_servers=True)).exact["server.dc2.consul"].cluster
    )
    orders = [[t.endpoint.host for t in cluster.attempt_order()] for _ in range(3)]
    assert orders == [["a", "c", "b"], ["c", "a", "b"], ["a", "c", "b"]]


def test_merge_later_part_wins_and_static_settings_override() -> None:
    consul = TopologyPart(
        source=Source.CONSUL,
        datacenter="dc1",
        trust_domain=TD,
        servers={"s1": ep("10.0.0.1", 8300)},
        gateways={GatewayKey("dc2"): (ep("10.2.0.1"),)},
    )
    static = TopologyPart(source=Source.STATIC, gateways={GatewayKey("dc2"): (ep("192.0.2.1"),)})
    topo = merge([consul, static])
    assert topo.gateways[GatewayKey("dc2")] == (ep("192.0.2.1"),)
    assert topo.servers["s1"] == ep("10.0.0.1", 8300)
    assert topo.trust_domain == TD
    with pytest.raises(ValueError, match="--dc"):
        merge([TopologyPart(source=Source.STATIC)])


def test_ipv6_and_dns_endpoints() -> None:
    part = TopologyPart(
        source=Source.STATIC,
        datacenter="dc1",
        gateways={GatewayKey("dc2"): (ep("::1"), ep("gw.example.net"))},
    )
    targets = (
        RouteTable.build(merge([part], expose_servers=True))
        .exact["server.dc2.consul"]
        .cluster.targets
    )
    assert targets[0].sockaddr == ("::1", 8443, 0, 0)
    assert targets[1].sockaddr is None  # resolved at connect time


def test_a_server_node_name_with_a_dot_skips_only_its_own_route() -> None:
    # EC2-style node names are common; Consul cannot route <node>.server.<dc> for them either.
    part = TopologyPart(
        source=Source.CONSUL,
        datacenter="dc1",
        servers={"ip-10-0-0-1.ec2.internal": ep("10.0.0.1", 8300), "s2": ep("10.0.0.2", 8300)},
    )
    built = RouteTable.build(merge([part], expose_servers=True))
    route = built.resolve("server.dc1.consul")
    assert route is not None
    assert [str(t.endpoint) for t in route.cluster.targets] == ["10.0.0.1:8300", "10.0.0.2:8300"]
    assert built.resolve("s2.server.dc1.consul") is not None
    [skipped] = built.skipped
    assert skipped.reason == "invalid_name"
    assert "ip-10-0-0-1.ec2.internal" in str(skipped)
    assert "refused" in built.explain("ip-10-0-0-1.ec2.internal.server.dc1.consul")


# --- weights, health and passive health ----------------------------------------------------------


def cluster_of(*endpoints: Endpoint) -> Cluster:
    return Cluster("c", tuple(Target.of(e) for e in endpoints))


def picks(cluster: Cluster, n: int, down=None) -> list[str]:
    return [str(cluster.attempt_order(down)[0].endpoint) for _ in range(n)]


def test_weights_share_the_picks_smoothly() -> None:
    heavy, light = Endpoint("10.0.0.1", 1, weight=3), Endpoint("10.0.0.2", 1, weight=1)
    chosen = picks(cluster_of(heavy, light), 8)
    assert chosen.count("10.0.0.1:1") == 6 and chosen.count("10.0.0.2:1") == 2
    # Smooth: the light endpoint is not starved for three picks in a row at the start.
    assert "10.0.0.2:1" in chosen[:4]


def test_equal_weights_are_round_robin() -> None:
    c = cluster_of(ep("10.0.0.1", 1), ep("10.0.0.2", 1), ep("10.0.0.3", 1))
    assert picks(c, 6) == ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"] * 2


def test_unhealthy_only_when_nothing_healthy_is_left() -> None:
    c = cluster_of(ep("10.0.0.1", 1, healthy=False), ep("10.0.0.2", 1), ep("10.0.0.3", 1))
    orders = [[str(t.endpoint) for t in c.attempt_order()] for _ in range(4)]
    assert {order[0] for order in orders} == {"10.0.0.2:1", "10.0.0.3:1"}
    assert all(order[-1] == "10.0.0.1:1" for order in orders)  # still a last resort
    only_sick = cluster_of(ep("10.0.0.1", 1, healthy=False))
    assert [str(t.endpoint) for t in only_sick.attempt_order()] == ["10.0.0.1:1"]


def test_endpoints_seen_failing_are_tried_after_the_others_of_their_kind() -> None:
    c = cluster_of(ep("10.0.0.1", 1), ep("10.0.0.2", 1), ep("10.0.0.3", 1, healthy=False))
    down = {"10.0.0.1:1"}
    for _ in range(4):
        order = [t.address for t in c.attempt_order(lambda t: t.address in down)]
        assert order == ["10.0.0.2:1", "10.0.0.1:1", "10.0.0.3:1"]


# --- subsets, central config, host names -------------------------------------------------------


def test_subsets_and_their_connect_timeout() -> None:
    web = ServiceKey("web")
    part = TopologyPart(
        source=Source.CONSUL,
        datacenter="dc1",
        trust_domain=TD,
        services={
            web: (ep("10.0.1.1", 20000), ep("10.0.1.2", 20000)),
            ServiceKey("web", subset="v2"): (ep("10.0.1.2", 20000),),
        },
        service_settings={web: ClusterSettings(connect_timeout=15.0)},
        cluster_defaults=ClusterSettings(connect_timeout=3.0, max_connections=512),
    )
    built = RouteTable.build(merge([part]))
    route = built.resolve(f"v2.web.default.dc1.internal.{TD}")
    assert route is not None and route.kind is RouteKind.LOCAL_SERVICE
    assert [t.address for t in route.cluster.targets] == ["10.0.1.2:20000"]
    assert route.cluster.settings == ClusterSettings(connect_timeout=15.0, max_connections=512)
    plain = built.resolve(f"web.default.dc1.internal.{TD}")
    assert plain is not None and len(plain.cluster.targets) == 2
    assert built.resolve(f"v3.web.default.dc1.internal.{TD}") is None
    assert "connect timeout 15s, at most 512 connections" in built.explain(
        f"v2.web.default.dc1.internal.{TD}"
    )


def test_host_names_expand_to_every_address_and_mix_with_ips() -> None:
    part = TopologyPart(
        source=Source.CONSUL,
        datacenter="dc1",
        gateways={
            GatewayKey("dc2"): (ep("gw.dc2.example", 443), ep("203.0.113.9", 443)),
            GatewayKey("dc3"): (ep("gw.dc3.example", 443),),
        },
    )
    dns = TopologyPart(
        source=Source.DNS, addresses={"gw.dc2.example": ("198.51.100.1", "2001:db8::1")}
    )
    built = RouteTable.build(merge([part, dns], expose_servers=True))
    route = built.resolve("server.dc2.consul")
    assert route is not None
    assert [t.address for t in route.cluster.targets] == [
        "198.51.100.1:443",
        "[2001:db8::1]:443",
        "203.0.113.9:443",
    ]
    explained = built.explain("server.dc2.consul")
    assert "198.51.100.1:443 (gw.dc2.example)" in explained
    unresolved = built.resolve("server.dc3.consul")
    assert unresolved is not None and unresolved.cluster.targets[0].sockaddr is None
    assert "not resolved yet" in built.explain("server.dc3.consul")


# --- peering -----------------------------------------------------------------------------------

TD2 = "0a1b2c3d-0000-4000-8000-000000000002.consul"


def peering_table() -> RouteTable:
    part = TopologyPart(
        source=Source.CONSUL,
        datacenter="dc1",
        trust_domain=TD,
        peering=Peering(
            local_servers=(ep("10.0.0.1", 8503), ep("10.0.0.2", 8503)),
            remote_servers={
                f"server.dc9.peering.{TD2}": PeerRoute("cluster-02", (ep("192.0.2.9", 8443),))
            },
            exports={
                f"db.default.default.cluster-02.external.{TD}": PeerRoute(
                    "cluster-02", (ep("10.0.3.1", 21000),)
                )
            },
            exports_l7=frozenset({f"api.default.default.cluster-02.external.{TD}"}),
            imports={
                f"pay.default.default.cluster-01.external.{TD2}": PeerRoute(
                    "cluster-02", (ep("192.0.2.7", 443),)
                )
            },
        ),
    )
    return RouteTable.build(merge([part]))


@pytest.mark.parametrize(
    ("sni", "kind", "other_side", "targets"),
    [
        (f"server.dc1.peering.{TD}", RouteKind.LOCAL_PEERING_SERVER, "dc1",
         ["10.0.0.1:8503", "10.0.0.2:8503"]),
        (f"server.dc9.peering.{TD2}", RouteKind.REMOTE_PEERING_SERVER, "cluster-02",
         ["192.0.2.9:8443"]),
        (f"db.default.default.cluster-02.external.{TD}", RouteKind.PEERED_EXPORT, "cluster-02",
         ["10.0.3.1:21000"]),
        (f"pay.default.default.cluster-01.external.{TD2}", RouteKind.PEERED_IMPORT,
         "cluster-02", ["192.0.2.7:443"]),
    ],
)  # fmt: skip
def test_peering_routes(sni: str, kind: RouteKind, other_side: str, targets: list[str]) -> None:
    route = peering_table().resolve(sni)
    assert route is not None and route.kind is kind and route.datacenter == other_side
    assert [t.address for t in route.cluster.targets] == targets


def test_l7_exports_are_refused_with_their_reason() -> None:
    table = peering_table()
    sni = f"api.default.default.cluster-02.external.{TD}"
    assert table.resolve(sni) is None
    assert table.refused[sni] == "peered_l7"
    assert "peered_l7" in table.explain(sni)
    # Nothing else of the peering form routes: no open relay through peering names either.
    assert table.resolve(f"other.default.default.cluster-02.external.{TD}") is None
    assert table.resolve(f"server.dc8.peering.{TD2}") is None
