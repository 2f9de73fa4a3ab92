"""`meshgw routes`: the table a gateway with these settings would build, printed, as JSON, or
explained name by name.

The table is built as the gateway builds it, from the gateway's own sources merged by
`topology.Sources`: the settings' part, the primary_gateways bootstrap, Consul discovery when the
gateway would use Consul (--consul, CONSUL_HTTP_ADDR or --register, as for `meshgw run`), and the
addresses of the host names they give. Consul's sources run until each has answered or failed
once (control/snapshot.py), within --timeout; host names are then resolved with what is left of
it (at least a second). A source that failed or never answered is named on stderr, with the
ACL permission a 403 names; the table shows what the others gave. Without the agent's identity
(/v1/agent/self) there is no table: that is one line on stderr and exit status 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshgw.control.snapshot import Snapshot, SourceReport
from meshgw.routing import RouteTable, describe
from meshgw.settings import Settings
from meshgw.topology import Sources
from meshgw.wire.names import normalize_host_name

if TYPE_CHECKING:
    from meshgw.control.consul.config import ConsulConfig

__all__ = ["RoutesError", "RoutesView", "build_view", "consul_config", "explain", "render_text"]

DEFAULT_TIMEOUT = 10.0
MIN_RESOLVE_TIME = 1.0  # host names get at least this long, even after a slow Consul


class RoutesError(Exception):
    """No table can be shown: one line naming the cause and the fix."""


@dataclass(frozen=True)
class RoutesView:
    table: RouteTable
    consul: str | None = None  # the agent asked, if any
    sources: SourceReport | None = None
    timeout: float = DEFAULT_TIMEOUT
    unresolved: tuple[str, ...] = ()

    def warnings(self) -> list[str]:
        """One line per source that failed, one for those that never answered, one for host
        names that do not resolve: what the table lacks, and why."""
        found = []
        sources = self.sources or SourceReport()
        for name, error in sources.failed.items():
            found.append(f"Consul source {name!r} failed: {error}; its routes are missing")
        if sources.pending:
            names = ", ".join(repr(name) for name in sources.pending)
            found.append(
                f"no answer within {self.timeout:g}s from Consul source(s) {names}; their "
                "routes are missing (raise --timeout if Consul is only slow)"
            )
        if self.unresolved:
            found.append(
                f"host name(s) {', '.join(self.unresolved)} did not resolve: their endpoints "
                "show as not resolved yet"
            )
        return found

    def to_json(self) -> dict[str, Any]:
        document = self.table.to_json()
        if self.sources is not None:
            document["consul"] = {
                "address": self.consul,
                "answered": list(self.sources.answered),
                "failed": dict(self.sources.failed),
                "pending": list(self.sources.pending),
            }
        document["unresolved"] = list(self.unresolved)
        return document


def consul_config(settings: Settings) -> ConsulConfig | None:
    """How the gateway would reach Consul, or None when it would not use Consul; raises
    ConsulConfigError naming the setting or variable."""
    if settings.consul is None and not settings.register:
        return None
    from meshgw.control.consul.config import ConsulConfig

    return ConsulConfig.from_env(
        address=settings.consul, token_file=settings.token_file, ca_file=settings.ca_file
    )


async def build_view(
    settings: Settings,
    config: ConsulConfig | None,
    timeout: float = DEFAULT_TIMEOUT,
    names: Sequence[str] = (),
) -> RoutesView:
    """The table from the gateway's sources, each run once. `names`: SNI names to be
    explained, whose local services are demanded when services are watched on demand.
    Raises RoutesError when there is no table to show."""
    from meshgw.control.bootstrap import PrimaryGateways

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    snapshot = Snapshot(
        Sources(
            datacenter=settings.dc, domain=settings.domain, expose_servers=settings.expose_servers
        )
    )
    snapshot.publish(settings.static_topology())
    report = None
    with _quiet_logs(), contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            if settings.primary_gateway and settings.primary_dc:
                addresses = [(a.host, a.port) for a in settings.primary_gateway]
                interval = settings.primary_gateways_interval
                primary = PrimaryGateways(
                    settings.primary_dc, addresses, interval, snapshot.publish
                )
                await primary.refresh()
    with _quiet_logs():
        if config is not None:
            report = await _discover(snapshot, settings, config, (timeout, deadline), names)
        left = max(deadline - loop.time(), MIN_RESOLVE_TIME)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(left):
                await snapshot.resolve()
    if snapshot.topology is None:
        raise RoutesError("the local datacenter is unknown: set --dc (or reach a Consul agent)")
    return RoutesView(
        RouteTable.build(snapshot.topology),
        config.address if config is not None else None,
        report,
        timeout,
        tuple(snapshot.unresolved),
    )


async def _discover(
    snapshot: Snapshot,
    settings: Settings,
    config: ConsulConfig,
    bound: tuple[float, float],
    names: Sequence[str],
) -> SourceReport:
    """Consul discovery as the gateway runs it (app/controlplane.py), once, until `bound`:
    (the timeout, the loop time it ends at)."""
    from meshgw.app.controlplane import discovery_for
    from meshgw.control.consul.client import ConsulClient

    timeout, deadline = bound
    # No single request may outlast the whole.
    async with ConsulClient(config, timeout=timeout) as client:
        discovery = discovery_for(settings, client, snapshot.publish, snapshot.on_health)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await snapshot.discover(discovery, names)
    report = snapshot.report
    if discovery.identity is None:
        # Nothing else ran: without the agent's datacenter there is no Consul view at all.
        error = report.failed.get("agent-self")
        if error is not None:
            raise RoutesError(error)
        raise RoutesError(
            f"Consul at {config.address} did not answer GET /v1/agent/self within "
            f"{timeout:g}s (raise --timeout if it is only slow)"
        )
    return report


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """The sources log what goes wrong for a running gateway; here the view's own warnings say
    it, once. A handler on meshgw's logger keeps Python's last-resort one from printing."""
    logger = logging.getLogger("meshgw")
    handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


# --- output ---------------------------------------------------------------------------------


def explain(table: RouteTable, raw_names: Sequence[str]) -> tuple[list[str], bool]:
    """One line per name, and whether any is refused."""
    lines, refused = [], False
    for raw in raw_names:
        name = normalize_host_name(raw)
        if name is None:
            lines.append(f"{raw}: refused: not a valid DNS host name")
            refused = True
            continue
        line = table.explain(name)
        refused |= ": refused: " in line
        lines.append(line)
    return lines, refused


def render_text(view: RoutesView) -> list[str]:
    table = view.table
    topology = table.topology
    lines = [
        f"datacenter {topology.datacenter}, domain {topology.domain}, "
        f"trust domain {topology.trust_domain or '(unknown)'}"
    ]
    if view.sources is not None:
        sources = view.sources
        counts = [f"{len(sources.answered)} source(s) answered"]
        if sources.failed:
            counts.append(f"{len(sources.failed)} failed")
        if sources.pending:
            counts.append(f"{len(sources.pending)} did not answer")
        lines.append(f"from Consul at {view.consul}: {', '.join(counts)}")
    for route in table.routes():
        targets = ", ".join(describe(t) for t in route.cluster.targets) or "no endpoints"
        lines.append(f"  {route.pattern:<60} {route.kind.value:<21} -> {targets}")
    for name, reason in sorted(table.refused.items()):
        lines.append(f"  {name:<60} {'refused':<21} ({reason})")
    lines += [f"  note: {note}" for note in table.notes]
    lines += [f"  skipped: {skipped}" for skipped in table.skipped]
    return lines
