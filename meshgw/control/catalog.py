"""Consul's JSON → topology values. Pure: documents in, endpoints out, nothing else.

The address rules are Consul's own (docs/consul.md#address-choice): a local server is reached at its
`BestAddress(false)` (service Address, else node Address) on the `consul` service port; a remote
gateway at its `BestAddress(true)` (service `wan` tagged address, else service Address, else node
`wan` tagged address, else node Address). Whatever does not fit those shapes is skipped and
reported, never raised: Consul answering nonsense must not take the gateway down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshgw.topology import DEFAULT_NAMESPACE, Endpoint, GatewayKey, ServiceKey, Source

# The Meta key (value "1") that marks a mesh gateway as serving WAN federation; meshgw spells it
# only here.
WAN_FEDERATION_META = "consul-wan-federation"


class CatalogError(ValueError):
    """A Consul answer that does not have the documented shape at all."""


@dataclass
class Parsed:
    """Endpoints read from one answer, plus what had to be skipped and why."""

    endpoints: dict[Any, tuple[Endpoint, ...]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    max_modify_index: dict[Any, int] = field(default_factory=dict)


def _obj(value: Any) -> Mapping[str, Any]:
    """A JSON object, or an empty one for anything else (null, a string, a list)."""
    return value if isinstance(value, Mapping) else {}


def _healthy(entry: Mapping[str, Any]) -> bool:
    checks = entry.get("Checks") or []
    return not any(isinstance(c, Mapping) and c.get("Status") == "critical" for c in checks)


def _weight(service: Mapping[str, Any], healthy: bool) -> int:
    weights = _obj(service.get("Weights"))
    raw = weights.get("Passing", 1) if healthy else weights.get("Warning", 1)
    try:
        return min(max(int(raw), 1), 128)
    except (TypeError, ValueError):
        return 1


def _port(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return value
    return None


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def lan_address(entry: Mapping[str, Any]) -> tuple[str, int] | None:
    """BestAddress(false): the service Address, else the node Address; the service Port."""
    node, service = _obj(entry.get("Node")), _obj(entry.get("Service"))
    host = _str(service.get("Address")) or _str(node.get("Address"))
    port = _port(service.get("Port"))
    return (host, port) if host and port else None


def wan_address(entry: Mapping[str, Any]) -> tuple[str, int] | None:
    """BestAddress(true), as the gateway locator and Envoy's remote clusters use it."""
    node, service = _obj(entry.get("Node")), _obj(entry.get("Service"))
    port = _port(service.get("Port"))
    tagged = _obj(service.get("TaggedAddresses"))
    wan = tagged.get("wan") if isinstance(tagged, Mapping) else None
    if isinstance(wan, Mapping) and _str(wan.get("Address")):
        wan_port = _port(wan.get("Port")) or port
        return (wan["Address"], wan_port) if wan_port else None
    if not port:
        return None
    if _str(service.get("Address")):
        return service["Address"], port
    node_tagged = _obj(node.get("TaggedAddresses"))
    if isinstance(node_tagged, Mapping) and _str(node_tagged.get("wan")):
        return node_tagged["wan"], port
    host = _str(node.get("Address"))
    return (host, port) if host else None


def _entries(document: Any, what: str) -> list[Mapping[str, Any]]:
    if not isinstance(document, list):
        raise CatalogError(f"{what}: expected a JSON array, got {type(document).__name__}")
    return [e for e in document if isinstance(e, Mapping)]


def local_servers(document: Any) -> Parsed:
    """`GET /v1/health/service/consul` → node name → server RPC endpoint."""
    parsed = Parsed()
    for entry in _entries(document, "/v1/health/service/consul"):
        node = _str(_obj(entry.get("Node")).get("Node"))
        address = lan_address(entry)
        if not node or address is None:
            parsed.skipped.append(f"server entry without node name or address: {node or '?'}")
            continue
        healthy = _healthy(entry)
        endpoint = Endpoint(*address, healthy=healthy, source=Source.CONSUL)
        parsed.endpoints[node] = (endpoint,)
    return parsed


def gateway_endpoints(
    entries: list[Mapping[str, Any]], parsed: Parsed, key: GatewayKey
) -> tuple[Endpoint, ...]:
    endpoints = []
    for entry in entries:
        service = _obj(entry.get("Service"))
        address = wan_address(entry)
        if address is None:
            parsed.skipped.append(
                f"gateway {service.get('ID', '?')} in {key.datacenter}: no address"
            )
            continue
        healthy = _healthy(entry)
        endpoints.append(
            Endpoint(
                *address, healthy=healthy, weight=_weight(service, healthy), source=Source.CONSUL
            )
        )
        index = service.get("ModifyIndex")
        if isinstance(index, int):
            parsed.max_modify_index[key] = max(parsed.max_modify_index.get(key, 0), index)
    return tuple(endpoints)


def federation_state_gateways(document: Any) -> Parsed:
    """`GET /v1/internal/federation-states/mesh-gateways` → gateways of every datacenter."""
    if not isinstance(document, Mapping):
        raise CatalogError(
            "/v1/internal/federation-states/mesh-gateways: expected a JSON object of datacenters"
        )
    parsed = Parsed()
    for dc, entries in document.items():
        if not isinstance(entries, list):
            parsed.skipped.append(f"datacenter {dc}: not a list of gateways")
            continue
        key = GatewayKey(str(dc))
        parsed.endpoints[key] = gateway_endpoints(_entries(entries, dc), parsed, key)
    return parsed


def datacenter_gateways(document: Any, dc: str) -> Parsed:
    """`GET /v1/health/service/<gateway>?dc=X` → that datacenter's mesh gateways."""
    parsed = Parsed()
    key = GatewayKey(dc)
    entries = [
        e
        for e in _entries(document, f"gateways of {dc}")
        if _obj(e.get("Service")).get("Kind") == "mesh-gateway"
    ]
    parsed.endpoints[key] = gateway_endpoints(entries, parsed, key)
    return parsed


def local_service_instances(document: Any, name: str) -> Parsed:
    """`GET /v1/health/connect/<svc>` → that service's local instances (LAN addresses)."""
    parsed = Parsed()
    endpoints = []
    namespace = DEFAULT_NAMESPACE
    for entry in _entries(document, f"/v1/health/connect/{name}"):
        service = _obj(entry.get("Service"))
        address = lan_address(entry)
        if address is None:
            parsed.skipped.append(f"{name} instance {service.get('ID', '?')}: no address")
            continue
        namespace = _str(service.get("Namespace")) or namespace
        healthy = _healthy(entry)
        endpoints.append(
            Endpoint(
                *address, healthy=healthy, weight=_weight(service, healthy), source=Source.CONSUL
            )
        )
    parsed.endpoints[ServiceKey(name, namespace)] = tuple(endpoints)
    return parsed


def trust_domain(document: Any) -> str | None:
    """`GET /v1/connect/ca/roots` → TrustDomain (None while Connect is not set up)."""
    if not isinstance(document, Mapping):
        raise CatalogError("/v1/connect/ca/roots: expected a JSON object")
    value = _str(document.get("TrustDomain")).strip().rstrip(".").lower()
    return value or None


@dataclass(frozen=True)
class AgentIdentity:
    datacenter: str | None
    domain: str | None
    primary_datacenter: str | None
    node: str | None


def agent_identity(document: Any) -> AgentIdentity:
    """`GET /v1/agent/self` → the agent's datacenter, DNS domain and primary datacenter."""
    if not isinstance(document, Mapping):
        raise CatalogError("/v1/agent/self: expected a JSON object")
    config = _obj(document.get("Config"))
    debug = _obj(document.get("DebugConfig"))
    domain = _str(debug.get("DNSDomain")) or _str(config.get("Domain"))
    return AgentIdentity(
        datacenter=_str(config.get("Datacenter")).lower() or None,
        domain=domain.rstrip(".").lower() or None,
        primary_datacenter=(
            _str(config.get("PrimaryDatacenter")) or _str(debug.get("PrimaryDatacenter"))
        ).lower()
        or None,
        node=_str(config.get("NodeName")) or None,
    )
