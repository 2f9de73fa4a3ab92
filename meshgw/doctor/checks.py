"""The report's `Check` values, request failures as values, and the pure checks 1-6 (agent,
datacenters, gateways, WAN addresses, federation states, forwarding, names).

Where the gateways come from: the federation states' mesh-gateway list
(/v1/internal/federation-states/mesh-gateways), because it is exactly what a server's gateway
locator reads (docs/consul.md#gateway-locator), it lists gateways by Kind whatever their service
name, and it needs no cross-datacenter forwarding -- the very thing that is broken while federation
bootstraps. A datacenter missing from that list (or the whole list, when unavailable) is looked up
in its catalog with /v1/health/service/mesh-gateway?dc=X, to tell "nothing registered" from
"registered, but the servers do not know it".
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshgw.control.catalog import (
    WAN_FEDERATION_META,
    AgentIdentity,
    CatalogError,
    agent_identity,
    wan_address,
)
from meshgw.wire.names import (
    DEFAULT_DOMAIN,
    is_valid_datacenter,
    is_valid_node_name,
)

if TYPE_CHECKING:
    from meshgw.control.consul.errors import ConsulRequestError

__all__ = [
    "Check",
    "Failure",
    "FailureKind",
    "Inventory",
    "Status",
    "check_agent",
    "check_datacenters",
    "check_federation_states",
    "check_forwarding",
    "check_gateways",
    "check_names",
    "check_wan_addresses",
    "gateway_inventory",
]

# The check names, in report order.
SETTINGS = "settings"  # the gateway's own settings, when given (gateway_settings.py)
AGENT = "agent"
GATEWAYS = "gateways"
WAN_ADDRESS = "wan-address"
FEDERATION_STATE = "federation-state"
FORWARDING = "forwarding"
NAMES = "names"
TLS = "tls"
PEERING = "peering"
CHECK_ORDER = (
    SETTINGS, AGENT, GATEWAYS, WAN_ADDRESS, FEDERATION_STATE, FORWARDING, NAMES, TLS, PEERING,
)  # fmt: skip

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
    WARN = "warn"  # works, but something makes a share of it fail: does not fail the run
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report. `fix` is one sentence, for failures and warnings only."""

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


def warned(check: str, subject: str, detail: str, fix: str) -> Check:
    return Check(check, subject, Status.WARN, detail, fix)


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
        from meshgw.control.consul import errors

        kinds = (
            (errors.ConsulForbidden, FailureKind.FORBIDDEN),
            (errors.ConsulNotFound, FailureKind.NOT_FOUND),
            (errors.ConsulHTTPError, FailureKind.HTTP),
            (errors.ConsulTimeout, FailureKind.TIMEOUT),
            (errors.ConsulBadResponse, FailureKind.BAD_RESPONSE),
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
    # A server needs the feature switched on; a client agent does not care
    # (docs/consul.md#server-settings).
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


def mesh_gateways(document: Any) -> list[Mapping[str, Any]]:
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
            out[dc] = Inventory(mesh_gateways(catalog), "catalog", in_fed)
    return out


def is_wanfed(entry: Mapping[str, Any]) -> bool:
    meta = (entry.get("Service") or {}).get("Meta") or {}
    return isinstance(meta, Mapping) and meta.get(WAN_FEDERATION_META) == "1"


def check_statuses(entry: Mapping[str, Any]) -> list[str]:
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
    usable = [e for e in wanfed if "critical" not in check_statuses(e)]
    passing = [e for e in usable if all(s == "passing" for s in check_statuses(e))]
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
    """/v1/catalog/services?dc=<dc>: a request the servers must forward
    (docs/consul.md#verification)."""
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
