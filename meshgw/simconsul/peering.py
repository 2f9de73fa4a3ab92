"""Cluster peerings, and the services imported through them.

A peering this cluster dials carries PeerServerName and PeerServerAddresses (where its servers,
or its mesh gateways, are reached); one it accepted carries neither. Imported services look as
an exporting cluster replicates them: for each exported service and each of the exporter's
mesh gateways, a synthetic ``<svc>-sidecar-proxy`` at that gateway's Address, TaggedAddresses
(its ``wan``) and Port, with Connect.PeerMeta {SNI, SpiffeID, Protocol} and PeerName set, and
the gateway's checks flattened into one ``overall-check``. Only these connect imports are
modelled: ``/v1/health/service/<svc>?peer=`` answers an empty list.
"""

from __future__ import annotations

import copy
import datetime
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshgw.simconsul.config_entries import KEY as CONFIG_KEY
from meshgw.simconsul.config_entries import ConfigEntries
from meshgw.simconsul.config_kinds import EXPORTED_SERVICES
from meshgw.simconsul.index import RaftIndex
from meshgw.simconsul.shapes import Json

KEY = ("peering",)
STATES = ("PENDING", "ESTABLISHING", "ACTIVE", "FAILING", "DELETING", "TERMINATED")
_STATUS_RANK = {"maintenance": 1, "critical": 2, "warning": 3, "passing": 4}


@dataclass(slots=True)
class Peering:
    name: str
    state: str
    peer_id: str
    peer_server_name: str
    peer_server_addresses: list[str]
    remote_datacenter: str
    meta: dict[str, str]
    create_index: int
    modify_index: int
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    imports: dict[str, list[dict[str, Json]]] = field(default_factory=dict)  # service → CSNs


def peered_service_sni(service: str, peer: str, trust_domain: str) -> str:
    """connect.PeeredServiceSNI: `<svc>.<ns>.<ap>.<peer>.external.<trust domain>`."""
    return f"{service}.default.default.{peer}.external.{trust_domain}"


class Peerings:
    def __init__(self, raft: RaftIndex, config: ConfigEntries, local_dc: str) -> None:
        self.raft = raft
        self.config = config
        self.local_dc = local_dc
        self._peerings: dict[str, Peering] = {}

    # --- helpers for tests and the demo -------------------------------------------------------

    def add(
        self,
        name: str,
        *,
        state: str = "ACTIVE",
        peer_server_name: str = "",
        peer_server_addresses: Iterable[str] = (),
        remote_datacenter: str = "",
        meta: Mapping[str, str] | None = None,
    ) -> None:
        """A peering named `name`: one this cluster dials when addresses are given (the peer's
        servers, or its mesh gateways' WAN addresses), else one it accepted."""
        if state not in STATES:
            raise ValueError(f"state {state!r}: want one of {', '.join(STATES)}")
        with self.raft.lock:
            index = self.raft.index + 1
            self._peerings[name] = Peering(
                name,
                state,
                str(uuid.uuid4()),
                peer_server_name,
                list(peer_server_addresses),
                remote_datacenter,
                dict(meta or {}),
                index,
                index,
            )
            self.raft.commit(KEY)

    def update(
        self,
        name: str,
        *,
        state: str | None = None,
        peer_server_name: str | None = None,
        peer_server_addresses: Iterable[str] | None = None,
    ) -> None:
        """Change a peering's state, server name or addresses (its ModifyIndex moves)."""
        with self.raft.lock:
            peering = self._peerings[name]
            if state is not None:
                if state not in STATES:
                    raise ValueError(f"state {state!r}: want one of {', '.join(STATES)}")
                peering.state = state
            if peer_server_name is not None:
                peering.peer_server_name = peer_server_name
            if peer_server_addresses is not None:
                peering.peer_server_addresses = list(peer_server_addresses)
            peering.modify_index = self.raft.index + 1
            self.raft.commit(KEY)

    def delete(self, name: str) -> None:
        """The peering and everything imported through it go away."""
        with self.raft.lock:
            peering = self._peerings.pop(name, None)
            if peering is None:
                return
            keys = [self.connect_key(s, name) for s in peering.imports]
            self.raft.commit(KEY, *keys)

    def import_services(
        self,
        peer: str,
        services: Iterable[str],
        *,
        gateways: Iterable[Mapping[str, Any]],
        trust_domain: str,
        exporter_peer_name: str | None = None,
        protocol: str = "tcp",
    ) -> None:
        """The peer exports `services` to this cluster: synthetic proxies at each of its mesh
        `gateways` (CheckServiceNodes from its catalog, e.g. shapes.mesh_gateway_node).
        `exporter_peer_name` is this cluster's name in the exporter's peerings (default: this
        datacenter's name); with the exporter's `trust_domain` it makes PeerMeta.SNI."""
        gateways = [copy.deepcopy(dict(g)) for g in gateways]
        with self.raft.lock:
            peering = self._peerings[peer]
            for service in services:
                peering.imports[service] = [
                    _synthetic_proxy(
                        service,
                        i,
                        gw,
                        peer,
                        exporter_peer_name or self.local_dc,
                        trust_domain,
                        protocol,
                    )
                    for i, gw in enumerate(gateways)
                ]
                self.raft.commit(KEY, self.connect_key(service, peer))

    def remove_imports(self, peer: str, services: Iterable[str] | None = None) -> None:
        with self.raft.lock:
            peering = self._peerings[peer]
            for service in list(services if services is not None else peering.imports):
                if peering.imports.pop(service, None) is not None:
                    self.raft.commit(KEY, self.connect_key(service, peer))

    # --- views --------------------------------------------------------------------------------

    def connect_key(self, service: str, peer: str) -> tuple[str, ...]:
        """The key imports of `service` from `peer` stamp (a blocking ?peer= read waits on it)."""
        return ("connect", self.local_dc, service, peer)

    def imported(self, peer: str, service: str) -> list[dict[str, Json]]:
        """The CheckServiceNodes of /v1/health/connect/<service>?peer=<peer>."""
        with self.raft.lock:
            peering = self._peerings.get(peer)
            return copy.deepcopy(peering.imports.get(service, []) if peering else [])

    def exported(self) -> list[dict[str, Json]]:
        """/v1/exported-services: each exported service and its consumers."""
        entry = self.config.raw(EXPORTED_SERVICES, "default") or {}
        out = []
        for service in sorted(entry.get("Services") or (), key=lambda s: s["Name"]):
            consumers = service.get("Consumers") or ()
            resolved: dict[str, list[str]] = {}
            peers = sorted({c["Peer"] for c in consumers if c.get("Peer")})
            partitions = sorted({c["Partition"] for c in consumers if c.get("Partition")})
            if peers:
                resolved["Peers"] = peers
            if partitions:
                resolved["Partitions"] = partitions
            out.append({"Service": service["Name"], "Consumers": resolved})
        return out

    def render(self, name: str) -> dict[str, Json] | None:
        """A peering as /v1/peering/<name> answers it (api.Peering)."""
        with self.raft.lock:
            peering = self._peerings.get(name)
            if peering is None:
                return None
            exported = [
                s["Service"] for s in self.exported() if name in s["Consumers"].get("Peers", ())
            ]
            out: dict[str, Json] = {"ID": peering.id, "Name": name}
            if peering.meta:
                out["Meta"] = dict(peering.meta)
            out["State"] = peering.state
            out["PeerID"] = peering.peer_id
            if peering.peer_server_name:
                out["PeerServerName"] = peering.peer_server_name
            if peering.peer_server_addresses:
                out["PeerServerAddresses"] = list(peering.peer_server_addresses)
            seen = _now() if peering.state == "ACTIVE" else None
            out["StreamStatus"] = {
                "ImportedServices": sorted(peering.imports) or None,  # nil slices encode as null
                "ExportedServices": exported or None,
                "LastHeartbeat": seen,
                "LastReceive": seen,
                "LastSend": seen,
            }
            out |= {
                "CreateIndex": peering.create_index,
                "ModifyIndex": peering.modify_index,
                "Remote": {"Partition": "default", "Datacenter": peering.remote_datacenter},
            }
            return out

    def names(self) -> list[str]:
        with self.raft.lock:
            return sorted(self._peerings)

    def index(self) -> int:
        """Peerings show the exported services, so a change of exports counts too."""
        return self.raft.view(KEY, CONFIG_KEY)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def _synthetic_proxy(
    service: str,
    index: int,
    gateway: Mapping[str, Any],
    peer: str,
    exporter_peer_name: str,
    trust_domain: str,
    protocol: str,
) -> dict[str, Json]:
    node: dict[str, Json] = {}
    for key, value in gateway["Node"].items():  # PeerName sits after Datacenter, as in Go
        node[key] = copy.deepcopy(value)
        if key == "Datacenter":
            node["PeerName"] = peer
    gw = gateway["Service"]
    dc = node["Datacenter"]
    sid, name = f"{service}-sidecar-proxy-instance-{index}", f"{service}-sidecar-proxy"
    out_service: dict[str, Json] = {
        "Kind": "connect-proxy",
        "ID": sid,
        "Service": name,
        "Tags": [],
        "Address": gw["Address"],
    }
    if gw.get("TaggedAddresses"):
        out_service["TaggedAddresses"] = copy.deepcopy(gw["TaggedAddresses"])
    out_service |= {
        "Meta": {},
        "Port": gw["Port"],
        "Weights": copy.deepcopy(gw.get("Weights") or {"Passing": 1, "Warning": 1}),
        "EnableTagOverride": False,
        "Proxy": {
            "DestinationServiceName": service,
            "DestinationServiceID": f"{service}-instance-{index}",
            "Mode": "",
            "MeshGateway": {},
            "Expose": {},
        },
        "Connect": {
            "PeerMeta": {
                "SNI": [peered_service_sni(service, exporter_peer_name, trust_domain)],
                "SpiffeID": [
                    f"spiffe://{trust_domain}/ns/default/dc/{dc}/svc/{service}",
                    f"spiffe://{trust_domain}/gateway/mesh/dc/{dc}",
                ],
                "Protocol": protocol,
            }
        },
        "PeerName": peer,
        "CreateIndex": gw.get("CreateIndex", 1),
        "ModifyIndex": gw.get("ModifyIndex", 1),
    }
    statuses = [c["Status"] for c in gateway.get("Checks") or ()]
    if not statuses:  # nothing to flatten: no check at all
        return {"Node": node, "Service": out_service, "Checks": []}
    check = {
        "Node": node["Node"],
        "CheckID": f"{sid}:overall-check",
        "Name": "overall-check",
        "Status": min(statuses, key=lambda s: _STATUS_RANK.get(s, 0)),
        "Notes": "",
        "Output": "",
        "ServiceID": sid,
        "ServiceName": name,
        "ServiceTags": [],
        "Type": "",
        "Interval": "",
        "Timeout": "",
        "ExposedPort": 0,
        "Definition": {},
        "PeerName": peer,
        "CreateIndex": 1,
        "ModifyIndex": 1,
    }
    return {"Node": node, "Service": out_service, "Checks": [check]}
