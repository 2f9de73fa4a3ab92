"""Everything meshgw knows about the federation and its peerings, as plain immutable data.

Sources (static settings, Consul discovery, the `primary_gateways` bootstrap, the resolver of
host names) each produce a `TopologyPart`; `Sources` folds them into one `Topology` in a single
place, so precedence is decided once. Nothing here knows about sockets or Consul.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from meshgw.addresses import hostport, is_ip

DEFAULT_PARTITION = "default"
DEFAULT_NAMESPACE = "default"


class Source(enum.Enum):
    STATIC = "static"
    CONSUL = "consul"
    PRIMARY_GATEWAYS = "primary-gateways"
    DNS = "dns"  # addresses of the host names the other sources gave


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One place meshgw may connect to: a host (IP literal or DNS name) and a port."""

    host: str
    port: int
    healthy: bool = True
    # Consul's effective weight: Weights.Passing, or Weights.Warning while a check warns,
    # clamped to 1..128 (docs/consul.md#health-and-weights).
    weight: int = 1
    # Where this endpoint came from, for /v1/routes and the access log.
    source: Source = Source.STATIC

    def __str__(self) -> str:
        return hostport(self.host, self.port)


Endpoints = tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True, order=True)
class GatewayKey:
    """The datacenter (and admin partition) a set of remote mesh gateways serves."""

    datacenter: str
    partition: str = DEFAULT_PARTITION


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
    """A local mesh service, or one service-resolver subset of it, as named in
    `[<subset>.]<svc>.<ns>.<dc>.internal.<td>`."""

    name: str
    namespace: str = DEFAULT_NAMESPACE
    partition: str = DEFAULT_PARTITION
    subset: str | None = None


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """How to reach one cluster's endpoints, where Consul's central config says (None: the
    gateway's own settings decide)."""

    connect_timeout: float | None = None  # seconds; a service-resolver's ConnectTimeout
    max_connections: int | None = None  # open connections at once; more are refused
    # TCP keepalive (idle seconds, interval seconds, probes) towards remote clusters only.
    keepalive: tuple[int, int, int] | None = None


@dataclass(frozen=True, slots=True)
class PeerRoute:
    """Endpoints reached for one peering; `peer` names the other cluster (a metric label)."""

    peer: str
    endpoints: Endpoints


@dataclass(frozen=True, slots=True)
class Peering:
    """What cluster peering routes through this gateway (docs/consul.md#peering).

    Names are exact SNI names. `exports` and `exports_l7` hold the names peers dial for the
    services exported to them; L7 ones are refused, since Consul's gateway terminates TLS for
    them and a splicer cannot.
    """

    # server.<localdc>.peering.<td>: the servers that are not read replicas, gRPC TLS port.
    local_servers: Endpoints = ()
    # A peering's PeerServerName → the addresses of that peer's servers (or gateways).
    remote_servers: Mapping[str, PeerRoute] = field(default_factory=dict)
    # <svc>.<ns>.<ap>.<peer>.external.<localtd> → the exported service's local instances.
    exports: Mapping[str, PeerRoute] = field(default_factory=dict)
    exports_l7: frozenset[str] = frozenset()
    # An imported instance's PeerMeta.SNI → the exporter's gateways (WAN).
    imports: Mapping[str, PeerRoute] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(
            self.local_servers
            or self.remote_servers
            or self.exports
            or self.exports_l7
            or self.imports
        )


def _frozen(mapping: Mapping | None = None) -> Mapping:
    # A private copy typed read-only. Not a MappingProxyType: topologies are pickled to workers.
    return dict(mapping or {})


@dataclass(frozen=True, slots=True)
class TopologyPart:
    """What one source knows. Fields left as None (or empty) say nothing: they do not erase."""

    source: Source
    datacenter: str | None = None
    domain: str | None = None
    trust_domain: str | None = None
    primary_datacenter: str | None = None
    servers: Mapping[str, Endpoint] = field(default_factory=_frozen)
    gateways: Mapping[GatewayKey, Endpoints] = field(default_factory=_frozen)
    services: Mapping[ServiceKey, Endpoints] = field(default_factory=_frozen)
    service_settings: Mapping[ServiceKey, ClusterSettings] = field(default_factory=_frozen)
    cluster_defaults: ClusterSettings | None = None  # the gateway's own central config
    peering: Peering | None = None
    addresses: Mapping[str, tuple[str, ...]] = field(default_factory=_frozen)  # name → IPs
    # Local services are watched only once a connection asks for one (a large catalog).
    on_demand: bool = False


@dataclass(frozen=True, slots=True)
class Topology:
    """The merged view the route table is built from."""

    datacenter: str
    domain: str = "consul"
    trust_domain: str | None = None
    primary_datacenter: str | None = None
    expose_servers: bool = False
    # Local Consul servers by node name (catalog Node.Node), at their RPC address.
    servers: Mapping[str, Endpoint] = field(default_factory=_frozen)
    # Mesh gateways of other datacenters (and partitions), at their WAN addresses.
    gateways: Mapping[GatewayKey, Endpoints] = field(default_factory=_frozen)
    # Local mesh service instances (and subsets), at their LAN addresses.
    services: Mapping[ServiceKey, Endpoints] = field(default_factory=_frozen)
    service_settings: Mapping[ServiceKey, ClusterSettings] = field(default_factory=_frozen)
    cluster_defaults: ClusterSettings = ClusterSettings()
    peering: Peering = Peering()
    # The addresses host-name endpoints resolve to, as the resolver last saw them.
    addresses: Mapping[str, tuple[str, ...]] = field(default_factory=_frozen)
    # An unknown local service name may be one nobody asked for yet: ask the control plane.
    on_demand: bool = False

    def to_json(self) -> dict[str, Any]:
        def listed(endpoints: Endpoints) -> list[str]:
            return [str(e) for e in endpoints]

        def peered(routes: Mapping[str, PeerRoute]) -> dict[str, Any]:
            return {
                k: {"peer": v.peer, "endpoints": listed(v.endpoints)} for k, v in routes.items()
            }

        peering = self.peering
        return {
            "datacenter": self.datacenter,
            "domain": self.domain,
            "trust_domain": self.trust_domain,
            "primary_datacenter": self.primary_datacenter,
            "servers": {node: str(e) for node, e in self.servers.items()},
            "gateways": {
                f"{k.datacenter}/{k.partition}": listed(v) for k, v in self.gateways.items()
            },
            "services": {
                f"{k.namespace}/{k.name}" + (f"/{k.subset}" if k.subset else ""): listed(v)
                for k, v in self.services.items()
            },
            "peering": {
                "local_servers": listed(peering.local_servers),
                "remote_servers": peered(peering.remote_servers),
                "exports": peered(peering.exports),
                "exports_l7": sorted(peering.exports_l7),
                "imports": peered(peering.imports),
            },
            "addresses": {name: list(ips) for name, ips in self.addresses.items()},
            "services_on_demand": self.on_demand,
        }


def merge(
    parts: Iterable[TopologyPart],
    *,
    datacenter: str | None = None,
    domain: str | None = None,
    expose_servers: bool = False,
) -> Topology:
    """Fold parts into one Topology; a later part wins over an earlier one, key by key.

    `datacenter`/`domain` given here (from settings) win over any part. The gateways of this
    gateway's own key (local datacenter, default partition) are dropped, as Consul skips the local
    key: a gateway never routes to its peers.
    """
    scalars: dict[str, Any] = {}
    maps: dict[str, dict[Any, Any]] = {name: {} for name in _MERGED_MAPS}
    peering: Peering | None = None
    defaults = ClusterSettings()
    on_demand = False
    for part in parts:
        on_demand = on_demand or part.on_demand
        for name in ("datacenter", "domain", "trust_domain", "primary_datacenter"):
            scalars[name] = getattr(part, name) or scalars.get(name)
        for name, merged in maps.items():
            merged.update((k, v) for k, v in getattr(part, name).items() if v)
        peering = _merge_peering(peering, part.peering)
        defaults = _merge_settings(defaults, part.cluster_defaults)
    dc = datacenter or scalars.get("datacenter")
    if not dc:
        raise ValueError("the local datacenter is unknown: set --dc (or reach a Consul agent)")
    maps["gateways"].pop(GatewayKey(dc), None)
    return Topology(
        datacenter=dc,
        domain=(domain or scalars.get("domain") or "consul").rstrip("."),
        trust_domain=scalars.get("trust_domain"),
        primary_datacenter=scalars.get("primary_datacenter"),
        expose_servers=expose_servers,
        cluster_defaults=defaults,
        peering=peering or Peering(),
        on_demand=on_demand,
        **{name: _frozen(merged) for name, merged in maps.items()},
    )


_MERGED_MAPS = ("servers", "gateways", "services", "service_settings", "addresses")


def _merge_peering(low: Peering | None, high: Peering | None) -> Peering | None:
    if high is None:
        return low
    if low is None:
        return high
    return Peering(
        local_servers=high.local_servers or low.local_servers,
        remote_servers={**low.remote_servers, **high.remote_servers},
        exports={**low.exports, **high.exports},
        exports_l7=(low.exports_l7 - set(high.exports)) | high.exports_l7,
        imports={**low.imports, **high.imports},
    )


def _merge_settings(low: ClusterSettings, high: ClusterSettings | None) -> ClusterSettings:
    if high is None:
        return low
    values = {f.name: getattr(high, f.name) for f in fields(high)}
    return ClusterSettings(
        **{name: getattr(low, name) if value is None else value for name, value in values.items()}
    )


class Sources:
    """What each source said last, and the Topology they make together.

    Precedence, lowest first: the primary_gateways bootstrap (discovered gateways replace it
    once they exist, and it comes back if they vanish), Consul discovery, then the static
    settings, which the operator wrote and which win over both. The resolver's addresses
    only add to what the others say.
    """

    PRECEDENCE = (Source.PRIMARY_GATEWAYS, Source.CONSUL, Source.STATIC, Source.DNS)

    def __init__(self, *, datacenter: str | None, domain: str | None, expose_servers: bool) -> None:
        self.parts: dict[Source, TopologyPart] = {}
        self.updated: dict[Source, float] = {}  # time.time() of each source's last part
        self.configure(datacenter=datacenter, domain=domain, expose_servers=expose_servers)

    def configure(
        self, *, datacenter: str | None, domain: str | None, expose_servers: bool
    ) -> None:
        """What the settings fix whatever the sources say (a reload may change it)."""
        self.datacenter, self.domain, self.expose_servers = datacenter, domain, expose_servers

    def update(self, part: TopologyPart) -> Topology | None:
        """Take a source's new part; the merged Topology, or None while the local datacenter
        is not known (from the settings or the Consul agent)."""
        self.parts[part.source] = part
        self.updated[part.source] = time.time()
        try:
            return merge(
                [self.parts[s] for s in self.PRECEDENCE if s in self.parts],
                datacenter=self.datacenter,
                domain=self.domain,
                expose_servers=self.expose_servers,
            )
        except ValueError:
            return None

    def ages(self) -> dict[str, float]:
        """Seconds since each source last published."""
        now = time.time()
        return {source.value: round(now - at, 3) for source, at in self.updated.items()}


def host_names(topology: Topology) -> set[str]:
    """Every endpoint host that is a DNS name, not an IP literal: what the resolver follows."""
    peering = topology.peering
    groups: list[Iterable[Endpoint]] = [
        topology.servers.values(),
        *topology.gateways.values(),
        *topology.services.values(),
        peering.local_servers,
        *(r.endpoints for r in peering.remote_servers.values()),
        *(r.endpoints for r in peering.exports.values()),
        *(r.endpoints for r in peering.imports.values()),
    ]
    return {e.host for group in groups for e in group if not is_ip(e.host)}
