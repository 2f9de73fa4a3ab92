"""The route table: SNI name → cluster of endpoints, as Consul's mesh gateway routes.

`RouteTable.build(topology)` turns a Topology into an immutable table; `table.resolve(sni)` gives
the Route or None. Matching follows Envoy's rule as Consul configures it
(docs/consul.md#matching-rule): an exact name first, then the longest wildcard suffix (a wildcard
matches one or more labels); anything else is refused. meshgw never resolves a name it was not told
about: it is not an open proxy.

Within a cluster, endpoints are chosen as Consul's Envoy chooses them
(docs/consul.md#health-and-weights): healthy ones by weight (smooth weighted round robin, plain
round robin when weights are equal), unhealthy ones only when no healthy one is left. Endpoints
the data plane saw failing (passive health) are tried after the others of their kind.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from meshgw.addresses import hostport
from meshgw.topology import (
    DEFAULT_PARTITION,
    ClusterSettings,
    Endpoint,
    Endpoints,
    GatewayKey,
    ServiceKey,
    Topology,
)
from meshgw.wire.names import (
    GatewayName,
    PeeredServiceName,
    PeeringServerName,
    ServerName,
    ServiceName,
    gateway_sni,
    parse_sni,
    peering_server_sni,
    server_sni,
    service_sni,
)


class RouteKind(enum.Enum):
    """What a route reaches; the values are Prometheus label values."""

    LOCAL_SERVER = "local_server"  # <node>.server.<localdc>.<domain>
    ANY_LOCAL_SERVER = "any_local_server"  # server.<localdc>.<domain>
    REMOTE_SERVER = "remote_server"  # server.<dc>.<domain>, *.server.<dc>.<domain>
    REMOTE_DATACENTER = "remote_datacenter"  # *.<dc>.internal.<td>, partition forms
    LOCAL_SERVICE = "local_service"  # [<subset>.]<svc>.<ns>.<localdc>.internal.<td>
    LOCAL_PEERING_SERVER = "local_peering_server"  # server.<localdc>.peering.<td>
    REMOTE_PEERING_SERVER = "remote_peering_server"  # a peering's PeerServerName
    PEERED_EXPORT = "peered_export"  # <svc>.<ns>.<ap>.<peer>.external.<localtd>
    PEERED_IMPORT = "peered_import"  # an imported instance's PeerMeta.SNI


# Kinds whose upstream is in another datacenter or cluster: the TCP keepalive settings for
# remote clusters apply to them (Consul's `envoy_gateway_remote_tcp_*`).
REMOTE_KINDS = frozenset(
    {
        RouteKind.REMOTE_SERVER,
        RouteKind.REMOTE_DATACENTER,
        RouteKind.REMOTE_PEERING_SERVER,
        RouteKind.PEERED_IMPORT,
    }
)


@dataclass(frozen=True, slots=True)
class Target:
    """An endpoint with its socket address worked out once, at build time, not per connection.

    A host name is expanded into one target per address the resolver found; one it has not
    resolved yet keeps `sockaddr` None and is resolved when a connection needs it.
    """

    endpoint: Endpoint
    family: int
    # (host, port) for IPv4, (host, port, 0, 0) for IPv6; None for a name not yet resolved.
    sockaddr: tuple | None
    address: str  # host:port as connected to, for logs and passive health

    @classmethod
    def of(cls, endpoint: Endpoint, ip: str | None = None) -> Target:
        try:
            parsed = ipaddress.ip_address(ip or endpoint.host)
        except ValueError:
            return cls(endpoint, socket.AF_UNSPEC, None, str(endpoint))
        host, port = str(parsed), endpoint.port
        if parsed.version == 6:
            return cls(endpoint, socket.AF_INET6, (host, port, 0, 0), hostport(host, port))
        return cls(endpoint, socket.AF_INET, (host, port), hostport(host, port))


@dataclass(slots=True)
class Cluster:
    """A named set of targets and how to reach them; only the balancer's state changes after
    build."""

    name: str
    targets: tuple[Target, ...]
    settings: ClusterSettings = ClusterSettings()
    remote: bool = False  # the TCP keepalive for remote clusters applies
    _current: list[int] = field(init=False, repr=False)  # smooth WRR: each target's credit

    def __post_init__(self) -> None:
        self._current = [0] * len(self.targets)

    def attempt_order(self, down: Callable[[Target], bool] | None = None) -> list[Target]:
        """Targets to try in order: the next pick by weight, then the others to fail over to.

        Healthy targets come first, then unhealthy ones (Consul marks them UNHEALTHY for Envoy,
        which uses them only when nothing else is left); within each, targets `down` says
        failed recently come last.
        """
        targets = self.targets
        if not targets:
            return []
        first = self._pick(down)

        def rank(target: Target) -> tuple[bool, bool]:
            return not target.endpoint.healthy, down is not None and down(target)

        # The pick first, then the rest in table order from just after it: a rotation, so
        # that failovers spread as picks do. The sort is stable.
        return sorted([*targets[first:], *targets[:first]], key=rank)

    def _pick(self, down: Callable[[Target], bool] | None) -> int:
        """Smooth weighted round robin (as nginx) over the best group of targets: healthy and
        up, else healthy, else up, else all. Equal weights make it plain round robin."""
        targets, current = self.targets, self._current
        candidates = _best_group(targets, down)
        total, best = 0, -1
        for i in candidates:
            weight = targets[i].endpoint.weight
            current[i] += weight
            total += weight
            if best < 0 or current[i] > current[best]:
                best = i
        current[best] -= total
        return best


def _best_group(targets: tuple[Target, ...], down: Callable[[Target], bool] | None) -> list[int]:
    def group(healthy: bool | None, up: bool | None) -> list[int]:
        return [
            i
            for i, t in enumerate(targets)
            if (healthy is None or t.endpoint.healthy == healthy)
            and (up is None or down is None or (not down(t)) == up)
        ]

    for healthy, up in ((True, True), (True, None), (None, True)):
        found = group(healthy, up)
        if found:
            return found
    return list(range(len(targets)))


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    # The other side: the datacenter reached, or the peer for peering kinds.
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


# Why a known name is refused on purpose (a rejection reason, a Prometheus label value).
PEERED_L7 = "peered_l7"


@dataclass(frozen=True, slots=True)
class RouteTable:
    topology: Topology
    exact: dict[str, Route]
    # Keyed by the suffix after "*." (e.g. "server.dc2.consul").
    wildcard: dict[str, Route]
    notes: tuple[str, ...] = ()
    skipped: tuple[SkippedRoute, ...] = ()
    # Exact names refused on purpose, with the rejection reason (e.g. L7 peered exports).
    refused: dict[str, str] = field(default_factory=dict)

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
        builder.peering()
        return cls(
            topology,
            builder.exact,
            builder.wildcard,
            tuple(builder.notes),
            tuple(builder.skipped),
            builder.refused,
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

    def routes(self) -> list[Route]:
        return [*self.exact.values(), *self.wildcard.values()]

    def explain(self, sni: str, down: Callable[[Target], bool] | None = None) -> str:
        """One sentence saying which route a name takes and why, or why it is refused."""
        route = self.resolve(sni)
        if route is None:
            return f"{sni}: refused: {self._refusal(sni)}"
        how = "exact name" if route.pattern == sni else f"wildcard {route.pattern}"
        side = "peer" if route.kind in _PEER_KINDS else "dc"
        targets = ", ".join(describe(t, down) for t in route.cluster.targets) or "no endpoints"
        limits = _describe_settings(route.cluster.settings)
        kind = route.kind.value
        return f"{sni}: {kind} ({side} {route.datacenter}) by {how}{limits} -> {targets}"

    def _refusal(self, sni: str) -> str:
        reason = self.refused.get(sni)
        if reason == PEERED_L7:
            return (
                f"{PEERED_L7}: an HTTP, HTTP/2 or gRPC service exported to a peer; Consul's "
                "gateway terminates TLS for it, which a gateway that never terminates TLS cannot"
            )
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
                return "no such local mesh service (or subset)"
            key = GatewayKey(parsed.datacenter, parsed.partition)
            return f"no mesh gateways known for {key.datacenter} partition {key.partition}"
        if isinstance(parsed, PeeringServerName):
            return "peering servers are routed only when the mesh config entry lets peers through"
        if isinstance(parsed, PeeredServiceName):
            return f"no service exported to peer {parsed.peer!r} and no import known by that name"
        return f"{type(parsed).__name__} names are not routed by meshgw"

    def to_json(self, down: Callable[[Target], bool] | None = None) -> dict:
        def endpoints(route: Route) -> list[dict]:
            return [
                {
                    "address": t.address,
                    "endpoint": str(t.endpoint),
                    "healthy": t.endpoint.healthy,
                    "weight": t.endpoint.weight,
                    "down": bool(down and down(t)),
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
                "connect_timeout": r.cluster.settings.connect_timeout,
                "max_connections": r.cluster.settings.max_connections,
                "endpoints": endpoints(r),
            }
            for r in self.routes()
        ]
        return {
            "datacenter": self.topology.datacenter,
            "domain": self.topology.domain,
            "trust_domain": self.topology.trust_domain,
            "expose_servers": self.topology.expose_servers,
            "routes": routes,
            "refused": dict(self.refused),
            "notes": list(self.notes),
            "skipped": [str(s) for s in self.skipped],
        }


_PEER_KINDS = frozenset(
    {RouteKind.REMOTE_PEERING_SERVER, RouteKind.PEERED_EXPORT, RouteKind.PEERED_IMPORT}
)


def describe(target: Target, down: Callable[[Target], bool] | None = None) -> str:
    """A target for people: its address, the name it came from, weight and health."""
    text = target.address
    if target.address != str(target.endpoint):
        text += f" ({target.endpoint.host})"
    marks = []
    if target.endpoint.weight != 1:
        marks.append(f"weight {target.endpoint.weight}")
    if not target.endpoint.healthy:
        marks.append("unhealthy")
    if down is not None and down(target):
        marks.append("down")
    if target.sockaddr is None:
        marks.append("not resolved yet")
    return text + (f" [{', '.join(marks)}]" if marks else "")


def _describe_settings(settings: ClusterSettings) -> str:
    parts = []
    if settings.connect_timeout is not None:
        parts.append(f"connect timeout {settings.connect_timeout:g}s")
    if settings.max_connections is not None:
        parts.append(f"at most {settings.max_connections} connections")
    return f" ({', '.join(parts)})" if parts else ""


class _Builder:
    """Fills a table's dicts, one family of routes at a time (see RouteTable.build)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.exact: dict[str, Route] = {}
        self.wildcard: dict[str, Route] = {}
        self.refused: dict[str, str] = {}
        self.notes: list[str] = []
        self.skipped: list[SkippedRoute] = []

    def add(
        self,
        kind: RouteKind,
        dc: str,
        name: str,
        endpoints: Endpoints,
        *,
        wildcard: bool = False,
        settings: ClusterSettings | None = None,
    ) -> None:
        remote = kind in REMOTE_KINDS
        merged = _over(self.topology.cluster_defaults, settings)
        if not remote and merged.keepalive is not None:  # Consul: remote clusters only
            merged = dataclasses.replace(merged, keepalive=None)
        cluster = Cluster(name, tuple(self.targets(endpoints)), merged, remote=remote)
        self.exact[name] = Route(kind, dc, cluster, name)
        if wildcard:
            self.wildcard[name] = Route(kind, dc, cluster, f"*.{name}")

    def targets(self, endpoints: Iterable[Endpoint]) -> Iterable[Target]:
        """Each endpoint's targets: an IP as is, a host name as every address it resolves to
        (all of them, IPv4 and IPv6), or unresolved until the resolver has answered."""
        addresses = self.topology.addresses
        for endpoint in endpoints:
            resolved = addresses.get(endpoint.host)
            if resolved:
                yield from (Target.of(endpoint, ip) for ip in resolved)
            else:
                yield Target.of(endpoint)

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
        for svc, endpoints in sorted(topo.services.items(), key=lambda item: _sort_key(item[0])):
            subset = f" subset {svc.subset}" if svc.subset else ""
            what = f"service {svc.namespace}/{svc.name}{subset}"
            name = self.name(
                what, service_sni, svc.name, svc.namespace, svc.partition, topo.datacenter, td,
                svc.subset,
            )  # fmt: skip
            if name is not None:
                # A resolver's settings (ConnectTimeout) hold for the service and its subsets.
                settings = topo.service_settings.get(_base(svc))
                self.add(
                    RouteKind.LOCAL_SERVICE, topo.datacenter, name, endpoints, settings=settings
                )

    def peering(self) -> None:
        topo = self.topology
        peering, td, local_dc = topo.peering, topo.trust_domain, topo.datacenter
        if peering.local_servers and td is not None:
            name = self.name("peering servers", peering_server_sni, local_dc, td)
            if name is not None:
                self.add(RouteKind.LOCAL_PEERING_SERVER, local_dc, name, peering.local_servers)
        for kind, routes in (
            (RouteKind.REMOTE_PEERING_SERVER, peering.remote_servers),
            (RouteKind.PEERED_EXPORT, peering.exports),
            (RouteKind.PEERED_IMPORT, peering.imports),
        ):
            for sni, route in sorted(routes.items()):
                self.add(kind, route.peer, sni, route.endpoints)
        for sni in peering.exports_l7:
            self.refused[sni] = PEERED_L7


def _over(defaults: ClusterSettings, specific: ClusterSettings | None) -> ClusterSettings:
    """`specific` where it says something, else the gateway-wide defaults."""
    if specific is None:
        return defaults
    return ClusterSettings(
        *(
            getattr(defaults, f.name)
            if getattr(specific, f.name) is None
            else getattr(specific, f.name)
            for f in dataclasses.fields(ClusterSettings)
        )
    )


def _base(key: ServiceKey) -> ServiceKey:
    return ServiceKey(key.name, key.namespace, key.partition)


def _sort_key(key: ServiceKey) -> tuple[str, ...]:
    return (key.partition, key.namespace, key.name, key.subset or "")
