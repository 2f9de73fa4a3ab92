"""`meshgw doctor`: the WAN-federation-via-mesh-gateways bootstrap checklist, automated.

It asks a live setup, through the Consul HTTP API and the gateways' listeners, what CONSUL.md's
"most often gets wrong" list warns about:

1. ``agent``: the agent answers /v1/agent/self (datacenter, primary, domain);
2. ``gateways``: every datacenter has a healthy mesh gateway with Meta consul-wan-federation=1,
   and no datacenter mixes gateways with and without it (list item 1 and 9);
3. ``wan-address``: every wanfed gateway has a ``wan`` tagged address (item 2);
4. ``federation-state``: a federation state exists for every datacenter;
5. ``forwarding``: ``?dc=X`` requests reach every remote datacenter (CONSUL.md §8);
6. ``names``: datacenter and server node names have no dots (item 10, wanfed.SplitNodeName);
7. ``tls``: ``server.<dc>.<domain>`` (and each known ``<node>.server.<dc>.<domain>``) of every
   remote datacenter answers a TLS handshake through a local gateway, with a certificate valid
   for that name, offering ALPN ``consul/rpc-multi`` as a server does (item 5).

Layout: the checks are pure functions from Consul's JSON documents to `Check` values (a failed
request is passed in as its exception, a value like any other); `gather` is the thin async part
that fetches the documents and probes the gateways; `doctor_command` prints the result.

Where the gateways come from: the federation states' mesh-gateway list
(/v1/internal/federation-states/mesh-gateways), because it is exactly what a server's gateway
locator reads (CONSUL.md §4), it lists gateways by Kind whatever their service name, and it needs
no cross-datacenter forwarding -- the very thing that is broken while federation bootstraps. A
datacenter missing from that list (or the whole list, when unavailable) is looked up in its
catalog with /v1/health/service/mesh-gateway?dc=X, to tell "nothing registered" from
"registered, but the servers do not know it".
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import ssl
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from meshgw.control.catalog import (
    WAN_FEDERATION_META,
    AgentIdentity,
    CatalogError,
    agent_identity,
    lan_address,
    wan_address,
)
from meshgw.settings import parse_address, parse_seconds
from meshgw.wire.names import (
    DEFAULT_DOMAIN,
    is_valid_datacenter,
    is_valid_node_name,
    server_sni,
)

if TYPE_CHECKING:
    from meshgw.control.consul import ConsulConfig, ConsulRequestError

__all__ = [
    "Check",
    "DoctorOptions",
    "Failure",
    "FailureKind",
    "Inventory",
    "Probe",
    "Status",
    "Verdict",
    "check_agent",
    "check_datacenters",
    "check_federation_states",
    "check_forwarding",
    "check_gateways",
    "check_names",
    "check_wan_addresses",
    "doctor_command",
    "gateway_inventory",
    "gather",
    "render_json",
    "render_text",
    "tls_probe",
]

ALPN = "consul/rpc-multi"  # what a server offers when it dials another DC's server (§4)
DEFAULT_TIMEOUT = 5.0
# After a TLS 1.3 handshake the client cannot tell yet whether the server accepted its
# certificate: the verdict is a session ticket (accepted) or an alert (refused). A server that
# sends neither is given this long before the handshake counts as accepted.
POST_HANDSHAKE_WAIT = 1.0
MAX_PROBES = 16  # concurrent TLS probes

# The check names, in report order.
AGENT = "agent"
GATEWAYS = "gateways"
WAN_ADDRESS = "wan-address"
FEDERATION_STATE = "federation-state"
FORWARDING = "forwarding"
NAMES = "names"
TLS = "tls"
CHECK_ORDER = (AGENT, GATEWAYS, WAN_ADDRESS, FEDERATION_STATE, FORWARDING, NAMES, TLS)

# Consul's own error texts (agent/structs/errors.go, federation_state_endpoint.go).
NO_PATH = "No path to datacenter"
DC_NOT_AVAILABLE = "Remote DC has no server currently reachable"
NO_LEADER = "No cluster leader"
FED_DISABLED = "Federation states are currently disabled"

TOKEN_HINT = "--token-file or CONSUL_HTTP_TOKEN"
REGISTER_HINT = (
    "consul connect envoy -gateway=mesh -register -expose-servers, "
    "or meshgw run --register --expose-servers"
)


class Status(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report. `fix` is one sentence, for failures only."""

    check: str
    subject: str
    status: Status
    detail: str
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "subject": self.subject,
            "status": self.status.value,
            "detail": self.detail,
            "fix": self.fix,
        }


def passed(check: str, subject: str, detail: str) -> Check:
    return Check(check, subject, Status.PASS, detail)


def failed(check: str, subject: str, detail: str, fix: str) -> Check:
    return Check(check, subject, Status.FAIL, detail, fix)


def skipped(check: str, subject: str, detail: str) -> Check:
    return Check(check, subject, Status.SKIP, detail)


# --- request failures -----------------------------------------------------------------------


class FailureKind(enum.Enum):
    UNAVAILABLE = "unavailable"  # refused, reset, TLS with the agent
    TIMEOUT = "timeout"
    FORBIDDEN = "forbidden"  # 403
    NOT_FOUND = "not-found"  # 404
    HTTP = "http"  # any other non-2xx
    BAD_RESPONSE = "bad-response"  # 2xx, but not the JSON the endpoint returns


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed request as a value the checks read, like a document. Kept apart from the
    client's exceptions so that the checks (and `meshgw` start-up, which imports this module
    for its command) do not load the HTTP client."""

    kind: FailureKind
    message: str  # the client's message: names the address, the request and the cause
    body: str = ""  # the start of Consul's answer, for HTTP errors
    permission: str | None = None  # for 403: the ACL permission the endpoint needs

    def __str__(self) -> str:
        return self.message

    @classmethod
    def of(cls, error: ConsulRequestError) -> Failure:
        from meshgw.control import consul

        kinds = (
            (consul.ConsulForbidden, FailureKind.FORBIDDEN),
            (consul.ConsulNotFound, FailureKind.NOT_FOUND),
            (consul.ConsulHTTPError, FailureKind.HTTP),
            (consul.ConsulTimeout, FailureKind.TIMEOUT),
            (consul.ConsulBadResponse, FailureKind.BAD_RESPONSE),
        )
        kind = next((k for t, k in kinds if isinstance(error, t)), FailureKind.UNAVAILABLE)
        return cls(
            kind,
            str(error),
            getattr(error, "body", ""),
            getattr(error, "permission", None),
        )


Outcome = Any  # a decoded JSON document, or the Failure of its request


def request_failure(check: str, subject: str, error: Failure) -> Check:
    """A failed request as a failed check, with the fix that kind of failure needs."""
    if error.kind is FailureKind.FORBIDDEN:
        need = error.permission or "a policy that allows this request"
        fix = f"Use a token ({TOKEN_HINT}) with {need}."
    elif error.kind is FailureKind.TIMEOUT:
        fix = (
            "Check the agent's health and its connection to the servers, or raise --timeout "
            "if they are only slow."
        )
    elif error.kind is FailureKind.BAD_RESPONSE:
        fix = (
            "Point --consul (or CONSUL_HTTP_ADDR) at a Consul agent's HTTP API: this address "
            "answers, but not with Consul's JSON."
        )
    elif error.kind in (FailureKind.HTTP, FailureKind.NOT_FOUND):
        fix = "Read the error above and the Consul servers' logs for its cause."
    else:  # ConsulUnavailable: refused, reset, TLS
        fix = (
            "Start the Consul agent, or point --consul (or CONSUL_HTTP_ADDR) at its HTTP "
            "address; for HTTPS set CONSUL_CACERT."
        )
    return failed(check, subject, str(error), fix)


def _body_has(error: Failure, text: str) -> bool:
    return text.lower() in error.body.lower()


# --- 1. the agent ---------------------------------------------------------------------------


def check_agent(address: str, document: Outcome) -> tuple[list[Check], AgentIdentity | None, bool]:
    """/v1/agent/self → the agent check, the agent's identity and whether ACLs are on.

    The identity is None when the agent could not tell it: later checks cannot run then."""
    if isinstance(document, Failure):
        return [request_failure(AGENT, address, document)], None, False
    fix = "Point --consul (or CONSUL_HTTP_ADDR) at a Consul agent's HTTP API."
    if not isinstance(document, Mapping) or not all(
        isinstance(document.get(k) or {}, Mapping) for k in ("Config", "DebugConfig")
    ):
        # agent_identity assumes these are objects (it would raise AttributeError).
        detail = "/v1/agent/self is not an object with Config and DebugConfig objects"
        return [failed(AGENT, address, detail, fix)], None, False
    try:
        identity = agent_identity(document)
    except CatalogError as error:
        return [failed(AGENT, address, str(error), fix)], None, False
    if identity.datacenter is None:
        return (
            [
                failed(
                    AGENT,
                    address,
                    "/v1/agent/self names no datacenter (Config.Datacenter is empty)",
                    fix,
                )
            ],
            None,
            False,
        )
    debug = document.get("DebugConfig") or {}
    acls = debug.get("ACLsEnabled") is True
    domain = identity.domain or DEFAULT_DOMAIN
    detail = (
        f"datacenter {identity.datacenter}, primary "
        f"{identity.primary_datacenter or '(unknown)'}, domain {domain}"
        + (f", node {identity.node}" if identity.node else "")
    )
    results: list[Check] = []
    # A server needs the feature switched on; a client agent does not care (§1 prerequisites).
    if debug.get("ServerMode") is True and (
        debug.get("ConnectEnabled") is False
        or debug.get("ConnectMeshGatewayWANFederationEnabled") is False
    ):
        results.append(
            failed(
                AGENT,
                address,
                f"{detail}; this agent is a server without WAN federation via mesh gateways",
                "Set connect { enabled = true, enable_mesh_gateway_wan_federation = true } on "
                "every server of every datacenter and restart them.",
            )
        )
    else:
        results.append(passed(AGENT, address, detail))
    return results, identity, acls


def check_datacenters(
    address: str, identity: AgentIdentity, document: Outcome
) -> tuple[list[Check], list[str] | None]:
    """/v1/catalog/datacenters → problems with the list itself, and the list."""
    if isinstance(document, Failure):
        return [request_failure(AGENT, f"{address} datacenters", document)], None
    names = [dc for dc in document if isinstance(dc, str) and dc]
    results: list[Check] = []
    primary = identity.primary_datacenter
    if primary and primary not in names:
        results.append(
            failed(
                AGENT,
                f"primary {primary}",
                f"the primary datacenter {primary} is not among the known datacenters "
                f"({', '.join(names) or 'none'}): {identity.datacenter} has not joined it "
                "over the WAN",
                "Set primary_gateways on this datacenter's servers to the WAN addresses of the "
                "primary's mesh gateways and make sure the servers can reach them.",
            )
        )
    local = identity.datacenter
    if local and local not in names:
        names.insert(0, local)
    return results, names


# --- 2. and 3. gateways ---------------------------------------------------------------------


@dataclass
class Inventory:
    """One datacenter's mesh gateways and where they were read."""

    entries: list[Mapping[str, Any]] | None  # None: could not be listed
    origin: str  # "federation states" or "catalog"
    in_federation_states: bool | None = None  # None: the federation-state list is unavailable
    error: Failure | None = None


def well_formed(document: Any) -> list[Mapping[str, Any]]:
    """The CheckServiceNode entries of a list that have the documented shape (Node and Service
    objects, a Checks list): the catalog helpers assume it, and Consul's answers are data, not
    something to crash on."""
    if not isinstance(document, list):
        return []
    return [
        e
        for e in document
        if isinstance(e, Mapping)
        and isinstance(e.get("Node") or {}, Mapping)
        and isinstance(e.get("Service"), Mapping)
        and isinstance(e.get("Checks") or [], list)
    ]


def _mesh_gateways(document: Any) -> list[Mapping[str, Any]]:
    return [e for e in well_formed(document) if e["Service"].get("Kind") == "mesh-gateway"]


def gateway_inventory(
    datacenters: Sequence[str],
    federation_gateways: Outcome,
    catalogs: Mapping[str, Outcome],
) -> dict[str, Inventory]:
    """Each datacenter's gateways: from the federation states' list where it has them, else
    from `catalogs[dc]` (/v1/health/service/mesh-gateway?dc=dc, or its error)."""
    federation = federation_gateways if isinstance(federation_gateways, Mapping) else None
    out: dict[str, Inventory] = {}
    for dc in datacenters:
        listed = federation.get(dc) if federation is not None else None
        if isinstance(listed, list):
            entries = well_formed(listed)
            out[dc] = Inventory(entries, "federation states", True)
            continue
        in_fed = None if federation is None else False
        catalog = catalogs.get(dc)
        if isinstance(catalog, Failure):
            out[dc] = Inventory(None, "catalog", in_fed, catalog)
        elif catalog is None:
            out[dc] = Inventory(None if federation is None else [], "catalog", in_fed)
        else:
            out[dc] = Inventory(_mesh_gateways(catalog), "catalog", in_fed)
    return out


def is_wanfed(entry: Mapping[str, Any]) -> bool:
    meta = (entry.get("Service") or {}).get("Meta") or {}
    return isinstance(meta, Mapping) and meta.get(WAN_FEDERATION_META) == "1"


def _check_statuses(entry: Mapping[str, Any]) -> list[str]:
    return [
        str(c.get("Status"))
        for c in entry.get("Checks") or []
        if isinstance(c, Mapping) and c.get("Status")
    ]


def gateway_label(entry: Mapping[str, Any]) -> str:
    """node/service-id, the way an operator finds the gateway again."""
    node = (entry.get("Node") or {}).get("Node") or "?"
    service = (entry.get("Service") or {}).get("ID") or "?"
    return f"{node}/{service}"


def check_gateways(dc: str, inventory: Inventory, *, acls: bool = False) -> list[Check]:
    entries = inventory.entries
    if entries is None:
        if inventory.error is not None:
            return [
                failed(
                    GATEWAYS,
                    dc,
                    f"cannot list the mesh gateways of {dc}: {inventory.error}",
                    f"Fix the request error first (run a mesh gateway with -expose-servers in "
                    f"{dc} if there is none): the servers find {dc}'s gateways in the "
                    "federation states.",
                )
            ]
        return [skipped(GATEWAYS, dc, "the gateways could not be listed")]
    results: list[Check] = []
    acl_note = (
        " (ACLs are on: a token without service:read and node:read sees a filtered list)"
        if acls
        else ""
    )
    if inventory.in_federation_states is False and entries:
        results.append(
            failed(
                GATEWAYS,
                dc,
                f"{len(entries)} mesh gateway(s) registered in {dc}'s catalog "
                f"({', '.join(gateway_label(e) for e in entries)}), but none in the federation "
                "states, which is where the servers look for gateways",
                f"Make sure {dc}'s servers run with enable_mesh_gateway_wan_federation = true "
                f"and check {dc}'s leader logs for federation state anti-entropy or replication "
                "errors.",
            )
        )
    if not entries:
        where = (
            "in the federation states or the catalog"
            if inventory.in_federation_states is False
            else f"in the {inventory.origin}"
        )
        return [
            failed(
                GATEWAYS,
                dc,
                f"no mesh gateway of {dc} {where}{acl_note}: the servers have no way into or "
                f'out of {dc} ("Remote DC has no server currently reachable")',
                f"Run a mesh gateway in {dc} and register it with the wanfed meta "
                f"({REGISTER_HINT}).",
            )
        ]
    wanfed = [e for e in entries if is_wanfed(e)]
    plain = [e for e in entries if not is_wanfed(e)]
    source = f"from the {inventory.origin}"
    if not wanfed:
        return [
            *results,
            failed(
                GATEWAYS,
                dc,
                f"{len(entries)} mesh gateway(s) in {dc} ({', '.join(map(gateway_label, plain))}) "
                f"but none with Meta {WAN_FEDERATION_META}=1: the servers' gateway locator "
                "ignores them",
                f"Re-register {dc}'s gateways with -expose-servers ({REGISTER_HINT}), which adds "
                f'Meta {{"{WAN_FEDERATION_META}":"1"}} together with Kind mesh-gateway.',
            ),
        ]
    if plain:
        results.append(
            failed(
                GATEWAYS,
                dc,
                f"{dc} mixes gateways: {', '.join(map(gateway_label, plain))} lack(s) Meta "
                f"{WAN_FEDERATION_META}=1 while {', '.join(map(gateway_label, wanfed))} "
                "have it; other datacenters' gateways pick among all of them and the ones "
                "without the meta drop server traffic",
                f"Register every mesh gateway of {dc} with -expose-servers, or take the others "
                "out of the catalog (deregister them).",
            )
        )
    usable = [e for e in wanfed if "critical" not in _check_statuses(e)]
    passing = [e for e in usable if all(s == "passing" for s in _check_statuses(e))]
    if not usable:
        results.append(
            failed(
                GATEWAYS,
                dc,
                f"every wanfed gateway of {dc} is critical "
                f"({', '.join(map(gateway_label, wanfed))}): servers skip critical gateways",
                f"Start {dc}'s gateways and make their health check pass (it TCP-connects to "
                "the gateway's LAN address and port).",
            )
        )
    if not any(r.status is Status.FAIL for r in results):
        results.append(
            passed(
                GATEWAYS,
                dc,
                f"{len(wanfed)} wanfed mesh gateway(s) {source}, {len(passing)} passing"
                + (f", {len(usable) - len(passing)} warning" if len(usable) > len(passing) else ""),
            )
        )
    return results


def check_wan_addresses(dc: str, inventory: Inventory) -> list[Check]:
    """Every wanfed gateway needs a `wan` tagged address: remote datacenters dial it (item 2).
    The agent's automatic `wan_ipv4` holds the LAN address, so it does not count."""
    results = []
    for entry in inventory.entries or []:
        if not is_wanfed(entry):
            continue
        subject = f"{dc} {gateway_label(entry)}"
        service = entry.get("Service") or {}
        tagged = service.get("TaggedAddresses") or {}
        wan = tagged.get("wan") if isinstance(tagged, Mapping) else None
        if isinstance(wan, Mapping) and wan.get("Address"):
            best = wan_address(entry)
            shown = f"{best[0]}:{best[1]}" if best else str(wan.get("Address"))
            results.append(passed(WAN_ADDRESS, subject, f"wan {shown}"))
            continue
        fallback = wan_address(entry)
        dialed = f"{fallback[0]}:{fallback[1]}" if fallback else "no address at all"
        results.append(
            failed(
                WAN_ADDRESS,
                subject,
                f"no wan tagged address: other datacenters dial {dialed} (its LAN address), "
                "so it is reachable across datacenters only on a flat network",
                "Re-register the gateway with -wan-address HOST:PORT (meshgw run "
                "--wan-address) set to an address the other datacenters can reach.",
            )
        )
    return results


# --- 4. federation states -------------------------------------------------------------------


def check_federation_states(
    local_dc: str, datacenters: Sequence[str], document: Outcome
) -> list[Check]:
    """/v1/internal/federation-states: one state per datacenter."""
    if isinstance(document, Failure):
        if _body_has(document, FED_DISABLED) or _body_has(document, "not enabled"):
            return [
                failed(
                    FEDERATION_STATE,
                    local_dc,
                    f"federation states are disabled in {local_dc}: not every server there "
                    f"supports them ({document.body or document})",
                    f"Upgrade every server of {local_dc} to Consul 1.8 or later; the leader "
                    "enables federation states once all of them advertise the feature.",
                )
            ]
        if document.kind is FailureKind.NOT_FOUND:
            return [
                failed(
                    FEDERATION_STATE,
                    local_dc,
                    f"the agent has no federation-state API ({document})",
                    "Upgrade Consul to 1.8 or later: older versions cannot federate through "
                    "mesh gateways.",
                )
            ]
        return [request_failure(FEDERATION_STATE, local_dc, document)]
    states = {
        str(s.get("Datacenter")): s
        for s in document
        if isinstance(s, Mapping) and s.get("Datacenter")
    }
    results = []
    for dc in datacenters:
        state = states.get(dc)
        if state is None:
            results.append(
                failed(
                    FEDERATION_STATE,
                    dc,
                    f"no federation state for {dc}: the servers of {local_dc} do not know "
                    f"{dc}'s gateways",
                    f"{dc}'s leader writes it from its mesh gateways: register a gateway with "
                    f"-expose-servers in {dc}, enable enable_mesh_gateway_wan_federation on "
                    f"{dc}'s servers and, for a secondary, check its replication to the primary.",
                )
            )
            continue
        gateways = state.get("MeshGateways") or []
        updated = state.get("UpdatedAt") or "?"
        results.append(
            passed(
                FEDERATION_STATE,
                dc,
                f"{len(gateways) if isinstance(gateways, list) else 0} mesh gateway(s), "
                f"updated {updated}",
            )
        )
    return results


# --- 5. forwarding --------------------------------------------------------------------------


def check_forwarding(local_dc: str, dc: str, document: Outcome, timeout: float) -> Check:
    """/v1/catalog/services?dc=<dc>: a request the servers must forward (CONSUL.md §8)."""
    if not isinstance(document, Failure):
        count = len(document) if isinstance(document, Mapping) else 0
        return passed(FORWARDING, dc, f"?dc={dc} answered ({count} services)")
    if document.kind is FailureKind.FORBIDDEN:
        # The ACL check runs in the target datacenter, after the forward: the forward worked.
        return passed(
            FORWARDING,
            dc,
            f"?dc={dc} was forwarded ({dc} refused the token: {document.permission or '403'})",
        )
    fed_fix = (
        f"Check that {dc}'s servers joined the WAN through the gateways (consul members -wan; "
        "a secondary needs primary_gateways), that every datacenter has a healthy wanfed gateway "
        "with a reachable WAN address, and the tls check below."
    )
    if _body_has(document, NO_PATH):
        return failed(
            FORWARDING,
            dc,
            f'{local_dc} has "No path to datacenter" {dc}: WAN federation with {dc} is not '
            "established (no server of it is in the WAN pool)",
            fed_fix,
        )
    if _body_has(document, DC_NOT_AVAILABLE):
        return failed(
            FORWARDING,
            dc,
            f'"Remote DC has no server currently reachable": the servers of {local_dc} found '
            f"no usable gateway towards {dc}",
            f"Register a healthy mesh gateway with -expose-servers in {local_dc} and in {dc}, "
            "and wait for the federation states to replicate.",
        )
    if _body_has(document, NO_LEADER):
        return failed(
            FORWARDING,
            dc,
            f"{dc} has no cluster leader ({document.body or document})",
            f"Restore quorum among {dc}'s servers (check their logs and raft peers).",
        )
    if document.kind is FailureKind.TIMEOUT:
        return failed(
            FORWARDING,
            dc,
            f"?dc={dc} got no answer within {timeout:g}s: the request was forwarded towards "
            f"{dc} but did not come back, so WAN federation with {dc} is not established",
            fed_fix,
        )
    return request_failure(FORWARDING, dc, document)


# --- 6. names -------------------------------------------------------------------------------


def server_nodes(document: Outcome) -> list[str]:
    """/v1/health/service/consul → the servers' node names."""
    names = []
    for entry in well_formed(document):
        node = (entry.get("Node") or {}).get("Node")
        if isinstance(node, str) and node and node not in names:
            names.append(node)
    return names


def check_names(dc: str, servers: Outcome | None, why_unknown: str = "") -> list[Check]:
    """Datacenter and server node names must be single DNS labels: wanfed names WAN members
    <node>.<dc> and SplitNodeName wants exactly one dot; both also go into SNI names."""
    results: list[Check] = []
    if not is_valid_datacenter(dc):
        reason = "contains a dot" if "." in dc else "is not one DNS label of [a-z0-9_-]"
        results.append(
            failed(
                NAMES,
                dc,
                f"datacenter name {dc!r} {reason}: wanfed.SplitNodeName cannot split "
                f"<node>.{dc} and no SNI name can carry it",
                "Rename the datacenter to lower-case letters, digits, '-' or '_' (datacenter = "
                "...), which means rebuilding it.",
            )
        )
    if isinstance(servers, Failure):
        results.append(request_failure(NAMES, dc, servers))
        return results
    if servers is None:
        results.append(skipped(NAMES, dc, f"server node names not checked: {why_unknown}"))
        return results
    nodes = server_nodes(servers)
    bad = [n for n in nodes if not is_valid_node_name(n)]
    for node in bad:
        reason = (
            "contains a dot: wanfed names WAN members <node>.<dc> and SplitNodeName needs "
            "exactly one dot"
            if "." in node
            else "is not one DNS label: it cannot be part of <node>.server.<dc>.<domain>"
        )
        results.append(
            failed(
                NAMES,
                dc,
                f"server node name {node!r} {reason}",
                "Rename the server (node_name) to letters, digits, '-' or '_' without dots.",
            )
        )
    if not nodes:
        results.append(
            failed(
                NAMES,
                dc,
                f"no server of {dc} in the catalog (/v1/health/service/consul)",
                f"Check that {dc}'s servers are up and have a leader.",
            )
        )
    elif not bad and not results:
        results.append(
            passed(NAMES, dc, f"datacenter and {len(nodes)} server name(s) are dot-free labels")
        )
    return results


# --- 7. TLS through the local gateway -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DoctorOptions:
    gateways: tuple[tuple[str, int], ...] = ()  # --gateway; empty: the local catalog's
    ca_file: str | None = None
    cert: str | None = None
    key: str | None = None
    timeout: float = DEFAULT_TIMEOUT


def name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 as Go and OpenSSL apply it: exact, or `*.` standing for exactly one label."""
    pattern = pattern.lower().rstrip(".")
    name = name.lower().rstrip(".")
    if pattern == name:
        return True
    if pattern.startswith("*.") and "." in name:
        return name.split(".", 1)[1] == pattern[2:]
    return False


def certificate_names(peer: Mapping[str, Any] | None) -> list[str]:
    """The DNS subjectAltNames of an `SSLObject.getpeercert()` dictionary."""
    names = []
    for kind, value in (peer or {}).get("subjectAltName", ()):
        if kind == "DNS":
            names.append(str(value))
    return names


class Verdict(enum.Enum):
    """How a probe ended; `classify_probe` turns it into a check."""

    ACCEPTED = "accepted"  # handshake done, certificate valid for the name, mTLS accepted
    CLIENT_CERT_DEMANDED = "client-cert-demanded"  # ... but the server wanted a client cert
    CLIENT_CERT_REFUSED = "client-cert-refused"  # the server refused our --cert
    CLOSED_AFTER_HANDSHAKE = "closed-after-handshake"
    NAME_MISMATCH = "name-mismatch"
    UNTRUSTED = "untrusted"
    NO_ALPN = "no-alpn"
    HANDSHAKE_REFUSED = "handshake-refused"  # an alert during the handshake
    CLOSED = "closed"  # EOF or reset before the handshake finished: no route at the gateway
    UNREACHABLE = "unreachable"  # the gateway's port does not accept
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class Probe:
    gateway: str
    name: str
    verdict: Verdict
    detail: str = ""
    names: tuple[str, ...] = ()  # the certificate's DNS names, when it was seen
    alpn: str | None = None
    version: str | None = None


_CLIENT_CERT_ALERTS = (
    "CERTIFICATE_REQUIRED",
    "BAD_CERTIFICATE",
    "UNKNOWN_CA",
    "CERTIFICATE_UNKNOWN",
    "ACCESS_DENIED",
    "DECRYPT_ERROR",
    "HANDSHAKE_FAILURE",
)


def _alert(error: ssl.SSLError) -> str:
    return str(error.reason or error.strerror or error)


def classify_probe(probe: Probe, dc: str, local_dc: str, *, with_cert: bool) -> Check:
    subject = f"{probe.name} via {probe.gateway}"
    got = f"; the certificate names {', '.join(probe.names)}" if probe.names else ""
    verdict = probe.verdict
    reissue = (
        f"Reissue {dc}'s server certificates with server.{dc}.<domain> and "
        f"<node>.server.{dc}.<domain> (consul tls cert create -server -dc {dc} -node NODE, "
        "or meshgw tls cert create), signed by the CA given in --ca-file."
    )
    route_fix = (
        f"Check that the local gateway knows {dc}'s gateways (federation states, or meshgw "
        f"--gateway {dc}=HOST:PORT), runs with -expose-servers, and that {dc}'s gateways "
        f"reach {dc}'s servers."
    )
    if verdict is Verdict.ACCEPTED:
        how = "mutual TLS accepted" if with_cert else "the server asked for no client certificate"
        return passed(TLS, subject, f"certificate valid for {probe.name}, ALPN {probe.alpn}, {how}")
    if verdict is Verdict.CLIENT_CERT_DEMANDED:
        return passed(
            TLS,
            subject,
            f"certificate valid for {probe.name}, ALPN {probe.alpn}; the server then demanded "
            f"a client certificate ({probe.detail}): pass --cert/--key to test mutual TLS too",
        )
    if verdict is Verdict.CLOSED_AFTER_HANDSHAKE and not with_cert:
        return passed(
            TLS,
            subject,
            f"certificate valid for {probe.name}, ALPN {probe.alpn}; the server then closed "
            "the connection, presumably for want of a client certificate (pass --cert/--key)",
        )
    if verdict in (Verdict.CLIENT_CERT_REFUSED, Verdict.CLOSED_AFTER_HANDSHAKE):
        return failed(
            TLS,
            subject,
            f"certificate valid for {probe.name}, but the server refused the client "
            f"certificate --cert ({probe.detail or 'closed the connection'})",
            f"Pass as --cert/--key a server certificate of {local_dc} signed by the same CA "
            f"as {dc}'s servers: with ALPN, Consul always requires mutual TLS.",
        )
    if verdict is Verdict.NAME_MISMATCH:
        return failed(TLS, subject, f"the certificate is not valid for {probe.name}{got}", reissue)
    if verdict is Verdict.UNTRUSTED:
        return failed(
            TLS,
            subject,
            f"the certificate does not verify against --ca-file: {probe.detail}",
            f"Give --ca-file the CA that signed {dc}'s server certificates, or reissue them "
            "from the agent CA every datacenter shares.",
        )
    if verdict is Verdict.NO_ALPN:
        return failed(
            TLS,
            subject,
            f"certificate valid for {probe.name}, but the server selected no ALPN protocol "
            f"({ALPN} offered): not a Consul server's RPC port",
            f"Make the gateways of {dc} route {probe.name} to the servers' RPC port (8300), "
            "where Consul selects consul/rpc-multi.",
        )
    if verdict is Verdict.HANDSHAKE_REFUSED:
        if not with_cert and any(a in probe.detail.upper() for a in _CLIENT_CERT_ALERTS):
            return failed(
                TLS,
                subject,
                f"the server refused the handshake ({probe.detail}) before its name could be "
                "checked, as a TLS 1.2 server that requires a client certificate does",
                f"Pass --cert/--key (a server certificate of {local_dc}) so the handshake can "
                "complete.",
            )
        return failed(TLS, subject, f"the server refused the handshake ({probe.detail})", reissue)
    if verdict is Verdict.CLOSED:
        return failed(
            TLS,
            subject,
            f"the connection closed before the handshake finished ({probe.detail}): the "
            f"gateway has no route for {probe.name}, or no path to {dc}'s servers",
            route_fix,
        )
    if verdict is Verdict.UNREACHABLE:
        return failed(
            TLS,
            subject,
            f"cannot connect to the gateway: {probe.detail}",
            "Start the local gateway, or pass --gateway HOST:PORT of one that is reachable "
            "from here.",
        )
    return failed(  # TIMEOUT
        TLS,
        subject,
        f"no TLS answer: {probe.detail}",
        route_fix,
    )


async def tls_probe(
    host: str,
    port: int,
    name: str,
    context: ssl.SSLContext,
    timeout: float,
    *,
    with_cert: bool,
) -> Probe:
    """One handshake with SNI `name` through the gateway at host:port.

    Sans-I/O TLS (ssl.MemoryBIO) over a plain stream, so that the moments are told apart: the
    handshake, the certificate check, and what the server says after it. In TLS 1.3 the client
    finishes before the server has seen the client certificate; the server's verdict comes
    afterwards as a session ticket (accepted) or an alert (refused)."""
    gateway = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
    except OSError as error:
        return Probe(gateway, name, Verdict.UNREACHABLE, error.strerror or str(error))
    except TimeoutError:
        return Probe(gateway, name, Verdict.TIMEOUT, f"connecting took over {timeout:g}s")
    try:
        return await _handshake(reader, writer, gateway, name, context, timeout, with_cert)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    gateway: str,
    name: str,
    context: ssl.SSLContext,
    timeout: float,
    with_cert: bool,
) -> Probe:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)

    async def flush() -> None:
        data = outgoing.read()
        if data:
            writer.write(data)
            await writer.drain()

    async def fill() -> None:
        data = await reader.read(65536)
        if data:
            incoming.write(data)
        else:
            incoming.write_eof()

    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await flush()
                    await fill()
            await flush()
    except TimeoutError:
        return Probe(gateway, name, Verdict.TIMEOUT, f"no handshake within {timeout:g}s")
    except ssl.SSLCertVerificationError as error:
        return Probe(gateway, name, Verdict.UNTRUSTED, str(error.verify_message or error))
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError) as error:
        return Probe(gateway, name, Verdict.CLOSED, type(error).__name__)
    except ssl.SSLError as error:
        if "NO_APPLICATION_PROTOCOL" in _alert(error).upper():
            return Probe(gateway, name, Verdict.NO_ALPN, _alert(error))
        return Probe(gateway, name, Verdict.HANDSHAKE_REFUSED, _alert(error))

    names = tuple(certificate_names(tls.getpeercert()))
    alpn = tls.selected_alpn_protocol()
    version = tls.version()

    def seen(verdict: Verdict, detail: str = "") -> Probe:
        return Probe(gateway, name, verdict, detail, names, alpn, version)

    # Hostname verification by hand (the context has check_hostname off) so that a mismatch can
    # still show which names the certificate does carry.
    if not any(name_matches(pattern, name) for pattern in names):
        return seen(Verdict.NAME_MISMATCH)
    if alpn != ALPN:
        return seen(Verdict.NO_ALPN)
    if version != "TLSv1.3":
        # Before 1.3 the server checks the client certificate inside the handshake.
        return seen(Verdict.ACCEPTED)
    try:
        async with asyncio.timeout(POST_HANDSHAKE_WAIT):
            while True:
                try:
                    tls.read(1)
                    return seen(Verdict.ACCEPTED)  # the server spoke first: it accepted us
                except ssl.SSLWantReadError:
                    session = tls.session
                    if session is not None and session.has_ticket:
                        return seen(Verdict.ACCEPTED)
                    await fill()
    except TimeoutError:  # neither ticket nor alert: nothing refused us
        return seen(Verdict.ACCEPTED)
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError) as error:
        return seen(Verdict.CLOSED_AFTER_HANDSHAKE, type(error).__name__)
    except ssl.SSLError as error:
        alert = _alert(error)
        if any(a in alert.upper() for a in _CLIENT_CERT_ALERTS):
            refused = Verdict.CLIENT_CERT_REFUSED if with_cert else Verdict.CLIENT_CERT_DEMANDED
            return seen(refused, alert)
        return seen(Verdict.HANDSHAKE_REFUSED, alert)


def tls_context(options: DoctorOptions) -> ssl.SSLContext:
    """What a Consul server dialing another datacenter uses: the agent CA, its own server
    certificate as client certificate, one ALPN protocol. Raises ValueError naming the flag."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # checked by hand after the handshake; see _handshake
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=options.ca_file)
    except (ssl.SSLError, OSError) as error:
        raise ValueError(
            f"--ca-file {options.ca_file}: not a PEM CA certificate ({error})"
        ) from None
    if options.cert is not None and options.key is not None:
        try:
            context.load_cert_chain(options.cert, options.key)
        except (ssl.SSLError, OSError) as error:
            raise ValueError(
                f"--cert {options.cert} with --key {options.key}: not a matching PEM "
                f"certificate and key ({error})"
            ) from None
    context.set_alpn_protocols([ALPN])
    return context


def tls_subjects(dc: str, domain: str, servers: Outcome | None) -> tuple[list[str], list[Check]]:
    """The names to try for a remote datacenter: the any-server name, then each known
    server's own name (servers dial those, item 5); names that cannot exist are skipped."""
    try:
        names = [server_sni(dc, domain)]
    except ValueError as error:
        return [], [skipped(TLS, dc, f"no SNI name can be formed: {error}")]
    notes: list[Check] = []
    for node in server_nodes(servers) if isinstance(servers, list) else []:
        try:
            names.append(server_sni(dc, domain, node))
        except ValueError:
            notes.append(skipped(TLS, f"{node} in {dc}", "node name cannot be part of an SNI name"))
    return names, notes


def local_gateway_addresses(document: Outcome) -> list[tuple[str, int]]:
    """The local datacenter's wanfed gateways as its servers dial them: LAN best address
    (service Address, else node Address) and service Port, critical ones left out (§4)."""
    out: list[tuple[str, int]] = []
    for entry in _mesh_gateways(document):
        if not is_wanfed(entry) or "critical" in _check_statuses(entry):
            continue
        address = lan_address(entry)
        if address is not None and address not in out:
            out.append(address)
    return out


# --- the runner -----------------------------------------------------------------------------


def not_run(reason: str) -> list[Check]:
    return [skipped(check, "-", f"not run: {reason}") for check in CHECK_ORDER[1:]]


async def gather(
    config: ConsulConfig, options: DoctorOptions, context: ssl.SSLContext | None = None
) -> list[Check]:
    """Fetch what the checks need and run them; `context` is `tls_context(options)` (None
    when there is no --ca-file). Every request and probe is bounded by options.timeout."""
    from meshgw.control.consul import ConsulClient, ConsulRequestError

    results: list[Check] = []
    address = config.address
    async with ConsulClient(config, timeout=options.timeout) as client:

        async def fetch(path: str, dc: str | None = None) -> Outcome:
            try:
                return (await client.get(path, dc=dc)).body
            except ConsulRequestError as error:
                return Failure.of(error)

        agent_checks, identity, acls = check_agent(address, await fetch("/v1/agent/self"))
        results += agent_checks
        if identity is None or identity.datacenter is None:
            return results + not_run("the agent check failed, so its datacenter is unknown")
        local = identity.datacenter
        domain = identity.domain or DEFAULT_DOMAIN

        dcs_doc, fed_gateways, fed_states, local_gateways, local_servers = await asyncio.gather(
            fetch("/v1/catalog/datacenters"),
            fetch("/v1/internal/federation-states/mesh-gateways"),
            fetch("/v1/internal/federation-states"),
            fetch("/v1/health/service/mesh-gateway"),
            fetch("/v1/health/service/consul"),
        )
        dc_checks, datacenters = check_datacenters(address, identity, dcs_doc)
        results += dc_checks
        if datacenters is None:  # fall back on what the federation states know
            known = fed_gateways if isinstance(fed_gateways, Mapping) else {}
            datacenters = [local, *sorted(dc for dc in known if dc != local)]
        remote = [dc for dc in datacenters if dc != local]
        federation = fed_gateways if isinstance(fed_gateways, Mapping) else None

        async def ask_remote(dc: str) -> tuple[Outcome, Outcome | None, Outcome | None]:
            forwarding = await fetch("/v1/catalog/services", dc)
            if isinstance(forwarding, Failure) and forwarding.kind is not FailureKind.FORBIDDEN:
                # Every other ?dc= request would fail the same way.
                return forwarding, None, forwarding
            want_gateways = federation is None or dc not in federation
            servers, gateways = await asyncio.gather(
                fetch("/v1/health/service/consul", dc),
                fetch("/v1/health/service/mesh-gateway", dc) if want_gateways else _none(),
            )
            return forwarding, servers, gateways

        answers = dict(zip(remote, await asyncio.gather(*map(ask_remote, remote)), strict=True))

    # Gateways (2, 3).
    if isinstance(fed_gateways, Failure) and fed_gateways.kind is FailureKind.FORBIDDEN:
        results.append(request_failure(GATEWAYS, local, fed_gateways))
    catalogs: dict[str, Outcome] = {local: local_gateways}
    catalogs |= {dc: answer[2] for dc, answer in answers.items()}
    inventory = gateway_inventory(datacenters, fed_gateways, catalogs)
    for dc in datacenters:
        results += check_gateways(dc, inventory[dc], acls=acls)
    for dc in datacenters:
        results += check_wan_addresses(dc, inventory[dc])
    # Federation states (4).
    results += check_federation_states(local, datacenters, fed_states)
    # Forwarding (5).
    for dc in remote:
        results.append(check_forwarding(local, dc, answers[dc][0], options.timeout))
    if not remote:
        results.append(skipped(FORWARDING, local, "no remote datacenter is known"))
    # Names (6).
    servers: dict[str, Outcome | None] = {local: local_servers}
    servers |= {dc: answer[1] for dc, answer in answers.items()}
    for dc in datacenters:
        why = f"?dc={dc} requests fail, so {dc}'s servers cannot be listed"
        results += check_names(dc, servers.get(dc), why)
    # TLS through the local gateway (7).
    results += await tls_checks(local, domain, remote, local_gateways, servers, options, context)
    order = {name: i for i, name in enumerate(CHECK_ORDER)}
    return sorted(results, key=lambda c: order.get(c.check, len(order)))  # stable


async def _none() -> None:
    return None


async def tls_checks(
    local: str,
    domain: str,
    remote: Sequence[str],
    local_gateways: Outcome,
    servers: Mapping[str, Outcome | None],
    options: DoctorOptions,
    context: ssl.SSLContext | None,
) -> list[Check]:
    if context is None:
        return [
            skipped(
                TLS,
                "-",
                "skipped: no --ca-file, and a certificate cannot be checked for server.<dc>."
                f"{domain} without the CA that signed it (pass --ca-file consul-agent-ca.pem)",
            )
        ]
    if not remote:
        return [skipped(TLS, "-", "no remote datacenter to reach")]
    gateways = list(options.gateways) or local_gateway_addresses(local_gateways)
    if not gateways and isinstance(local_gateways, Failure):
        return [skipped(TLS, "-", f"cannot list {local}'s gateways ({local_gateways})")]
    if not gateways:
        return [
            skipped(
                TLS,
                "-",
                f"no healthy wanfed gateway of {local} in the catalog to test through "
                "(pass --gateway HOST:PORT)",
            )
        ]
    results: list[Check] = []
    targets: list[tuple[str, str, str, int]] = []  # dc, name, host, port
    for dc in remote:
        names, notes = tls_subjects(dc, domain, servers.get(dc))
        results += notes
        targets += [(dc, name, host, port) for name in names for host, port in gateways]
    limit = asyncio.Semaphore(MAX_PROBES)
    with_cert = options.cert is not None

    async def run(host: str, port: int, name: str) -> Probe:
        async with limit:
            return await tls_probe(host, port, name, context, options.timeout, with_cert=with_cert)

    probes = await asyncio.gather(*(run(host, port, name) for _, name, host, port in targets))
    for (dc, *_), probe in zip(targets, probes, strict=True):
        results.append(classify_probe(probe, dc, local, with_cert=with_cert))
    return results


# --- output ---------------------------------------------------------------------------------

MARKS = {Status.PASS: "PASS", Status.FAIL: "FAIL", Status.SKIP: "SKIP"}


def render_text(checks: Iterable[Check]) -> str:
    checks = list(checks)
    width = max((len(c.check) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"{MARKS[c.status]}  {c.check:<{width}}  {c.subject}: {c.detail}")
        if c.fix:
            lines.append(f"{'':4}  {'':<{width}}  fix: {c.fix}")
    counts = {s: sum(1 for c in checks if c.status is s) for s in Status}
    lines.append(
        f"{counts[Status.PASS]} passed, {counts[Status.FAIL]} failed, {counts[Status.SKIP]} skipped"
    )
    return "\n".join(lines)


def render_json(checks: Iterable[Check]) -> str:
    return json.dumps([c.to_json() for c in checks], indent=2)


# --- the command ----------------------------------------------------------------------------

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _usage(message: str) -> None:
    click.echo(f"meshgw: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def _options(
    gateways: Sequence[str],
    ca_file: str | None,
    cert: str | None,
    key: str | None,
    timeout: str,
) -> DoctorOptions:
    """Flags → options; raises ValueError with a one-line message naming the flag."""
    addresses = []
    for text in gateways:
        try:
            address = parse_address(text)
        except ValueError as error:
            raise ValueError(f"--gateway {text!r}: {error}") from None
        addresses.append((address.host, address.port))
    try:
        seconds = parse_seconds(timeout)
    except ValueError as error:
        raise ValueError(f"--timeout: {error}") from None
    if seconds <= 0:
        raise ValueError(f"--timeout {timeout!r}: give a positive number of seconds")
    if (cert is None) != (key is None):
        raise ValueError("--cert and --key go together: give both, or neither")
    if cert is not None and ca_file is None:
        raise ValueError(
            "--cert/--key need --ca-file: the TLS check verifies the servers against that CA"
        )
    for flag, path in (("--ca-file", ca_file), ("--cert", cert), ("--key", key)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")
    return DoctorOptions(tuple(addresses), ca_file, cert, key, seconds)


@click.command("doctor")
@click.option(
    "--consul",
    metavar="URL",
    help="Consul agent HTTP address [CONSUL_HTTP_ADDR, else http://127.0.0.1:8500].",
)
@click.option(
    "--token-file",
    metavar="PATH",
    help="File holding the ACL token [CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE].",
)
@click.option(
    "--gateway",
    "gateways",
    multiple=True,
    metavar="HOST:PORT",
    help="Local gateway to run the TLS check through (repeatable) [the local datacenter's "
    "wanfed gateways from the catalog, at their LAN address].",
)
@click.option(
    "--ca-file",
    metavar="PATH",
    help="CA of the servers' certificates (consul-agent-ca.pem); without it the TLS check is "
    "skipped.",
)
@click.option(
    "--cert",
    metavar="PATH",
    help="Client certificate for the TLS check: a server certificate of the local datacenter, "
    "as a Consul server presents.",
)
@click.option("--key", metavar="PATH", help="Private key of --cert.")
@click.option(
    "--timeout",
    metavar="SECONDS",
    default="5",
    show_default=True,
    help="Bound on each Consul request and TLS handshake.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print a JSON list of {check, subject, status, detail, fix}.",
)
def doctor_command(
    consul: str | None,
    token_file: str | None,
    gateways: tuple[str, ...],
    ca_file: str | None,
    cert: str | None,
    key: str | None,
    timeout: str,
    as_json: bool,
) -> None:
    """Check a WAN federation via mesh gateways, the way its bootstrap checklist does.

    Asks the Consul agent (and, through a local gateway, the remote servers) whether every
    datacenter has healthy wanfed gateways with WAN addresses, federation states, working ?dc=
    forwarding, dot-free names and server certificates valid for their names. Exit status: 0
    when nothing failed (skips allowed), 1 when a check failed, 2 for a usage error.
    """
    from meshgw.control.consul import ConsulConfig, ConsulConfigError

    try:
        config = ConsulConfig.from_env(address=consul, token_file=token_file)
        options = _options(gateways, ca_file, cert, key, timeout)
        context = tls_context(options) if options.ca_file is not None else None
    except (ConsulConfigError, ValueError) as error:
        _usage(str(error))
        return
    try:
        checks = asyncio.run(gather(config, options, context))
    except KeyboardInterrupt:
        sys.exit(130)
    click.echo(render_json(checks) if as_json else render_text(checks))
    sys.exit(EXIT_FAILED if any(c.status is Status.FAIL for c in checks) else EXIT_OK)
