"""Check 8, `peering`: cluster peering through this datacenter's mesh gateways
(docs/consul.md#peering).

From `/v1/peerings`, the mesh config entry, `/v1/exported-services`, the trust domain, each
imported service's instances (`/v1/health/connect/<svc>?peer=<name>`) and each exported service's
discovery chain, it says:

- each peering's state;
- which names peering traffic carries through this datacenter's mesh gateways, each then probed
  on every local mesh gateway at its LAN address (passage.py), as servers and sidecars dial them:
  with `PeerThroughMeshGateways`, `server.<localdc>.peering.<td>` (peers dial this cluster's
  servers) and each dialled peering's `PeerServerName` (this cluster's leader dials out); each
  imported service's `PeerMeta.SNI` (sidecars in local mesh-gateway mode); each exported service's
  `<svc>.<ns>.<ap>.<peer>.external.<td>`;
- the verdicts: forwarded passes; refused where another gateway forwards the name is a warning
  (Consul hands peering traffic to every mesh gateway, unfiltered, so that gateway makes a share
  of it fail); refused by every gateway fails. HTTP, HTTP/2 and gRPC exports are refused by meshgw
  gateways on purpose (peered_l7): a warning, wherever it happens.

Pure functions over the documents; runner.py fetches them and runs the probes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from meshgw.control import catalog, central
from meshgw.doctor.checks import (
    PEERING,
    Check,
    Failure,
    FailureKind,
    Outcome,
    failed,
    mesh_gateways,
    passed,
    request_failure,
    skipped,
    warned,
)
from meshgw.doctor.passage import Passage, PassageProbe
from meshgw.wire.names import peered_service_sni, peering_server_sni

__all__ = [
    "NameKind",
    "PeeringDocuments",
    "PeeringName",
    "PeeringPlan",
    "check_passages",
    "exported_services",
    "imports_wanted",
    "missing_gateways",
    "peering_gateways",
    "plan_peering",
]

CONSUL_DISCOVERY = "meshgw run --consul with a token that has"


class NameKind(enum.Enum):
    LOCAL_SERVERS = "local-servers"  # server.<localdc>.peering.<td>
    PEER_SERVERS = "peer-servers"  # a dialled peering's PeerServerName
    IMPORT = "import"  # an imported instance's PeerMeta.SNI
    EXPORT = "export"  # <svc>.<ns>.<ap>.<peer>.external.<td>
    EXPORT_L7 = "export-l7"  # the same, for an HTTP, HTTP/2 or gRPC service


@dataclass(frozen=True, slots=True)
class PeeringName:
    sni: str
    kind: NameKind
    peer: str = ""
    service: str = ""

    @property
    def alpn(self) -> tuple[str, ...]:
        # Servers speak gRPC over TLS to each other, as grpc-go offers it.
        return ("h2",) if self.kind in (NameKind.LOCAL_SERVERS, NameKind.PEER_SERVERS) else ()

    def what(self) -> str:
        return {
            NameKind.LOCAL_SERVERS: "this datacenter's servers, as peers dial them",
            NameKind.PEER_SERVERS: f"peer {self.peer}'s servers, as this datacenter's leader "
            "dials them",
            NameKind.IMPORT: f"{self.service} imported from {self.peer}",
            NameKind.EXPORT: f"{self.service} exported to {self.peer}",
            NameKind.EXPORT_L7: f"{self.service} exported to {self.peer} (HTTP, HTTP/2 or gRPC)",
        }[self.kind]


@dataclass
class PeeringDocuments:
    """What runner.gather fetched: each a decoded document or the Failure of its request."""

    peerings: Outcome = None  # /v1/peerings
    mesh: Outcome = None  # /v1/config/mesh/mesh
    exports: Outcome = None  # /v1/exported-services
    roots: Outcome = None  # /v1/connect/ca/roots
    imports: dict[tuple[str, str], Outcome] = field(default_factory=dict)  # (peer, svc)
    chains: dict[str, Outcome] = field(default_factory=dict)  # exported service → its chain


@dataclass
class PeeringPlan:
    names: list[PeeringName] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)  # states, and what could not be read
    # Exports, or peering's control plane through gateways: this datacenter needs a gateway.
    gateways_required: bool = False


# --- reading the documents ------------------------------------------------------------------


def _unreadable(local: str, what: str, document: Failure) -> Check:
    """A document the check cannot read: a 403 or a missing API is a skip, naming why."""
    if document.kind is FailureKind.FORBIDDEN:
        need = document.permission or "a policy that allows it"
        return skipped(
            PEERING, local, f"{what} not checked: the token may not read it (it needs {need})"
        )
    if document.kind is FailureKind.NOT_FOUND:
        return skipped(
            PEERING, local, f"{what} not checked: this agent has no such API ({document})"
        )
    return request_failure(PEERING, local, document)


def _peerings(local: str, document: Outcome) -> tuple[list[central.PeeringInfo], list[Check]]:
    if isinstance(document, Failure):
        return [], [_unreadable(local, "peerings", document)]
    try:
        return central.peerings(document), []
    except catalog.CatalogError as error:
        return [], [failed(PEERING, local, str(error), "Point --consul at a Consul agent.")]


def exported_services(document: Outcome) -> list[central.Export]:
    if isinstance(document, Failure):
        return []
    try:
        return central.exported_services(document)
    except catalog.CatalogError:
        return []


def imports_wanted(document: Outcome) -> list[tuple[str, str]]:
    """(peer, service) of every service imported through a peering not being torn down."""
    peerings, _ = _peerings("", document)
    return [
        (p.name, service)
        for p in peerings
        if p.state not in central.ENDED_PEERING_STATES
        for service in p.imported
    ]


def _through_gateways(local: str, document: Outcome) -> tuple[bool, list[Check]]:
    """The mesh entry's PeerThroughMeshGateways; no entry (404) means off."""
    if isinstance(document, Failure):
        if document.kind is FailureKind.NOT_FOUND:
            return False, []
        return False, [_unreadable(local, "the mesh config entry", document)]
    return central.peer_through_mesh_gateways(document), []


def _trust_domain(document: Outcome) -> str | None:
    if isinstance(document, Failure):
        return None
    try:
        return catalog.trust_domain(document)
    except catalog.CatalogError:
        return None


# --- the peerings' states -------------------------------------------------------------------

_STATES: Mapping[str, tuple[str, str, str | None]] = {
    # state: (status, what it means, the fix)
    "ACTIVE": ("pass", "the peering stream is up", None),
    "PENDING": (
        "warn",
        "a peering token was generated, and the peer has not established with it yet",
        "Run `consul peering establish` with the token in the peer cluster, or delete this "
        "peering if it is abandoned.",
    ),
    "ESTABLISHING": (
        "warn",
        "this cluster's servers are establishing the peering",
        "If it stays so, check that the peer's servers (with PeerThroughMeshGateways, this "
        "datacenter's mesh gateways) are reachable and that the token is still valid.",
    ),
    "FAILING": (
        "fail",
        "the peering stream is failing",
        "Read the servers' logs for the peering stream's errors; the peer's servers must be "
        "reachable, through the mesh gateways when PeerThroughMeshGateways is set.",
    ),
    "TERMINATED": (
        "fail",
        "the peer deleted the peering",
        "Delete it here too (consul peering delete -name NAME), and establish a new one if it "
        "is still wanted.",
    ),
    "DELETING": ("skip", "the peering is being deleted: its names route nowhere any more", None),
}


def check_peering_state(peering: central.PeeringInfo) -> Check:
    subject = f"peering {peering.name}"
    if peering.server_name and peering.addresses:
        dialled = ", ".join(f"{host}:{port}" for host, port in peering.addresses)
        role = f"dials {peering.server_name} at {dialled}"
    else:
        role = "accepted: the peer dials in"
    imported = ", ".join(peering.imported) or "nothing"
    state = peering.state or "UNDEFINED"
    status, meaning, fix = _STATES.get(
        state, ("warn", "a state this check does not know", "Read `consul peering read`.")
    )
    detail = f"{state}: {meaning}; {role}; imports {imported}"
    if status == "pass":
        return passed(PEERING, subject, detail)
    if status == "skip":
        return skipped(PEERING, subject, detail)
    if status == "warn":
        return warned(PEERING, subject, detail, fix or "")
    return failed(PEERING, subject, detail, fix or "")


# --- the names to probe ---------------------------------------------------------------------


def plan_peering(local: str, documents: PeeringDocuments) -> PeeringPlan:
    """The peerings' states, and the names peering traffic carries through the gateways."""
    plan = PeeringPlan()
    peerings, notes = _peerings(local, documents.peerings)
    plan.checks += notes
    through, notes = _through_gateways(local, documents.mesh)
    plan.checks += notes
    trust_domain = _trust_domain(documents.roots)
    plan.checks += [check_peering_state(p) for p in peerings]
    if through:
        plan.gateways_required = True
        plan.names += _server_names(local, trust_domain, peerings, plan.checks)
    plan.names += _import_names(documents.imports, plan.checks)
    if isinstance(documents.exports, Failure):
        plan.checks.append(_unreadable(local, "exported services", documents.exports))
    exports = exported_services(documents.exports)
    if exports:
        plan.gateways_required = True
        plan.names += _export_names(local, trust_domain, exports, documents.chains, plan.checks)
    return plan


def _server_names(
    local: str,
    trust_domain: str | None,
    peerings: list[central.PeeringInfo],
    checks: list[Check],
) -> list[PeeringName]:
    names = []
    if trust_domain is None:
        checks.append(
            skipped(
                PEERING,
                local,
                f"server.{local}.peering.<trust domain> not checked: the trust domain is unknown "
                "(/v1/connect/ca/roots names none: the Connect CA is not set up)",
            )
        )
    else:
        try:
            names.append(
                PeeringName(peering_server_sni(local, trust_domain), NameKind.LOCAL_SERVERS)
            )
        except ValueError as error:
            checks.append(skipped(PEERING, local, f"no peering server name can be formed: {error}"))
    for sni, (peer, _) in sorted(central.peer_servers(peerings).items()):
        names.append(PeeringName(sni, NameKind.PEER_SERVERS, peer=peer))
    return names


def _import_names(
    imports: Mapping[tuple[str, str], Outcome], checks: list[Check]
) -> list[PeeringName]:
    names = []
    for (peer, service), document in sorted(imports.items()):
        subject = f"{service} from {peer}"
        if isinstance(document, Failure):
            checks.append(_unreadable(subject, "the imported instances", document))
            continue
        try:
            by_sni = catalog.imported_instances(document, service)
        except catalog.CatalogError as error:
            checks.append(failed(PEERING, subject, str(error), "Point --consul at a Consul agent."))
            continue
        if not by_sni:
            checks.append(skipped(PEERING, subject, "no instance imported yet: no name to probe"))
        names += [PeeringName(sni, NameKind.IMPORT, peer, service) for sni in sorted(by_sni)]
    return names


def _export_names(
    local: str,
    trust_domain: str | None,
    exports: list[central.Export],
    chains: Mapping[str, Outcome],
    checks: list[Check],
) -> list[PeeringName]:
    if trust_domain is None:
        checks.append(
            skipped(PEERING, local, "exported services not checked: the trust domain is unknown")
        )
        return []
    names = []
    for export in exports:
        kind = _export_kind(local, export.service, chains.get(export.service), checks)
        if kind is None:
            continue
        for peer in export.peers:
            try:
                sni = peered_service_sni(
                    export.service, export.namespace, export.partition, peer, trust_domain
                )
            except ValueError as error:
                checks.append(skipped(PEERING, f"{export.service} exported to {peer}", str(error)))
                continue
            names.append(PeeringName(sni, kind, peer, export.service))
    return names


def _export_kind(local: str, service: str, chain: Outcome, checks: list[Check]) -> NameKind | None:
    """From the service's discovery chain: an L7 export, a TCP one, or one no gateway of this
    datacenter routes (None)."""
    if isinstance(chain, Failure):
        checks.append(_unreadable(service, f"{service}'s protocol", chain))
        return NameKind.EXPORT  # probed all the same
    protocol = catalog.text(catalog.obj(catalog.obj(chain).get("Chain")).get("Protocol"))
    if protocol.lower() in central.L7_PROTOCOLS:
        return NameKind.EXPORT_L7
    if chain is not None and central.chain_target(chain, local) is None:
        checks.append(
            warned(
                PEERING,
                f"{service} exported",
                f"its discovery chain leads out of {local} (a redirect or failover to another "
                "datacenter, partition or peer): meshgw gateways do not route it to peers",
                f"Resolve {service} to instances in {local}, or export the service it leads to "
                "from where it runs.",
            )
        )
        return None
    return NameKind.EXPORT


# --- the gateways and the verdicts ----------------------------------------------------------


def peering_gateways(documents: Sequence[Outcome]) -> list[tuple[str, int]]:
    """Every local mesh gateway (any name, any meta, any health: Consul hands peering traffic
    to all of them) at its LAN address, as servers and sidecars dial it."""
    found: list[tuple[str, int]] = []
    for document in documents:
        for entry in mesh_gateways(document):
            address = catalog.lan_address(entry)
            if address is not None and address not in found:
                found.append(address)
    return found


def missing_gateways(local: str, plan: PeeringPlan) -> Check:
    if plan.gateways_required:
        return failed(
            PEERING,
            local,
            f"no mesh gateway of {local} in the catalog, while {len(plan.names)} peering "
            "name(s) must pass one: exported services and, with PeerThroughMeshGateways, the "
            "peering control plane go through this datacenter's mesh gateways",
            f"Run a mesh gateway in {local} (meshgw run --consul --register, or consul connect "
            "envoy -gateway=mesh -register).",
        )
    return skipped(
        PEERING,
        local,
        f"no mesh gateway of {local} in the catalog: imported services are reachable only in "
        "remote mesh-gateway mode, where sidecars dial the exporter's gateways themselves",
    )


_SHARE = {
    NameKind.LOCAL_SERVERS: "of the peers' dials",
    NameKind.PEER_SERVERS: "of the leader's dials",
    NameKind.IMPORT: "of the connections of sidecars in local mesh-gateway mode",
    NameKind.EXPORT: "of the peer's connections",
}

_FIXES = {
    NameKind.LOCAL_SERVERS: "Let the gateway learn the servers peers dial ({consul} "
    "service:read and mesh:read, or --peering-server HOST:PORT) and give the servers a "
    "grpc_tls port; or take the gateway out of the catalog.",
    NameKind.PEER_SERVERS: "Let the gateway learn the peerings ({consul} peering:read and "
    "mesh:read, or --peer-server {peer}/{sni}=HOST:PORT); or take it out of the catalog.",
    NameKind.IMPORT: "Let the gateway learn the imported services ({consul} service:read and "
    "peering:read, or --peer-import {peer}/{sni}=HOST:PORT).",
    NameKind.EXPORT: "Make sure {service} has instances in this datacenter and that the gateway "
    "learns the exports ({consul} mesh:read and service:read, or --service and --peer-export "
    "{service}={peer}).",
    NameKind.EXPORT_L7: "Serve {service} to {peer} through Consul's Envoy mesh gateways, which "
    "terminate TLS for it, or make its protocol tcp (service-defaults) if {peer} needs no L7 "
    "routing.",
}


def _fix(name: PeeringName) -> str:
    return _FIXES[name.kind].format(
        consul=CONSUL_DISCOVERY, sni=name.sni, service=name.service, peer=name.peer
    )


def check_passages(name: PeeringName, probes: Sequence[PassageProbe]) -> list[Check]:
    """One line per gateway probed with `name`."""
    forwarded = {Passage.FORWARDED, Passage.HELD}
    elsewhere = any(p.passage in forwarded for p in probes)
    results = []
    for probe in probes:
        subject = f"{name.sni} via {probe.gateway}"
        if probe.passage in forwarded:
            results.append(passed(PEERING, subject, f"{name.what()}: forwarded: {probe.detail}"))
        elif probe.passage is Passage.UNREACHABLE:
            results.append(
                failed(
                    PEERING,
                    subject,
                    f"cannot connect to the gateway: {probe.detail}",
                    "Start the gateway, or take it out of the catalog: Consul hands peering "
                    "traffic to every mesh gateway registered.",
                )
            )
        else:
            results.append(_refusal(name, subject, probe, elsewhere))
    return results


def _refusal(name: PeeringName, subject: str, probe: PassageProbe, elsewhere: bool) -> Check:
    refused = f"{name.what()}: refused ({probe.detail})"
    if name.kind is NameKind.EXPORT_L7:
        return warned(
            PEERING,
            subject,
            f"{refused}: meshgw gateways refuse HTTP, HTTP/2 and gRPC exports (peered_l7), "
            "since Consul's gateway terminates TLS for them and meshgw never does",
            _fix(name),
        )
    if elsewhere:
        return warned(
            PEERING,
            subject,
            f"{refused}, while another gateway forwards it: Consul hands peering traffic to "
            f"every mesh gateway, unfiltered, so this one makes a share {_SHARE[name.kind]} fail",
            _fix(name),
        )
    if name.kind is NameKind.IMPORT:
        return warned(
            PEERING,
            subject,
            f"{refused}, by every gateway: sidecars in local mesh-gateway mode cannot reach it "
            f"(in remote mode they dial {name.peer}'s gateways themselves)",
            _fix(name),
        )
    return failed(PEERING, subject, f"{refused}, by every gateway of this datacenter", _fix(name))
