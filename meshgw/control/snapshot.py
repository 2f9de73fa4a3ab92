"""The gateway's sources, run once: what a gateway would route, without running one.

`meshgw routes` builds the table a gateway with the same settings would build. The sources are the
gateway's own -- `Discovery` against the Consul agent, the primary_gateways bootstrap, the resolver
of host names -- publishing into the same `Sources`, so precedence is the gateway's. They run until
every source has answered (or failed) once, then stop:

- Discovery: until `Discovery.pending()` is empty. Every answer and every failure goes through
  its watches' health hook (`on_health`); the check runs when the waiting task next runs, after
  the step in which a handler started the watches its answer leads to (a service's subsets, a
  datacenter's gateways, a peering's imports), so those are waited for too. A source that failed
  once is not retried: its failure is the answer.
- Services watched on demand (a catalog larger than the watch limit): those the given SNI names
  ask for are demanded, as a connection with that name would, and waited for in the same way.
- Host names: resolved once, all at once.

The caller bounds the whole with a timeout; what has not answered by then is `pending`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

from meshgw.control.discovery import Discovery
from meshgw.control.resolver import NameResolver
from meshgw.topology import Sources, Topology, TopologyPart, host_names
from meshgw.wire.names import ServiceName, parse_sni

__all__ = ["Snapshot", "SourceReport"]

STOP_RETRY = 0.1  # seconds between cancellations of discovery, should one be swallowed


@dataclass(frozen=True)
class SourceReport:
    """How the Consul sources fared: each source by its watch name."""

    answered: tuple[str, ...] = ()
    failed: dict[str, str] = field(default_factory=dict)  # source → the error, as logged
    pending: tuple[str, ...] = ()  # started, but no answer yet when time ran out

    @classmethod
    def of(cls, discovery: Discovery) -> SourceReport:
        health = discovery.watches.health
        return cls(
            answered=tuple(sorted(name for name, h in health.items() if h.ok)),
            failed={name: h.error or "failed" for name, h in sorted(health.items()) if not h.ok},
            pending=tuple(sorted(discovery.pending())),
        )


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait for it to end. A cancellation that meets a request's own timeout
    can be swallowed (the HTTP client turns both into one TimeoutError, which the watches retry
    after), so it is repeated until the task is done."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_RETRY)
    if not task.cancelled():
        task.exception()  # retrieved: discovery's own failure is re-raised by _settled


class Snapshot:
    """Publish the parts of the sources into `sources`; `topology` is the merge so far."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self.topology: Topology | None = None
        self.unresolved: list[str] = []  # host names the resolver could not resolve
        self.report = SourceReport()  # how the Consul sources fared, once discover() returns
        self._progress = asyncio.Event()

    def publish(self, part: TopologyPart) -> None:
        topology = self.sources.update(part)
        if topology is not None:
            self.topology = topology

    def on_health(self, source: str, ok: bool) -> None:
        """Discovery's health hook: a source answered or failed."""
        self._progress.set()

    async def discover(self, discovery: Discovery, names: Iterable[str] = ()) -> None:
        """Run `discovery` (made with this snapshot's `publish` and `on_health`) until every
        source has answered or failed once; then, if services are watched on demand, demand
        those the SNI `names` ask for and wait for them too. Stops discovery on return,
        cancellation or timeout."""
        task = asyncio.get_running_loop().create_task(discovery.run(), name="discovery")
        try:
            await self._settled(discovery, task)
            asked = [discovery.demand(service) for service in self._on_demand(names)]
            if any(asked):
                await self._settled(discovery, task)
        finally:
            self.report = SourceReport.of(discovery)  # before stopping forgets the watches
            await _stop(task)

    async def _settled(self, discovery: Discovery, task: asyncio.Task[None]) -> None:
        while discovery.pending():
            self._progress.clear()
            waiter = asyncio.ensure_future(self._progress.wait())
            try:
                await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if task.done():
                task.result()  # discovery never ends by itself: re-raise what ended it
                return

    def _on_demand(self, names: Iterable[str]) -> list[str]:
        """The local services `names` ask for, when services are watched only on demand."""
        topology = self.topology
        if topology is None or not topology.on_demand:
            return []
        services = []
        for name in names:
            parsed = parse_sni(name, domain=topology.domain, trust_domain=topology.trust_domain)
            if isinstance(parsed, ServiceName) and parsed.datacenter == topology.datacenter:
                services.append(parsed.service)
        return services

    async def resolve(self) -> None:
        """Resolve the host names of the topology once, as the gateway's resolver does."""
        if self.topology is None:
            return
        names = host_names(self.topology)
        if not names:
            return
        self.unresolved = sorted(names)  # until they resolve (a timeout may come first)
        resolver = NameResolver(self.publish)
        resolver.follow(names)
        await resolver.resolve_now()
        self.unresolved = sorted(names - resolver.addresses.keys())
