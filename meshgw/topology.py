"""Everything meshgw knows about the federation, as plain immutable data.

Sources (static settings, Consul discovery, the `primary_gateways` bootstrap) each produce a
`TopologyPart`; `merge` folds them into one `Topology` in a single place, so precedence is decided
once: a part given later wins over an earlier one for the same key (static settings come last).
Nothing here knows about sockets or Consul.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshgw.addresses import hostport

DEFAULT_PARTITION = "default"
DEFAULT_NAMESPACE = "default"


class Source(enum.Enum):
    STATIC = "static"
    CONSUL = "consul"
    PRIMARY_GATEWAYS = "primary-gateways"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One place meshgw may connect to: a host (IP literal or DNS name) and a port."""

    host: str
    port: int
    healthy: bool = True
    # Consul's Service.Weights, clamped to 1..128 as Consul does for Envoy.
    weight: int = 1
    # Where this endpoint came from, for /v1/routes and the access log.
    source: Source = Source.STATIC

    def __str__(self) -> str:
        return hostport(self.host, self.port)


@dataclass(frozen=True, slots=True, order=True)
class GatewayKey:
    """The datacenter (and admin partition) a set of remote mesh gateways serves."""

    datacenter: str
    partition: str = DEFAULT_PARTITION


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
    """A local mesh service, as named in `<svc>.<ns>.<dc>.internal.<td>`."""

    name: str
    namespace: str = DEFAULT_NAMESPACE
    partition: str = DEFAULT_PARTITION


def _frozen(mapping: Mapping | None = None) -> Mapping:
    # A private copy typed read-only. Not a MappingProxyType: topologies are pickled to workers.
    return dict(mapping or {})


@dataclass(frozen=True, slots=True)
class TopologyPart:
    """What one source knows. Fields left as None say nothing (they do not erase)."""

    source: Source
    datacenter: str | None = None
    domain: str | None = None
    trust_domain: str | None = None
    primary_datacenter: str | None = None
    servers: Mapping[str, Endpoint] = field(default_factory=_frozen)
    gateways: Mapping[GatewayKey, tuple[Endpoint, ...]] = field(default_factory=_frozen)
    services: Mapping[ServiceKey, tuple[Endpoint, ...]] = field(default_factory=_frozen)


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
    gateways: Mapping[GatewayKey, tuple[Endpoint, ...]] = field(default_factory=_frozen)
    # Local mesh service instances, at their LAN addresses.
    services: Mapping[ServiceKey, tuple[Endpoint, ...]] = field(default_factory=_frozen)

    def to_json(self) -> dict[str, Any]:
        return {
            "datacenter": self.datacenter,
            "domain": self.domain,
            "trust_domain": self.trust_domain,
            "primary_datacenter": self.primary_datacenter,
            "servers": {node: str(e) for node, e in self.servers.items()},
            "gateways": {
                f"{k.datacenter}/{k.partition}": [str(e) for e in v]
                for k, v in self.gateways.items()
            },
            "services": {
                f"{k.namespace}/{k.name}": [str(e) for e in v] for k, v in self.services.items()
            },
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
    dc, dom, td, primary = None, None, None, None
    servers: dict[str, Endpoint] = {}
    gateways: dict[GatewayKey, tuple[Endpoint, ...]] = {}
    services: dict[ServiceKey, tuple[Endpoint, ...]] = {}
    for part in parts:
        dc = part.datacenter or dc
        dom = part.domain or dom
        td = part.trust_domain or td
        primary = part.primary_datacenter or primary
        servers.update(part.servers)
        gateways.update((k, v) for k, v in part.gateways.items() if v)
        services.update((k, v) for k, v in part.services.items() if v)
    dc = datacenter or dc
    if not dc:
        raise ValueError("the local datacenter is unknown: set --dc (or reach a Consul agent)")
    gateways.pop(GatewayKey(dc), None)
    return Topology(
        datacenter=dc,
        domain=(domain or dom or "consul").rstrip("."),
        trust_domain=td,
        primary_datacenter=primary,
        expose_servers=expose_servers,
        servers=_frozen(servers),
        gateways=_frozen(gateways),
        services=_frozen(services),
    )


class Sources:
    """What each source said last, and the Topology they make together.

    Precedence, lowest first: the primary_gateways bootstrap (discovered gateways replace it
    once they exist, and it comes back if they vanish), Consul discovery, then the static
    settings, which the operator wrote and which win over both.
    """

    PRECEDENCE = (Source.PRIMARY_GATEWAYS, Source.CONSUL, Source.STATIC)

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
