"""Consul's catalog and health JSON → topology values. Pure: documents in, values out.

The rules are Consul's own (docs/consul.md#address-choice, #health-and-weights): a local server or
service is reached at `BestAddress(false)` (service Address, else node Address) on its service
port; a remote gateway or a peer's gateway at `BestAddress(true)` (the service's `wan` tagged
address, else the node's). Health and weight follow what Consul hands Envoy: a critical check
makes an endpoint unhealthy, a warning check gives it `Weights.Warning`, an effective weight below
1 makes it unhealthy too, and weights are clamped to 1..128. Whatever does not fit those shapes is
skipped and reported, never raised: Consul answering nonsense must not take the gateway down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshgw.topology import DEFAULT_NAMESPACE, Endpoint, Endpoints, GatewayKey, ServiceKey, Source

# The Meta key (value "1") that marks a mesh gateway as serving WAN federation; meshgw spells it
# only here.
WAN_FEDERATION_META = "consul-wan-federation"
MAX_WEIGHT = 128


class CatalogError(ValueError):
    """A Consul answer that does not have the documented shape at all."""


@dataclass
class Parsed:
    """Endpoints read from one answer, plus what had to be skipped and why."""

    endpoints: dict[Any, Endpoints] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    max_modify_index: dict[Any, int] = field(default_factory=dict)


def obj(value: Any) -> Mapping[str, Any]:
    """A JSON object, or an empty one for anything else (null, a string, a list)."""
    return value if isinstance(value, Mapping) else {}


def text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def port(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return value
    if isinstance(value, str) and value.isdigit():  # service Meta values are strings
        return port(int(value))
    return None


def entries(document: Any, what: str) -> list[Mapping[str, Any]]:
    if not isinstance(document, list):
        raise CatalogError(f"{what}: expected a JSON array, got {type(document).__name__}")
    return [e for e in document if isinstance(e, Mapping)]


def health_and_weight(entry: Mapping[str, Any], *, only_passing: bool = False) -> tuple[bool, int]:
    """Consul's endpoint health and weight for one health-API entry (service + checks)."""
    weights = obj(obj(entry.get("Service")).get("Weights"))
    weight = _int(weights.get("Passing"), 1) if weights else 1
    healthy = True
    for check in entry.get("Checks") or []:
        status = obj(check).get("Status")
        if status == "critical" or (only_passing and status != "passing"):
            healthy = False
        if status == "warning" and weights:
            weight = _int(weights.get("Warning"), 1)
    if weight < 1:  # a zero weight means: send it nothing
        return False, 1
    return healthy, min(weight, MAX_WEIGHT)


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def best_address(entry: Mapping[str, Any], *, wan: bool) -> tuple[str, int] | None:
    """Consul's CheckServiceNode.BestAddress: the service's address (its `wan` tagged address
    when `wan`, whose port wins when set), else the node's (its `wan` tagged address when
    `wan`, else its Address); the service's port."""
    node, service = obj(entry.get("Node")), obj(entry.get("Service"))
    host, svc_port = text(service.get("Address")), port(service.get("Port"))
    if wan and "wan" in obj(service.get("TaggedAddresses")):
        tagged = obj(obj(service.get("TaggedAddresses")).get("wan"))
        host = text(tagged.get("Address"))
        svc_port = port(tagged.get("Port")) or svc_port
    if not host:
        node_wan = text(obj(node.get("TaggedAddresses")).get("wan")) if wan else ""
        host = node_wan or text(node.get("Address"))
    return (host, svc_port) if host and svc_port else None


def lan_address(entry: Mapping[str, Any]) -> tuple[str, int] | None:
    """Where this datacenter reaches an instance: BestAddress(false)."""
    return best_address(entry, wan=False)


def wan_address(entry: Mapping[str, Any]) -> tuple[str, int] | None:
    """Where other datacenters and peers reach a gateway: BestAddress(true)."""
    return best_address(entry, wan=True)


def endpoint(entry: Mapping[str, Any], *, wan: bool, only_passing: bool = False) -> Endpoint | None:
    address = best_address(entry, wan=wan)
    if address is None:
        return None
    healthy, weight = health_and_weight(entry, only_passing=only_passing)
    return Endpoint(*address, healthy=healthy, weight=weight, source=Source.CONSUL)


def _service_id(entry: Mapping[str, Any]) -> str:
    return text(obj(entry.get("Service")).get("ID")) or "?"


# --- servers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Servers:
    """`GET /v1/health/service/consul`: every server at its RPC port, and the servers peers
    may dial (not read replicas) at their gRPC TLS port."""

    rpc: dict[str, Endpoint]
    grpc_tls: Endpoints
    skipped: list[str]


def local_servers(document: Any) -> Servers:
    rpc: dict[str, Endpoint] = {}
    grpc: list[Endpoint] = []
    skipped: list[str] = []
    for entry in entries(document, "/v1/health/service/consul"):
        node = text(obj(entry.get("Node")).get("Node"))
        found = endpoint(entry, wan=False)
        if not node or found is None:
            skipped.append(f"server entry without node name or address: {node or '?'}")
            continue
        rpc[node] = found
        meta = obj(obj(entry.get("Service")).get("Meta"))
        if meta.get("read_replica") == "true":
            continue
        grpc_port = port(meta.get("grpc_tls_port"))
        if grpc_port is None:
            skipped.append(f"server {node}: no grpc_tls_port in its Meta, so peers cannot dial it")
            continue
        grpc.append(Endpoint(found.host, grpc_port, found.healthy, found.weight, Source.CONSUL))
    return Servers(rpc, tuple(grpc), skipped)


# --- gateways ------------------------------------------------------------------------------------


def gateway_endpoints(items: list[Mapping[str, Any]], parsed: Parsed, key: GatewayKey) -> Endpoints:
    found = []
    for entry in items:
        gateway = endpoint(entry, wan=True)
        if gateway is None:
            parsed.skipped.append(f"gateway {_service_id(entry)} in {key.datacenter}: no address")
            continue
        found.append(gateway)
        index = obj(entry.get("Service")).get("ModifyIndex")
        if isinstance(index, int):
            parsed.max_modify_index[key] = max(parsed.max_modify_index.get(key, 0), index)
    return tuple(found)


def federation_state_gateways(document: Any) -> Parsed:
    """`GET /v1/internal/federation-states/mesh-gateways` → gateways of every datacenter."""
    if not isinstance(document, Mapping):
        raise CatalogError(
            "/v1/internal/federation-states/mesh-gateways: expected a JSON object of datacenters"
        )
    parsed = Parsed()
    for dc, items in document.items():
        if not isinstance(items, list):
            parsed.skipped.append(f"datacenter {dc}: not a list of gateways")
            continue
        key = GatewayKey(str(dc))
        parsed.endpoints[key] = gateway_endpoints(entries(items, dc), parsed, key)
    return parsed


def gateway_names(document: Any) -> list[str]:
    """`GET /v1/catalog/services?filter=ServiceKind == "mesh-gateway"` → their service names."""
    if not isinstance(document, Mapping):
        raise CatalogError("/v1/catalog/services: expected a JSON object")
    return sorted(str(name) for name in document)


def datacenter_gateways(documents: list[Any], dc: str) -> Parsed:
    """`GET /v1/health/service/<name>?dc=X` of every mesh-gateway name of X → its gateways."""
    parsed = Parsed()
    key = GatewayKey(dc)
    items = [
        e
        for document in documents
        for e in entries(document, f"gateways of {dc}")
        if obj(e.get("Service")).get("Kind") == "mesh-gateway"
    ]
    parsed.endpoints[key] = gateway_endpoints(items, parsed, key)
    return parsed


# --- services ------------------------------------------------------------------------------------


def service_instances(
    document: Any, name: str, *, subset: str | None = None, only_passing: bool = False
) -> Parsed:
    """`GET /v1/health/connect/<svc>[?filter=...]` → that service's (or subset's) local
    instances at their LAN addresses."""
    parsed = Parsed()
    found = []
    namespace = DEFAULT_NAMESPACE
    for entry in entries(document, f"/v1/health/connect/{name}"):
        instance = endpoint(entry, wan=False, only_passing=only_passing)
        if instance is None:
            parsed.skipped.append(f"{name} instance {_service_id(entry)}: no address")
            continue
        namespace = text(obj(entry.get("Service")).get("Namespace")) or namespace
        found.append(instance)
    parsed.endpoints[ServiceKey(name, namespace, subset=subset)] = tuple(found)
    return parsed


def imported_instances(document: Any, service: str) -> dict[str, Endpoints]:
    """`GET /v1/health/connect/<svc>?peer=<name>` → each SNI the imported instances name
    (`Service.Connect.PeerMeta.SNI`, the first one) → the exporter's gateways at their WAN
    addresses."""
    by_sni: dict[str, list[Endpoint]] = {}
    for entry in entries(document, f"/v1/health/connect/{service}?peer"):
        names = obj(obj(obj(entry.get("Service")).get("Connect")).get("PeerMeta")).get("SNI")
        sni = text(names[0]).lower() if isinstance(names, list) and names else ""
        gateway = endpoint(entry, wan=True)
        if sni and gateway is not None:
            by_sni.setdefault(sni, []).append(gateway)
    return {sni: tuple(found) for sni, found in by_sni.items()}


# --- the agent and the CA ------------------------------------------------------------------------


def trust_domain(document: Any) -> str | None:
    """`GET /v1/connect/ca/roots` → TrustDomain (None while Connect is not set up)."""
    if not isinstance(document, Mapping):
        raise CatalogError("/v1/connect/ca/roots: expected a JSON object")
    value = text(document.get("TrustDomain")).strip().rstrip(".").lower()
    return value or None


@dataclass(frozen=True)
class AgentIdentity:
    datacenter: str | None
    domain: str | None
    primary_datacenter: str | None
    node: str | None
    dual_stack: bool = False  # the agent binds IPv6: Consul's CLI checks ::1, not 127.0.0.1


def agent_identity(document: Any) -> AgentIdentity:
    """`GET /v1/agent/self` → the agent's datacenter, DNS domain and primary datacenter."""
    if not isinstance(document, Mapping):
        raise CatalogError("/v1/agent/self: expected a JSON object")
    config = obj(document.get("Config"))
    debug = obj(document.get("DebugConfig"))
    domain = text(debug.get("DNSDomain")) or text(config.get("Domain"))
    primary = text(config.get("PrimaryDatacenter")) or text(debug.get("PrimaryDatacenter"))
    return AgentIdentity(
        datacenter=text(config.get("Datacenter")).lower() or None,
        domain=domain.rstrip(".").lower() or None,
        primary_datacenter=primary.lower() or None,
        node=text(config.get("NodeName")) or None,
        dual_stack=":" in text(config.get("BindAddr")),
    )
