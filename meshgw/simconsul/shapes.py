"""Consul's JSON documents, built: nodes, services, checks and the CheckServiceNode that joins them.

Every builder returns a fresh dict with the keys Consul's encoder writes, in its order, with its
`omitempty` rules. Addresses may be IP literals or host names: the ``*_ipv4``/``*_ipv6`` tagged
addresses are only added for IP literals, as the agent does.
"""

from __future__ import annotations

import copy
import ipaddress
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from meshgw.control.catalog import WAN_FEDERATION_META

Json = Any

CONSUL_VERSION = "1.17.0"

# The registration `consul connect envoy -gateway=mesh -register -expose-servers` sends.
GATEWAY_BODY: dict[str, Any] = {
    "Kind": "mesh-gateway",
    "ID": "mesh-gateway",
    "Name": "mesh-gateway",
    "Address": "10.0.0.5",
    "Port": 8443,
    "TaggedAddresses": {
        "lan": {"Address": "10.0.0.5", "Port": 8443},
        "wan": {"Address": "203.0.113.5", "Port": 443},
    },
    "Meta": {WAN_FEDERATION_META: "1"},
    "Check": {
        "Name": "mesh-gateway listening",
        "TCP": "10.0.0.5:8443",
        "Interval": "10s",
        "DeregisterCriticalServiceAfter": "6h",
    },
}


def ip_version(address: str) -> int | None:
    """4 or 6 for an IP literal, None for a host name (or anything else)."""
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        return None


def default_tagged_addresses(
    address: str, port: int, tagged: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, dict[str, Any]]:
    """The agent's defaults: lan_ipvN/wan_ipvN from the service Address and Port (IP literals
    only), for keys not given; wan_* holds the LAN value."""
    out = {
        k: {"Address": v.get("Address", ""), "Port": v.get("Port", 0)}
        for k, v in (tagged or {}).items()
    }
    version = ip_version(address)
    if version is not None:
        for key in (f"lan_ipv{version}", f"wan_ipv{version}"):
            out.setdefault(key, {"Address": address, "Port": port})
    return out


def node_json(
    node: str,
    address: str,
    dc: str,
    *,
    node_id: str | None = None,
    wan_address: str | None = None,
    meta: Mapping[str, str] | None = None,
    index: int = 1,
) -> dict[str, Json]:
    """A catalog Node: ID, Node, Address, Datacenter, TaggedAddresses{lan,wan,...}, Meta."""
    wan = wan_address or address
    tagged = {"lan": address, "wan": wan}
    version = ip_version(address)
    if version is not None:
        tagged[f"lan_ipv{version}"] = address
    wan_version = ip_version(wan)
    if wan_version is not None:
        tagged[f"wan_ipv{wan_version}"] = wan
    return {
        "ID": node_id or str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node}.{dc}")),
        "Node": node,
        "Address": address,
        "Datacenter": dc,
        "TaggedAddresses": tagged,
        # Consul always puts its own segment key in node meta: a reserved consul- key readers see.
        "Meta": {"consul-network-segment": "", **(meta or {})},
        "CreateIndex": index,
        "ModifyIndex": index,
    }


def _proxy_json(kind: str, proxy: Mapping[str, Any] | None) -> dict[str, Json]:
    out: dict[str, Json] = {"Mode": "", "MeshGateway": {}, "Expose": {}}
    for key, value in (proxy or {}).items():
        out[key] = copy.deepcopy(value)
    if kind == "connect-proxy":
        out.setdefault("DestinationServiceName", "")
    return out


def service_json(
    service: str,
    port: int,
    *,
    service_id: str | None = None,
    kind: str = "",
    address: str = "",
    tags: Iterable[str] = (),
    meta: Mapping[str, str] | None = None,
    tagged_addresses: Mapping[str, Mapping[str, Any]] | None = None,
    weights: Mapping[str, int] | None = None,
    proxy: Mapping[str, Any] | None = None,
    connect: Mapping[str, Any] | None = None,
    enable_tag_override: bool = False,
    peer_name: str = "",
    index: int = 1,
) -> dict[str, Json]:
    """A NodeService as health endpoints and federation states show it."""
    out: dict[str, Json] = {}
    if kind:  # NodeService.Kind is omitempty
        out["Kind"] = kind
    out |= {
        "ID": service_id or service,
        "Service": service,
        "Tags": list(tags),
        "Address": address,
    }
    if tagged_addresses:  # omitempty
        out["TaggedAddresses"] = {
            k: {"Address": v["Address"], "Port": v["Port"]} for k, v in tagged_addresses.items()
        }
    out |= {
        "Meta": dict(meta or {}),
        "Port": port,
        "Weights": dict(weights or {"Passing": 1, "Warning": 1}),
        "EnableTagOverride": enable_tag_override,
        "Proxy": _proxy_json(kind, proxy),
        "Connect": copy.deepcopy(dict(connect or {})),
        "PeerName": peer_name,
        "CreateIndex": index,
        "ModifyIndex": index,
    }
    return out


def check_json(
    node: str,
    check_id: str,
    name: str,
    status: str,
    *,
    service_id: str = "",
    service_name: str = "",
    service_tags: Iterable[str] = (),
    type_: str = "",
    output: str = "",
    notes: str = "",
    interval: str = "",
    timeout: str = "",
    index: int = 1,
) -> dict[str, Json]:
    """A HealthCheck."""
    return {
        "Node": node,
        "CheckID": check_id,
        "Name": name,
        "Status": status,
        "Notes": notes,
        "Output": output,
        "ServiceID": service_id,
        "ServiceName": service_name,
        "ServiceTags": list(service_tags),
        "Type": type_,
        "Interval": interval,
        "Timeout": timeout,
        "ExposedPort": 0,
        "Definition": {},
        "CreateIndex": index,
        "ModifyIndex": index,
    }


def serf_check(node: str, status: str = "passing", index: int = 1) -> dict[str, Json]:
    output = "Agent alive and reachable" if status == "passing" else "Agent not live or unreachable"
    return check_json(node, "serfHealth", "Serf Health Status", status, output=output, index=index)


def check_service_node(
    node: str,
    address: str,
    service: str,
    port: int,
    *,
    kind: str = "",
    service_id: str | None = None,
    service_address: str | None = None,
    meta: Mapping[str, str] | None = None,
    tags: Iterable[str] = (),
    tagged_addresses: Mapping[str, Mapping[str, Any]] | None = None,
    wan: tuple[str, int] | None = None,
    weights: Mapping[str, int] | None = None,
    proxy: Mapping[str, Any] | None = None,
    connect: Mapping[str, Any] | None = None,
    status: str | None = "passing",
    node_status: str = "passing",
    checks: list[dict[str, Json]] | None = None,
    node_meta: Mapping[str, str] | None = None,
    node_wan_address: str | None = None,
    dc: str = "dc1",
    index: int = 1,
) -> dict[str, Json]:
    """One CheckServiceNode ``{"Node", "Service", "Checks"}`` as health endpoints return it.

    ``service_address`` defaults to the node ``address``; pass ``""`` for services registered
    without an Address (the ``consul`` service). ``wan=(host, port)`` adds the ``wan`` tagged
    address (``-wan-address``); ``lan``/``*_ipv4`` defaults are added as the agent does.
    ``status`` is the service check's status (None: no service check, like ``consul``);
    ``checks`` replaces the generated checks entirely.
    """
    sid = service_id or service
    svc_addr = address if service_address is None else service_address
    tagged: dict[str, Mapping[str, Any]] = dict(tagged_addresses or {})
    if wan is not None:
        tagged["wan"] = {"Address": wan[0], "Port": wan[1]}
    if svc_addr and kind:
        tagged.setdefault("lan", {"Address": svc_addr, "Port": port})
    if svc_addr:
        tagged = dict(default_tagged_addresses(svc_addr, port, tagged))
    svc = service_json(
        service,
        port,
        service_id=sid,
        kind=kind,
        address=svc_addr,
        tags=tags,
        meta=meta,
        tagged_addresses=tagged,
        weights=weights,
        proxy=proxy,
        connect=connect,
        index=index,
    )
    if checks is None:
        checks = [serf_check(node, node_status, index)]
        if status is not None:
            target = f"{svc_addr or address}:{port}"
            checks.append(
                check_json(
                    node,
                    f"service:{sid}",
                    f"{kind} listening" if kind else f"Service '{service}' check",
                    status,
                    service_id=sid,
                    service_name=service,
                    service_tags=tags,
                    type_="tcp",
                    output=f"TCP connect {target}: Success" if status == "passing" else "",
                    interval="10s",
                    index=index,
                )
            )
    return {
        "Node": node_json(
            node, address, dc, meta=node_meta, wan_address=node_wan_address, index=index
        ),
        "Service": svc,
        "Checks": checks,
    }


def mesh_gateway_node(
    node: str,
    address: str,
    port: int = 8443,
    *,
    dc: str,
    wan: tuple[str, int] | None = None,
    service_id: str = "mesh-gateway",
    name: str = "mesh-gateway",
    wanfed: bool = True,
    status: str = "passing",
    meta: Mapping[str, str] | None = None,
    weights: Mapping[str, int] | None = None,
    index: int = 1,
) -> dict[str, Json]:
    """A mesh gateway as `consul connect envoy -gateway=mesh -register -expose-servers` makes."""
    full_meta = {WAN_FEDERATION_META: "1"} if wanfed else {}
    full_meta |= dict(meta or {})
    return check_service_node(
        node,
        address,
        name,
        port,
        kind="mesh-gateway",
        service_id=service_id,
        meta=full_meta,
        wan=wan,
        weights=weights,
        status=status,
        dc=dc,
        index=index,
    )


def flat_service_node(csn: Mapping[str, Any]) -> dict[str, Json]:
    """The flat ServiceNode that /v1/catalog/service/<name> answers (and its filters see)."""
    node, svc = csn["Node"], csn["Service"]
    out: dict[str, Json] = {
        "ID": node["ID"],
        "Node": node["Node"],
        "Address": node["Address"],
        "Datacenter": node["Datacenter"],
        "TaggedAddresses": node["TaggedAddresses"],
        "NodeMeta": node["Meta"],
        "ServiceKind": svc.get("Kind", ""),
        "ServiceID": svc["ID"],
        "ServiceName": svc["Service"],
        "ServiceTags": svc["Tags"],
        "ServiceAddress": svc["Address"],
    }
    if svc.get("TaggedAddresses"):
        out["ServiceTaggedAddresses"] = svc["TaggedAddresses"]
    out |= {
        "ServiceWeights": svc["Weights"],
        "ServiceMeta": svc["Meta"],
        "ServicePort": svc["Port"],
        "ServiceEnableTagOverride": svc["EnableTagOverride"],
        "ServiceProxy": svc["Proxy"],
        "ServiceConnect": svc["Connect"],
        "ServicePeerName": svc.get("PeerName", ""),
        "CreateIndex": svc["CreateIndex"],
        "ModifyIndex": svc["ModifyIndex"],
    }
    return out


def same_except_indexes(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    skip = ("CreateIndex", "ModifyIndex")
    return {k: v for k, v in a.items() if k not in skip} == {
        k: v for k, v in b.items() if k not in skip
    }


def same_checks(a: Mapping[str, Mapping[str, Any]], b: Mapping[str, Mapping[str, Any]]) -> bool:
    def strip(checks: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        skip = ("CreateIndex", "ModifyIndex", "Node")
        return {cid: {k: v for k, v in c.items() if k not in skip} for cid, c in checks.items()}

    return strip(a) == strip(b)
