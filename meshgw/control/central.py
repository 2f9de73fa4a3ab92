"""Consul's central configuration and peering JSON → values. Pure, like catalog.py.

Config entries (service-resolver, service-defaults, mesh), the gateway's merged `Proxy.Config`,
discovery chains, exported services and peerings (docs/consul.md#subsets, #cluster-settings,
#circuit-breakers, #peering). Whatever does not fit the documented shapes is skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshgw.addresses import parse_address
from meshgw.control.catalog import CatalogError, obj, text
from meshgw.durations import parse_duration
from meshgw.topology import Endpoint, Endpoints, Source

L7_PROTOCOLS = frozenset({"http", "http2", "grpc"})
# Peerings Consul is tearing down: their names route nowhere any more.
ENDED_PEERING_STATES = frozenset({"DELETING", "TERMINATED"})


def _seconds(value: Any) -> float | None:
    """A Consul duration as the API writes it ("15s"), or nanoseconds as Go encodes
    time.Duration in some entries."""
    if isinstance(value, bool) or value in (None, "", 0):
        return None
    if isinstance(value, int | float):
        return value / 1e9 if value > 10_000 else float(value)
    try:
        return parse_duration(str(value)) or None
    except ValueError:
        return None


# --- service-resolver ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Subset:
    filter: str  # a filter expression Consul evaluates: passed through as ?filter=
    only_passing: bool


@dataclass(frozen=True)
class Resolver:
    service: str
    subsets: Mapping[str, Subset] = field(default_factory=dict)
    default_subset: str | None = None
    connect_timeout: float | None = None


def service_resolvers(document: Any) -> dict[str, Resolver]:
    """`GET /v1/config/service-resolver` → every resolver, by service name."""
    if document is None:
        return {}
    if not isinstance(document, list):
        raise CatalogError("/v1/config/service-resolver: expected a JSON array")
    resolvers = {}
    for entry in (obj(e) for e in document):
        name = text(entry.get("Name"))
        if not name:
            continue
        subsets = {
            str(subset): Subset(text(obj(spec).get("Filter")), obj(spec).get("OnlyPassing") is True)
            for subset, spec in obj(entry.get("Subsets")).items()
        }
        default = text(entry.get("DefaultSubset")) or None
        resolvers[name] = Resolver(
            name,
            subsets,
            default if default in subsets else None,
            _seconds(entry.get("ConnectTimeout")),
        )
    return resolvers


# --- this gateway's own central config ----------------------------------------------------------


@dataclass(frozen=True)
class GatewayConfig:
    """What Consul's central config says about this gateway's clusters."""

    connect_timeout: float | None = None  # Proxy.Config connect_timeout_ms
    keepalive: tuple[int, int, int] | None = None  # remote clusters: idle, interval, probes
    max_connections: int | None = None  # service-defaults UpstreamConfig.Defaults.Limits


def proxy_config(document: Any) -> GatewayConfig:
    """`GET /v1/agent/service/<id>` → the merged Proxy.Config keys a mesh gateway uses."""
    if not isinstance(document, Mapping):
        raise CatalogError("/v1/agent/service/<id>: expected a JSON object")
    config = obj(obj(document.get("Proxy")).get("Config"))
    timeout_ms = config.get("connect_timeout_ms")
    timeout = None
    if isinstance(timeout_ms, int | float) and not isinstance(timeout_ms, bool) and timeout_ms >= 1:
        timeout = timeout_ms / 1000  # below 1, Consul uses its 5 s default: so do we
    keepalive = None
    if config.get("envoy_gateway_remote_tcp_enable_keepalive") is True:
        keepalive = (
            _positive(config.get("envoy_gateway_remote_tcp_keepalive_time"), 7200),
            _positive(config.get("envoy_gateway_remote_tcp_keepalive_interval"), 75),
            _positive(config.get("envoy_gateway_remote_tcp_keepalive_probes"), 9),
        )
    return GatewayConfig(connect_timeout=timeout, keepalive=keepalive)


def _positive(value: Any, default: int) -> int:
    # Linux's own defaults stand in for keys that are missing (Envoy leaves them to the OS).
    return (
        value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default
    )


def gateway_limits(document: Any) -> int | None:
    """`GET /v1/config/service-defaults/<gateway>` → UpstreamConfig.Defaults.Limits
    .MaxConnections: Consul's circuit breaker for each of this gateway's clusters."""
    limits = obj(obj(obj(obj(document).get("UpstreamConfig")).get("Defaults")).get("Limits"))
    value = limits.get("MaxConnections")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


# --- peering -------------------------------------------------------------------------------------


def peer_through_mesh_gateways(document: Any) -> bool:
    """`GET /v1/config/mesh/mesh` → Peering.PeerThroughMeshGateways (404: no entry, off)."""
    return obj(obj(document).get("Peering")).get("PeerThroughMeshGateways") is True


@dataclass(frozen=True)
class PeeringInfo:
    name: str
    state: str
    server_name: str  # PeerServerName: the SNI this cluster's servers dial the peer with
    addresses: tuple[tuple[str, int], ...]  # where to dial it: PeerServerAddresses (or manual)
    modify_index: int
    imported: tuple[str, ...]  # services imported from it (StreamStatus.ImportedServices)


def peerings(document: Any) -> list[PeeringInfo]:
    """`GET /v1/peerings` → the peerings, as this cluster sees them."""
    if document is None:
        return []
    if not isinstance(document, list):
        raise CatalogError("/v1/peerings: expected a JSON array")
    found = []
    for entry in (obj(e) for e in document):
        name = text(entry.get("Name"))
        if not name:
            continue
        raw = entry.get("PeerServerAddresses") or entry.get("ManualServerAddresses") or []
        addresses = []
        for item in raw if isinstance(raw, list) else []:
            try:
                address = parse_address(text(item))
            except ValueError:
                continue
            addresses.append((address.host, address.port))
        imported = obj(entry.get("StreamStatus")).get("ImportedServices") or []
        index = entry.get("ModifyIndex")
        found.append(
            PeeringInfo(
                name=name,
                state=text(entry.get("State")).upper(),
                server_name=text(entry.get("PeerServerName")).lower(),
                addresses=tuple(addresses),
                modify_index=index if isinstance(index, int) else 0,
                imported=tuple(sorted({text(s) for s in imported if text(s)})),
            )
        )
    return found


def peer_servers(found: list[PeeringInfo]) -> dict[str, tuple[str, Endpoints]]:
    """Each PeerServerName this cluster dials → (the peering's name, its addresses).

    As Consul: only peerings with addresses to dial, not being torn down; for a name several
    peerings share, the one modified last.
    """
    chosen: dict[str, PeeringInfo] = {}
    for peering in found:
        if not peering.addresses or not peering.server_name:
            continue
        if peering.state in ENDED_PEERING_STATES:
            continue
        best = chosen.get(peering.server_name)
        if best is None or peering.modify_index > best.modify_index:
            chosen[peering.server_name] = peering
    return {
        name: (p.name, tuple(Endpoint(h, port, source=Source.CONSUL) for h, port in p.addresses))
        for name, p in chosen.items()
    }


@dataclass(frozen=True)
class Export:
    service: str
    namespace: str
    partition: str
    peers: tuple[str, ...]


def exported_services(document: Any) -> list[Export]:
    """`GET /v1/exported-services` → each exported service and the peers that consume it."""
    if document is None:
        return []
    if not isinstance(document, list):
        raise CatalogError("/v1/exported-services: expected a JSON array")
    found = []
    for entry in (obj(e) for e in document):
        service = text(entry.get("Service"))
        peers = obj(entry.get("Consumers")).get("Peers") or []
        names = tuple(sorted({text(p) for p in peers if text(p)}))
        if service and names:
            found.append(
                Export(
                    service,
                    text(entry.get("Namespace")) or "default",
                    text(entry.get("Partition")) or "default",
                    names,
                )
            )
    return found


@dataclass(frozen=True)
class ChainTarget:
    """Where a service's discovery chain sends its traffic first, within this datacenter."""

    protocol: str
    service: str
    subset: Subset | None
    connect_timeout: float | None


def chain_target(document: Any, datacenter: str) -> ChainTarget | None:
    """`GET /v1/discovery-chain/<svc>` → the chain's protocol and primary target, as Consul's
    gateway builds an exported service's cluster: redirects and subsets honoured, failover
    ignored, a target in another datacenter or peer not usable (None)."""
    chain = obj(obj(document).get("Chain"))
    protocol = text(chain.get("Protocol")).lower() or "tcp"
    nodes, targets = obj(chain.get("Nodes")), obj(chain.get("Targets"))
    node = obj(nodes.get(text(chain.get("StartNode"))))
    # Routers and splitters are L7; a TCP chain starts at its resolver.
    resolver = obj(node.get("Resolver"))
    target = obj(targets.get(text(resolver.get("Target"))))
    if not target:
        return None
    if text(target.get("Peer")) or (text(target.get("Datacenter")) or datacenter) != datacenter:
        return None
    subset_spec = obj(target.get("Subset"))
    subset = None
    if text(target.get("ServiceSubset")):
        subset = Subset(text(subset_spec.get("Filter")), subset_spec.get("OnlyPassing") is True)
    timeout = _seconds(target.get("ConnectTimeout")) or _seconds(resolver.get("ConnectTimeout"))
    return ChainTarget(protocol, text(target.get("Service")), subset, timeout)
