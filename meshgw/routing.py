"""The route table: SNI name → cluster of endpoints, as Consul's mesh gateway routes.

`RouteTable.build(topology)` turns a Topology into an immutable table; `table.resolve(sni)` gives
the Route or None. Matching follows Envoy's rule as Consul configures it
(docs/consul.md#matching-rule): an exact name first, then the longest wildcard suffix (a wildcard
matches one or more labels); anything else is refused. meshgw never resolves a name it was not told
about: it is not an open proxy.
"""

from __future__ import annotations

import enum
import ipaddress
import itertools
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from meshgw.topology import DEFAULT_PARTITION, Endpoint, GatewayKey, Topology
from meshgw.wire.names import (
    GatewayName,
    ServerName,
    ServiceName,
    gateway_sni,
    parse_sni,
    server_sni,
    service_sni,
)


class RouteKind(enum.Enum):
    """What a route reaches; the values are Prometheus label values."""

    LOCAL_SERVER = "local_server"  # <node>.server.<localdc>.<domain>
    ANY_LOCAL_SERVER = "any_local_server"  # server.<localdc>.<domain>
    REMOTE_SERVER = "remote_server"  # server.<dc>.<domain>, *.server.<dc>.<domain>
    REMOTE_DATACENTER = "remote_datacenter"  # *.<dc>.internal.<td>, partition forms
    LOCAL_SERVICE = "local_service"  # <svc>.<ns>.<localdc>.internal.<td>


@dataclass(frozen=True, slots=True)
class Target:
    """An endpoint with its socket address worked out once, at build time, not per connection."""

    endpoint: Endpoint
    family: int
    # (host, port) for IPv4, (host, port, 0, 0) for IPv6; None when the host is a DNS name.
    sockaddr: tuple | None

    @classmethod
    def of(cls, endpoint: Endpoint) -> Target:
        try:
            ip = ipaddress.ip_address(endpoint.host)
        except ValueError:
            return cls(endpoint, socket.AF_UNSPEC, None)
        if ip.version == 6:
            return cls(endpoint, socket.AF_INET6, (str(ip), endpoint.port, 0, 0))
        return cls(endpoint, socket.AF_INET, (str(ip), endpoint.port))


@dataclass(slots=True)
class Cluster:
    """A named set of endpoints, chosen round robin, healthy ones before unhealthy ones.

    Only the round-robin cursor changes after build; everything else is fixed.
    """

    name: str
    targets: tuple[Target, ...]
    _healthy: tuple[Target, ...] = field(init=False, repr=False)
    _unhealthy: tuple[Target, ...] = field(init=False, repr=False)
    _cursor: Iterator[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._healthy = tuple(t for t in self.targets if t.endpoint.healthy)
        self._unhealthy = tuple(t for t in self.targets if not t.endpoint.healthy)
        self._cursor = itertools.count()

    def attempt_order(self) -> list[Target]:
        """Targets to try in order: the next one round robin, then the others to fail over to.

        A critical endpoint is tried only after every healthy one (Consul marks them UNHEALTHY
        for Envoy, which still uses them when nothing else is left).
        """
        healthy = self._healthy
        if healthy:
            start = next(self._cursor) % len(healthy)
            ordered = [*healthy[start:], *healthy[:start]]
        else:
            ordered = []
        return ordered + list(self._unhealthy)


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    datacenter: str
    cluster: Cluster
    # The exact name or wildcard pattern that matched, for /v1/routes and `meshgw routes --sni`.
    pattern: str


@dataclass(frozen=True, slots=True)
class SkippedRoute:
    """A route the topology asked for but no ClientHello could ever match, and why."""

    what: str  # e.g. "server node 'ip-10-0-0-1.ec2.internal'"
    reason: str  # a Prometheus label value
    detail: str

    def __str__(self) -> str:
        return f"{self.what}: {self.detail}"


@dataclass(frozen=True, slots=True)
class RouteTable:
    topology: Topology
    exact: dict[str, Route]
    # Keyed by the suffix after "*." (e.g. "server.dc2.consul").
    wildcard: dict[str, Route]
    notes: tuple[str, ...] = ()
    skipped: tuple[SkippedRoute, ...] = ()

    @classmethod
    def empty(cls) -> RouteTable:
        """The table before the local datacenter is known: every name is refused."""
        return cls(Topology(datacenter=""), {}, {}, ("the local datacenter is not known yet",))

    @classmethod
    def build(cls, topology: Topology) -> RouteTable:
        """Every route the topology implies. Never raises for what a source published: an
        entry whose name cannot be spelled in SNI is skipped with its reason."""
        builder = _Builder(topology)
        builder.servers()
        builder.remote_gateways()
        builder.local_services()
        return cls(
            topology,
            builder.exact,
            builder.wildcard,
            tuple(builder.notes),
            tuple(builder.skipped),
        )

    def resolve(self, sni: str) -> Route | None:
        """The route for a (lower-case, validated) SNI name, or None to refuse it."""
        route = self.exact.get(sni)
        if route is not None:
            return route
        wildcard = self.wildcard
        if not wildcard:
            return None
        # Longest suffix first: drop one leading label at a time, so `*` spans 1+ labels.
        dot = sni.find(".")
        while dot != -1:
            route = wildcard.get(sni[dot + 1 :])
            if route is not None:
                return route
            dot = sni.find(".", dot + 1)
        return None

    def explain(self, sni: str) -> str:
        """One sentence saying which route a name takes and why, or why it is refused."""
        route = self.resolve(sni)
        if route is not None:
            how = "exact name" if route.pattern == sni else f"wildcard {route.pattern}"
            targets = ", ".join(str(t.endpoint) for t in route.cluster.targets)
            return f"{sni}: {route.kind.value} (dc {route.datacenter}) by {how} -> {targets}"
        return f"{sni}: refused: {self._refusal(sni)}"

    def _refusal(self, sni: str) -> str:
        topo = self.topology
        parsed = parse_sni(sni, domain=topo.domain, trust_domain=topo.trust_domain)
        if parsed is None:
            return "not a Consul server or mesh name for this domain and trust domain"
        if isinstance(parsed, ServerName):
            if not topo.expose_servers:
                return "server names are routed only with --expose-servers"
            if parsed.datacenter == topo.datacenter:
                return f"no local server named {parsed.node!r}"
            return f"no mesh gateways known for datacenter {parsed.datacenter!r}"
        if isinstance(parsed, ServiceName | GatewayName):
            if topo.trust_domain is None:
                return "the trust domain is unknown (set --trust-domain)"
            if parsed.datacenter == topo.datacenter:
                return "no such local mesh service"
            key = GatewayKey(parsed.datacenter, parsed.partition)
            return f"no mesh gateways known for {key.datacenter} partition {key.partition}"
        return f"{type(parsed).__name__} names are not routed by meshgw"

    def to_json(self) -> dict:
        def endpoints(route: Route) -> list[dict]:
            return [
                {
                    "address": str(t.endpoint),
                    "healthy": t.endpoint.healthy,
                    "source": t.endpoint.source.value,
                }
                for t in route.cluster.targets
            ]

        routes = [
            {
                "match": r.pattern,
                "kind": r.kind.value,
                "datacenter": r.datacenter,
                "cluster": r.cluster.name,
                "endpoints": endpoints(r),
            }
            for r in [*self.exact.values(), *self.wildcard.values()]
        ]
        return {
            "datacenter": self.topology.datacenter,
            "domain": self.topology.domain,
            "trust_domain": self.topology.trust_domain,
            "expose_servers": self.topology.expose_servers,
            "routes": routes,
            "notes": list(self.notes),
        }


class _Builder:
    """Fills a table's dicts, one family of routes at a time (see RouteTable.build)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.exact: dict[str, Route] = {}
        self.wildcard: dict[str, Route] = {}
        self.notes: list[str] = []
        self.skipped: list[SkippedRoute] = []

    def add(
        self,
        kind: RouteKind,
        dc: str,
        name: str,
        endpoints: tuple[Endpoint, ...],
        *,
        wildcard: bool = False,
    ) -> None:
        cluster = Cluster(name, tuple(Target.of(e) for e in endpoints))
        self.exact[name] = Route(kind, dc, cluster, name)
        if wildcard:
            self.wildcard[name] = Route(kind, dc, cluster, f"*.{name}")

    def name(self, what: str, spell: Callable[..., str], *args: str | None) -> str | None:
        """`spell(*args)`: the SNI name of a route, or None (and a skipped route) when Consul's
        grammar cannot spell it."""
        try:
            return spell(*args)
        except ValueError as error:
            self.skipped.append(SkippedRoute(what, "invalid_name", str(error)))
            return None

    def servers(self) -> None:
        topo = self.topology
        if not topo.expose_servers:
            self.notes.append("--expose-servers is off: no server name is routed")
            return
        local_dc, domain, servers = topo.datacenter, topo.domain, topo.servers
        for node, endpoint in sorted(servers.items()):
            # Consul cannot route <node>.server.<dc> for a node whose name is not one DNS
            # label either; that server still serves server.<dc> below.
            name = self.name(f"server node {node!r}", server_sni, local_dc, domain, node)
            if name is not None:
                self.add(RouteKind.LOCAL_SERVER, local_dc, name, (endpoint,))
        if not servers:
            self.notes.append("no local servers known: local server names are refused")
            return
        name = self.name("local servers", server_sni, local_dc, domain)
        if name is not None:
            every = tuple(servers[node] for node in sorted(servers))
            self.add(RouteKind.ANY_LOCAL_SERVER, local_dc, name, every)

    def remote_gateways(self) -> None:
        topo = self.topology
        td = topo.trust_domain
        for key, endpoints in sorted(topo.gateways.items()):
            dc = key.datacenter
            what = f"gateways of {dc} partition {key.partition}"
            if topo.expose_servers and key.partition == DEFAULT_PARTITION:
                name = self.name(what, server_sni, dc, topo.domain)
                if name is not None:
                    self.add(RouteKind.REMOTE_SERVER, dc, name, endpoints, wildcard=True)
            if td is not None:
                name = self.name(what, gateway_sni, dc, td, key.partition)
                if name is not None:
                    self.add(RouteKind.REMOTE_DATACENTER, dc, name, endpoints, wildcard=True)

    def local_services(self) -> None:
        topo = self.topology
        td = topo.trust_domain
        if td is None:
            self.notes.append("trust domain unknown: mesh (internal) names are refused")
            return
        for svc, endpoints in sorted(topo.services.items()):
            what = f"service {svc.namespace}/{svc.name}"
            name = self.name(
                what, service_sni, svc.name, svc.namespace, svc.partition, topo.datacenter, td
            )
            if name is not None:
                self.add(RouteKind.LOCAL_SERVICE, topo.datacenter, name, endpoints)
