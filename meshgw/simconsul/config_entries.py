"""Config entries: the store behind /v1/config, with helpers that write entries as a user would.

Every write is one raft write stamping ("config",): Consul's config-entry reads report the index
of the whole table, so any entry's change wakes every blocking config read (and the compiled
discovery chains, which are made of entries). `listeners` run after every change (the agent
re-merges proxy-defaults into its proxies' and gateways' Proxy.Config).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from meshgw.simconsul.config_kinds import (
    EXPORTED_SERVICES,
    MESH,
    PROXY_DEFAULTS,
    SERVICE_DEFAULTS,
    SERVICE_RESOLVER,
    decode_entry,
    render_entry,
    validate_entry,
)
from meshgw.simconsul.index import RaftIndex

KEY = ("config",)


class ConfigEntries:
    def __init__(self, raft: RaftIndex) -> None:
        self.raft = raft
        self._entries: dict[tuple[str, str], dict[str, Any]] = {}
        self.listeners: list[Callable[[], None]] = []

    # --- the store ----------------------------------------------------------------------------

    def apply(self, entry: dict[str, Any], *, cas: int | None = None) -> bool:
        """Store a decoded entry after Consul's checks (EntryError); with cas, only if the
        stored ModifyIndex is cas (0: only if absent). True when written."""
        validate_entry(entry)
        key = (entry["Kind"], entry.get("Name", ""))
        with self.raft.lock:
            current = self._entries.get(key)
            if cas is not None and (current["ModifyIndex"] if current else 0) != cas:
                return False
            stored = copy.deepcopy(entry)
            stored["ModifyIndex"] = self.raft.index + 1
            stored["CreateIndex"] = current["CreateIndex"] if current else stored["ModifyIndex"]
            self._entries[key] = stored
            self.raft.commit(KEY)
        self._changed()
        return True

    def delete(self, kind: str, name: str, *, cas: int | None = None) -> bool:
        with self.raft.lock:
            current = self._entries.get((kind, name))
            if cas is not None and (current is None or current["ModifyIndex"] != cas):
                return False
            if current is None:
                return True  # nothing to delete: the table (and its index) stays as it is
            del self._entries[(kind, name)]
            self.raft.commit(KEY)
        self._changed()
        return True

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        """The entry as /v1/config/<kind>/<name> answers it, or None."""
        with self.raft.lock:
            entry = self._entries.get((kind, name))
            return render_entry(copy.deepcopy(entry)) if entry else None

    def list(self, kind: str) -> list[dict[str, Any]]:
        with self.raft.lock:
            return [
                render_entry(copy.deepcopy(e))
                for (k, _), e in sorted(self._entries.items())
                if k == kind
            ]

    def raw(self, kind: str, name: str) -> dict[str, Any] | None:
        """The stored entry (durations in seconds), for the chain compiler and the agent."""
        with self.raft.lock:
            entry = self._entries.get((kind, name))
            return copy.deepcopy(entry) if entry else None

    def _changed(self) -> None:
        for listener in list(self.listeners):
            listener()

    # --- helpers for tests and the demo -------------------------------------------------------

    def put(self, body: Mapping[str, Any]) -> None:
        """Write an entry given as Consul's JSON (any key case), as PUT /v1/config does."""
        self.apply(decode_entry(dict(body)))

    def set_proxy_defaults(self, config: Mapping[str, Any] | None = None, **fields: Any) -> None:
        """proxy-defaults "global": `config` is its Config map (e.g. {"protocol": "http",
        "connect_timeout_ms": 2000}); `fields` are other fields in Consul's names."""
        self.put({"Kind": PROXY_DEFAULTS, "Name": "global", "Config": dict(config or {}), **fields})

    def set_service_defaults(
        self,
        name: str,
        *,
        protocol: str | None = None,
        limits: Mapping[str, int] | None = None,
        **fields: Any,
    ) -> None:
        """service-defaults for `name`; `limits` becomes UpstreamConfig.Defaults.Limits
        (MaxConnections, MaxPendingRequests, MaxConcurrentRequests)."""
        body: dict[str, Any] = {"Kind": SERVICE_DEFAULTS, "Name": name, **fields}
        if protocol is not None:
            body["Protocol"] = protocol
        if limits is not None:
            body.setdefault("UpstreamConfig", {}).setdefault("Defaults", {})["Limits"] = dict(
                limits
            )
        self.put(body)

    def set_mesh(self, *, peer_through_mesh_gateways: bool = False, **fields: Any) -> None:
        self.put(
            {
                "Kind": MESH,
                "Name": "mesh",
                "Peering": {"PeerThroughMeshGateways": peer_through_mesh_gateways},
                **fields,
            }
        )

    def set_service_resolver(self, name: str, **fields: Any) -> None:
        """service-resolver for `name`; fields in Consul's names: Subsets, DefaultSubset,
        Redirect, Failover, ConnectTimeout ("5s"), ..."""
        self.put({"Kind": SERVICE_RESOLVER, "Name": name, **fields})

    def export(
        self, service: str, *, peers: Iterable[str] = (), partitions: Iterable[str] = ()
    ) -> None:
        """Add consumers of `service` to the exported-services entry "default"."""
        with self.raft.lock:
            entry = self.raw(EXPORTED_SERVICES, "default") or {
                "Kind": EXPORTED_SERVICES,
                "Name": "default",
                "Services": [],
            }
            services = entry.setdefault("Services", [])
            found = next((s for s in services if s["Name"] == service), None)
            if found is None:
                found = {"Name": service, "Consumers": []}
                services.append(found)
            consumers = found.setdefault("Consumers", [])
            consumers += [{"Peer": p} for p in peers if {"Peer": p} not in consumers]
            consumers += [{"Partition": p} for p in partitions if {"Partition": p} not in consumers]
            self.apply({k: v for k, v in entry.items() if k not in ("CreateIndex", "ModifyIndex")})


# service-defaults fields the servers fold into a proxy's resolved Proxy.Config.
_DEFAULTS_INTO_CONFIG = {
    "Protocol": "protocol",
    "MaxInboundConnections": "max_inbound_connections",
    "LocalConnectTimeoutMs": "local_connect_timeout_ms",
    "LocalRequestTimeoutMs": "local_request_timeout_ms",
    "BalanceInboundConnections": "balance_inbound_connections",
}
_MERGED_KINDS = ("connect-proxy", "mesh-gateway", "terminating-gateway", "ingress-gateway")


def merge_central_config(service: Mapping[str, Any], config: ConfigEntries) -> dict[str, Any]:
    """A proxy's or gateway's NodeService as the agent keeps it: proxy-defaults Config and its
    service-defaults folded under its own Proxy.Config (its own keys win), and MeshGateway.Mode
    filled in when it has none (Consul's MergeServiceConfig). Other services are unchanged."""
    out = copy.deepcopy(dict(service))
    kind = out.get("Kind", "")
    if kind not in _MERGED_KINDS:
        return out
    proxy = out.setdefault("Proxy", {})
    name = proxy.get("DestinationServiceName") if kind == "connect-proxy" else out["Service"]
    defaults = config.raw(PROXY_DEFAULTS, "global") or {}
    service_defaults = config.raw(SERVICE_DEFAULTS, str(name)) or {}
    resolved = copy.deepcopy(defaults.get("Config") or {})
    for field, key in _DEFAULTS_INTO_CONFIG.items():
        if service_defaults.get(field):
            resolved[key] = service_defaults[field]
    merged = {**resolved, **(proxy.get("Config") or {})}
    if merged:
        proxy["Config"] = merged
    mode = (service_defaults.get("MeshGateway") or defaults.get("MeshGateway") or {}).get("Mode")
    if mode and not (proxy.get("MeshGateway") or {}).get("Mode"):
        proxy["MeshGateway"] = {**(proxy.get("MeshGateway") or {}), "Mode": mode}
    return out
