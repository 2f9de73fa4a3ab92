"""A whole demo federation on loopback: certificates, simulated servers and agents, gateway
processes that learn the federation from the agents, rounds of paths.

Start order: certificates, then the servers and an agent per datacenter (in this process; their
ports are then known), then every gateway at once on ports chosen beforehand (a secondary's
gateways are told the primary's, as Consul's primary_gateways). Each gateway asks its agent for
its datacenter, servers and the remote gateways, and registers itself; the start is over when
every gateway's route table holds, from Consul, every local server and every remote datacenter's
gateways. A gateway that loses its port to somebody else in between makes the whole set restart
on new ports (bounded).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from meshgw.demo.agents import Agents, ServerEntry
from meshgw.demo.gateways import (
    Counters,
    GatewayChild,
    GatewayStartError,
    agent_settings,
    missing_routes,
    read_counters,
    write_config,
)
from meshgw.demo.layout import (
    ADMIN_PORT,
    DOMAIN,
    GATEWAY_PORT,
    SERVER_PORT,
    GatewaySpec,
    Pki,
    ServerSpec,
    agent_host,
    datacenter_names,
    free_port,
    gateway_host,
    make_pki,
    server_host,
    spread_loopback_works,
)
from meshgw.demo.protocols import ALPN_PACKET, ALPN_PROTOCOLS
from meshgw.demo.servers import Exchange, PacketSession, PathResult, SimServer

START_ATTEMPTS = 3
START_TIMEOUT = 30.0  # seconds for every gateway to listen (2 cores, several Python starts)
DISCOVERY_TIMEOUT = 30.0  # for every gateway to learn the federation from its agent
EXCHANGE_TIMEOUT = 5.0  # per connection: connect, handshake and exchange through two gateways
ACCESS_LOG_WAIT = 3.0  # for the dialing gateway's access line after the connection closed
PARALLEL_PATHS = 8  # paths probed at once: enough to be quick, few enough for honest RTTs
NO_GATEWAY = "no gateway in the federation state (Remote DC has no server currently reachable)"


@dataclass(frozen=True, slots=True)
class Shape:
    datacenters: int = 3
    servers_per_dc: int = 3
    gateways_per_dc: int = 2


class DiscoveryError(Exception):
    """Gateways that did not learn the federation from their agents in time."""


Expected = tuple[Mapping[str, set[str]], set[str]]  # routes (match → addresses), names refused


async def wait_for_routes(
    children: list[GatewayChild],
    expected: Callable[[GatewayChild], Expected],
    timeout: float,
) -> None:
    """Until every running gateway's table routes exactly what `expected` says, from Consul,
    and refuses what it says; DiscoveryError naming what is missing where, after `timeout`."""

    async def wait(child: GatewayChild) -> str | None:
        want, refused = expected(child)
        try:
            await child.wait_routes(lambda doc: not missing_routes(doc, want, refused), timeout)
        except TimeoutError:
            missing = missing_routes(child.last_routes or {}, want, refused)
            return f"{child.name}: " + "; ".join(missing[:3])
        return None

    running = [child for child in children if child.running]
    outcomes = await asyncio.gather(*map(wait, running), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome  # a gateway exited meanwhile
    problems = [p for p in outcomes if isinstance(p, str)]
    if problems:
        raise DiscoveryError(
            f"gateways did not learn their routes from their agents within {timeout:g} s: "
            + " | ".join(problems)
        )


async def start_gateways(
    build: Callable[[bool], list[GatewayChild]], progress: Callable[[str], None]
) -> list[GatewayChild]:
    """Start the gateways `build(well_known_ports)` makes (their configs written) and wait until
    each listens. One that loses its port to somebody else between the look and the bind makes
    the whole set start again on ports the kernel picks (bounded)."""
    for attempt in range(START_ATTEMPTS):
        children = build(attempt == 0)
        for child in children:
            await child.start()
        outcomes = await asyncio.gather(
            *(child.wait_listening(START_TIMEOUT) for child in children),
            return_exceptions=True,
        )
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if not errors:
            progress(f"gateways: {len(children)} `meshgw run` processes, all listening")
            return children
        await asyncio.gather(*(child.stop() for child in children))
        start_errors = [e for e in errors if isinstance(e, GatewayStartError)]
        retry = start_errors and all(e.address_in_use for e in start_errors)
        if not retry or attempt == START_ATTEMPTS - 1:
            raise errors[0]
        progress("gateways: a port was taken meanwhile; starting them again on other ports")
    raise AssertionError("unreachable")


class Federation:
    def __init__(self, shape: Shape, root: Path) -> None:
        self.shape = shape
        self.root = root
        self.datacenters = datacenter_names(shape.datacenters)
        self.primary = self.datacenters[0]
        self.spread = spread_loopback_works()
        self.pki: Pki | None = None
        self.servers: list[SimServer] = []
        self.agents = Agents(self.datacenters)
        self.gateways: dict[str, list[GatewayChild]] = {dc: [] for dc in self.datacenters}
        self._cursors: dict[str, Iterator[int]] = {}

    # --- start and stop -----------------------------------------------------------------------

    @property
    def children(self) -> list[GatewayChild]:
        return [child for dc in self.datacenters for child in self.gateways[dc]]

    def gateway_at(self, address: str) -> GatewayChild | None:
        return next((c for c in self.children if c.spec.listen == address), None)

    def gateway_named(self, address: str) -> str:
        child = self.gateway_at(address)
        return child.name if child is not None else address

    async def start(self, progress: Callable[[str], None]) -> None:
        nodes = [
            (dc, f"node-{i}") for dc in self.datacenters for i in range(self.shape.servers_per_dc)
        ]
        self.pki = pki = make_pki(self.root / "certs", nodes)
        progress(f"certificates: CA and {len(nodes)} server certificates in {self.root / 'certs'}")
        for k, dc in enumerate(self.datacenters):
            peers = []
            for i in range(self.shape.servers_per_dc):
                cert, key = pki.servers[(dc, f"node-{i}")]
                spec = ServerSpec(f"node-{i}", dc, server_host(k, i, self.spread), cert, key)
                server = SimServer(spec, pki.ca, self.datacenters)
                await server.start(SERVER_PORT if self.spread else None)
                peers.append(server)
            for server in peers:
                server.peers = peers
            self.servers += peers
        progress(f"servers: {len(self.servers)} simulated Consul servers in this process")
        entries = {
            dc: [
                ServerEntry(s.spec.node, s.spec.host, s.port)
                for s in self.servers
                if s.spec.dc == dc
            ]
            for dc in self.datacenters
        }
        hosts = {dc: agent_host(k, self.spread) for k, dc in enumerate(self.datacenters)}
        await self.agents.start(hosts, entries, well_known_ports=self.spread)
        urls = ", ".join(f"{dc} {self.agents.url(dc)}" for dc in self.datacenters)
        progress(f"agents: a simulated Consul agent API per datacenter: {urls}")
        await start_gateways(self._build_gateways, progress)
        await self.wait_discovered()

    def _gateway_specs(self, well_known_ports: bool) -> dict[str, list[GatewaySpec]]:
        specs: dict[str, list[GatewaySpec]] = {}
        for k, dc in enumerate(self.datacenters):
            for i in range(self.shape.gateways_per_dc):
                host = gateway_host(k, i, self.spread)
                port = free_port(host, GATEWAY_PORT if well_known_ports else None)
                admin = free_port(host, ADMIN_PORT if well_known_ports else None)
                stem = f"{dc}-gw-{i}"
                specs.setdefault(dc, []).append(
                    GatewaySpec(
                        dc,
                        i,
                        host,
                        port,
                        admin,
                        self.root / "gateways" / f"{stem}.toml",
                        self.root / "logs" / f"{stem}.log",
                    )
                )
        return specs

    def _build_gateways(self, well_known_ports: bool) -> list[GatewayChild]:
        specs = self._gateway_specs(well_known_ports and self.spread)
        primary_gateways = [g.listen for g in specs[self.primary]]
        for dc, dc_specs in specs.items():
            primary = None if dc == self.primary else (self.primary, primary_gateways)
            for spec in dc_specs:
                settings = agent_settings(
                    spec, self.agents.url(dc), expose_servers=True, primary=primary
                )
                write_config(spec, settings)
        self.gateways = {dc: [GatewayChild(s) for s in specs[dc]] for dc in self.datacenters}
        return self.children

    def expected_routes(self, dc: str) -> dict[str, set[str]]:
        """What a gateway of dc must route, learned from its agent: each local server by name,
        and every other datacenter's servers to that datacenter's running gateways."""
        routes = {s.spec.sni: {s.address} for s in self.servers if s.spec.dc == dc}
        for other in self.datacenters:
            if other != dc:
                running = {g.spec.listen for g in self.gateways[other] if g.running}
                routes[f"*.server.{other}.{DOMAIN}"] = running
        return routes

    async def wait_discovered(self, timeout: float = DISCOVERY_TIMEOUT) -> None:
        """Until every running gateway routes what `expected_routes` says, learned from Consul."""
        await wait_for_routes(
            self.children, lambda c: (self.expected_routes(c.spec.dc), set()), timeout
        )

    async def stop_gateways(self, children: list[GatewayChild]) -> list[int | None]:
        return list(await asyncio.gather(*(child.stop() for child in children)))

    async def close(self) -> None:
        await self.stop_gateways(self.children)
        for server in self.servers:
            await server.close()
        await self.agents.stop()

    # --- rounds -------------------------------------------------------------------------------

    def _local_gateway(self, server: SimServer, index: int) -> GatewayChild | None:
        """What the server's gateway locator picks: round robin (a different start for each
        server) over the gateways its datacenter's federation state lists."""
        found = [self.gateway_at(a) for a in self.agents.gateway_locator(server.spec.dc)]
        choices = [child for child in found if child is not None]
        if not choices:
            return None
        cursor = self._cursors.setdefault(server.member, itertools.count(index))
        return choices[next(cursor) % len(choices)]

    async def round(self) -> list[PathResult]:
        """Every server dials every server of every other datacenter through a local gateway.

        First every path is opened and spoken over, a few at a time; then the round trips are
        timed one path after the other over the open gossip connections, so that no handshake
        running in this process inflates them; then the connections close and the dialing
        gateways' access logs tell which remote gateway carried each.
        """
        limit = asyncio.Semaphore(PARALLEL_PATHS)

        async def probe(
            server: SimServer, target: SimServer, child: GatewayChild | None
        ) -> tuple[PathResult, PacketSession | None]:
            if child is None:
                failed = [Exchange(alpn, error=NO_GATEWAY) for alpn in ALPN_PROTOCOLS]
                return PathResult(server.member, target.member, target.spec.dc, "-", failed), None
            async with limit:
                spec = child.spec
                return await server.probe(
                    target.spec, child.name, (spec.host, spec.port), EXCHANGE_TIMEOUT
                )

        jobs = []
        dialers: list[GatewayChild | None] = []
        for index, server in enumerate(self.servers):
            for target in self.servers:
                if target.spec.dc != server.spec.dc:
                    child = self._local_gateway(server, index)
                    dialers.append(child)
                    jobs.append(probe(server, target, child))
        probed = await asyncio.gather(*jobs)
        for result, session in probed:
            if session is None:
                continue
            try:
                async with asyncio.timeout(EXCHANGE_TIMEOUT):
                    result.rtt = await session.round_trip()
            except (OSError, EOFError, TimeoutError, ValueError) as error:
                result.fail(ALPN_PACKET, error)
        await asyncio.gather(*(s.close() for _, s in probed if s is not None))
        results = [result for result, _ in probed]
        await asyncio.gather(
            *(self._attribute(r, child) for r, child in zip(results, dialers, strict=True))
        )
        return results

    async def _attribute(self, result: PathResult, child: GatewayChild | None) -> None:
        """Which remote gateways carried the path, from the dialing gateway's access log."""
        if child is None:
            return
        upstreams = await asyncio.gather(
            *(child.upstream_of(e.client, ACCESS_LOG_WAIT) for e in result.exchanges if e.client)
        )
        result.remote_gateways = sorted({self.gateway_named(u) for u in upstreams if u})

    async def counters(self) -> dict[str, Counters | None]:
        return await read_counters(self.children)
