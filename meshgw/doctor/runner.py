"""The runner: `gather` fetches the documents, runs the checks and the TLS probes; and the
report's text and JSON renderings."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from meshgw.doctor.checks import (
    AGENT,
    CHECK_ORDER,
    FORWARDING,
    GATEWAYS,
    PEERING,
    TLS,
    Check,
    Failure,
    FailureKind,
    Outcome,
    Status,
    check_agent,
    check_datacenters,
    check_federation_states,
    check_forwarding,
    check_gateways,
    check_names,
    check_wan_addresses,
    gateway_inventory,
    is_wanfed,
    passed,
    request_failure,
    skipped,
)
from meshgw.doctor.gateway_settings import GatewaySettings, check_settings
from meshgw.doctor.passage import PassageProbe, passage_probe
from meshgw.doctor.peering import (
    PeeringDocuments,
    PeeringName,
    check_passages,
    exported_services,
    imports_wanted,
    missing_gateways,
    peering_gateways,
    plan_peering,
)
from meshgw.doctor.tls import (
    DoctorOptions,
    Probe,
    classify_probe,
    local_gateway_addresses,
    tls_probe,
    tls_subjects,
)
from meshgw.wire.names import DEFAULT_DOMAIN

if TYPE_CHECKING:
    from meshgw.control.consul.config import ConsulConfig

__all__ = [
    "gather",
    "render_json",
    "render_text",
]

MAX_PROBES = 16  # concurrent TLS probes


# --- the runner -----------------------------------------------------------------------------


def not_run(reason: str) -> list[Check]:
    after_agent = CHECK_ORDER[CHECK_ORDER.index(AGENT) + 1 :]
    return [skipped(check, "-", f"not run: {reason}") for check in after_agent]


def servers_federate_through_gateways(agent: Outcome) -> bool | None:
    """What /v1/agent/self says: True for a server with wanfed on, False for a server without,
    None for a client agent (it does not carry the servers' switch) or no answer."""
    if not isinstance(agent, Mapping) or not isinstance(agent.get("DebugConfig"), Mapping):
        return None
    debug = agent["DebugConfig"]
    if debug.get("ServerMode") is not True:
        return None
    return debug.get("ConnectMeshGatewayWANFederationEnabled") is True


async def gather(
    config: ConsulConfig,
    options: DoctorOptions,
    context: ssl.SSLContext | None = None,
    gateway_settings: GatewaySettings | None = None,
) -> list[Check]:
    """Fetch what the checks need and run them; `context` is `tls_context(options)` (None
    when there is no --server-ca-file), `gateway_settings` what `load_gateway_settings` found.
    Every request and probe is bounded by options.timeout."""
    results = await _gather(config, options, context, gateway_settings)
    order = {name: i for i, name in enumerate(CHECK_ORDER)}
    return sorted(results, key=lambda c: order.get(c.check, len(order)))  # stable


async def _gather(
    config: ConsulConfig,
    options: DoctorOptions,
    context: ssl.SSLContext | None,
    gateway_settings: GatewaySettings | None,
) -> list[Check]:
    from meshgw.control.consul.client import ConsulClient
    from meshgw.control.consul.errors import ConsulRequestError

    results: list[Check] = []
    address = config.address
    async with ConsulClient(config, timeout=options.timeout) as client:

        async def fetch(
            path: str, dc: str | None = None, params: Mapping[str, str] | None = None
        ) -> Outcome:
            try:
                return (await client.get(path, dc=dc, params=params)).body
            except ConsulRequestError as error:
                return Failure.of(error)

        agent_doc = await fetch("/v1/agent/self")
        agent_checks, identity, acls = check_agent(address, agent_doc)
        results += agent_checks
        if identity is None or identity.datacenter is None:
            if gateway_settings is not None:
                results += check_settings(gateway_settings, wanfed_datacenter=None)
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
        # Peering (8), while the client is open.
        peering = await peering_checks(fetch, local, options)

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
    # The gateway's own settings (0), knowing whether this datacenter federates via gateways.
    if gateway_settings is not None:
        wanfed = servers_federate_through_gateways(agent_doc)
        if not wanfed and any(is_wanfed(e) for e in inventory[local].entries or []):
            wanfed = True
        results += check_settings(gateway_settings, wanfed_datacenter=wanfed)
    return results + peering


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
                "skipped: no --server-ca-file, and a certificate cannot be checked for "
                f"server.<dc>.{domain} without the CA that signed it (pass --server-ca-file "
                "consul-agent-ca.pem)",
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


Fetch = Callable[..., Awaitable[Outcome]]  # fetch(path, dc=None, params=None)


async def peering_checks(fetch: Fetch, local: str, options: DoctorOptions) -> list[Check]:
    """Check 8: fetch what `plan_peering` reads, then probe each peering name on each local
    mesh gateway (or each --gateway)."""
    documents = PeeringDocuments(
        *await asyncio.gather(
            fetch("/v1/peerings"),
            fetch("/v1/config/mesh/mesh"),
            fetch("/v1/exported-services"),
            fetch("/v1/connect/ca/roots"),
        )
    )
    wanted = imports_wanted(documents.peerings)
    services = sorted({export.service for export in exported_services(documents.exports)})
    imports, chains = await asyncio.gather(
        asyncio.gather(
            *(fetch(f"/v1/health/connect/{svc}", params={"peer": peer}) for peer, svc in wanted)
        ),
        asyncio.gather(*(fetch(f"/v1/discovery-chain/{svc}") for svc in services)),
    )
    documents.imports = dict(zip(wanted, imports, strict=True))
    documents.chains = dict(zip(services, chains, strict=True))
    plan = plan_peering(local, documents)
    if not plan.names:
        # The check ran and found nothing to route; a document it could not read is a skip.
        nothing = "no peering and nothing exported to peers: nothing routes through the gateways"
        return plan.checks or [passed(PEERING, local, nothing)]
    gateways = list(options.gateways) or await _local_mesh_gateways(fetch)
    if not gateways:
        return [*plan.checks, missing_gateways(local, plan)]
    return plan.checks + await _probe_names(plan.names, gateways, options.timeout)


async def _local_mesh_gateways(fetch: Fetch) -> list[tuple[str, int]]:
    """Every mesh gateway of this datacenter, whatever its service name."""
    from meshgw.control.remote_gateways import GATEWAY_KIND_FILTER

    listing = await fetch("/v1/catalog/services", params={"filter": GATEWAY_KIND_FILTER})
    names = sorted(listing) if isinstance(listing, Mapping) else ["mesh-gateway"]
    documents = await asyncio.gather(*(fetch(f"/v1/health/service/{name}") for name in names))
    return peering_gateways(documents)


async def _probe_names(
    names: Sequence[PeeringName], gateways: Sequence[tuple[str, int]], timeout: float
) -> list[Check]:
    limit = asyncio.Semaphore(MAX_PROBES)

    async def run(name: PeeringName, host: str, port: int) -> PassageProbe:
        async with limit:
            return await passage_probe(host, port, name.sni, timeout, name.alpn)

    probes = await asyncio.gather(
        *(run(name, host, port) for name in names for host, port in gateways)
    )
    results: list[Check] = []
    for i, name in enumerate(names):
        results += check_passages(name, probes[i * len(gateways) : (i + 1) * len(gateways)])
    return results


# --- output ---------------------------------------------------------------------------------

MARKS = {Status.PASS: "PASS", Status.WARN: "WARN", Status.FAIL: "FAIL", Status.SKIP: "SKIP"}


def render_text(checks: Iterable[Check]) -> str:
    checks = list(checks)
    width = max((len(c.check) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"{MARKS[c.status]}  {c.check:<{width}}  {c.subject}: {c.detail}")
        if c.fix:
            lines.append(f"{'':4}  {'':<{width}}  fix: {c.fix}")
    counts = {s: sum(1 for c in checks if c.status is s) for s in Status}
    warnings = f"{counts[Status.WARN]} warned, " if counts[Status.WARN] else ""
    lines.append(
        f"{counts[Status.PASS]} passed, {warnings}{counts[Status.FAIL]} failed, "
        f"{counts[Status.SKIP]} skipped"
    )
    return "\n".join(lines)


def render_json(checks: Iterable[Check]) -> str:
    return json.dumps([c.to_json() for c in checks], indent=2)
