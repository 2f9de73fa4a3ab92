"""What a gateway learned from its agent (its /v1/topology), as static settings that make the
same routes, for `meshgw routes --config FILE --sni NAME` to explain by hand. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _pairs(routes: Mapping[str, Any]) -> list[str]:
    return [f"{name}={address}" for name, route in routes.items() for address in route["endpoints"]]


def settings_from_topology(topology: Mapping[str, Any]) -> dict[str, object]:
    """Settings (TOML keys) that make the routes `topology` (a /v1/topology document) makes."""
    settings: dict[str, object] = {
        "dc": topology["datacenter"],
        "domain": topology["domain"],
    }
    if topology.get("trust_domain"):
        settings["trust_domain"] = topology["trust_domain"]
    servers = topology.get("servers") or {}
    if servers:
        settings["expose_servers"] = True
        settings["server"] = [f"{node}={address}" for node, address in servers.items()]
    gateways = [
        f"{key}={address}"
        for key, addresses in (topology.get("gateways") or {}).items()
        for address in addresses
    ]
    if gateways:
        settings["gateway"] = gateways
    peering = topology.get("peering") or {}
    services: list[str] = []
    exports: list[str] = []
    for sni, route in (peering.get("exports") or {}).items():
        service = sni.split(".", 1)[0]
        exports.append(f"{service}={route['peer']}")
        services += [f"{service}={address}" for address in route["endpoints"]]
    for sni in peering.get("exports_l7") or []:
        labels = sni.split(".")
        # <svc>.<ns>.<ap>.<peer>.external.<td>; any L7 protocol is refused alike.
        exports.append(f"{labels[0]}={labels[3]}/http")
    optional: dict[str, list[str]] = {
        "service": sorted(set(services)),
        "peering_server": list(peering.get("local_servers") or []),
        "peer_server": _pairs(peering.get("remote_servers") or {}),
        "peer_export": exports,
        "peer_import": _pairs(peering.get("imports") or {}),
    }
    settings |= {key: value for key, value in optional.items() if value}
    return settings
