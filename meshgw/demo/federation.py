"""A whole demo federation on loopback: certificates, simulated servers, gateway processes, rounds.

Start order: certificates, then the servers (in this process; their ports are then known), then
every gateway at once on ports chosen beforehand, since each gateway's config names the other
datacenters' gateways. A gateway that loses its port to somebody else in between makes the whole
set restart on new ports (bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from meshgw.demo.gateways import (
    Counters,
    GatewayChild,
    GatewayStartError,
    fetch_metrics,
    parse_counters,
    write_config,
)
from meshgw.demo.layout import (
    ADMIN_PORT,
    GATEWAY_PORT,
    SERVER_PORT,
    GatewaySpec,
    Pki,
    ServerSpec,
    datacenter_names,
    free_port,
    gateway_host,
    make_pki,
    server_host,
    spread_loopback_works,
)
from meshgw.demo.protocols import ALPN_PACKET
from meshgw.demo.servers import PacketSession, PathResult, SimServer

START_ATTEMPTS = 3
START_TIMEOUT = 30.0  # seconds for every gateway to listen (2 cores, several Python starts)
EXCHANGE_TIMEOUT = 5.0  # per connection: connect, handshake and exchange through two gateways
ACCESS_LOG_WAIT = 3.0  # for the dialing gateway's access line after the connection closed
PARALLEL_PATHS = 8  # paths probed at once: enough to be quick, few enough for honest RTTs


@dataclass(frozen=True, slots=True)
class Shape:
    datacenters: int = 3
    servers_per_dc: int = 3
    gateways_per_dc: int = 2


class Federation:
    def __init__(self, shape: Shape, root: Path) -> None:
        self.shape = shape
        self.root = root
        self.datacenters = datacenter_names(shape.datacenters)
        self.spread = spread_loopback_works()
        self.pki: Pki | None = None
        self.servers: list[SimServer] = []
        self.gateways: dict[str, list[GatewayChild]] = {dc: [] for dc in self.datacenters}
        # The gateways each datacenter's servers dial: all of them until one is stopped (a real
        # server's gateway locator drops a deregistered gateway the same way).
        self.local_gateways: dict[str, list[GatewayChild]] = {}
        self._cursors: dict[str, Iterator[int]] = {}

    # --- start and stop -----------------------------------------------------------------------

    @property
    def children(self) -> list[GatewayChild]:
        return [child for dc in self.datacenters for child in self.gateways[dc]]

    def gateway_named(self, address: str) -> str:
        for child in self.children:
            if child.spec.listen == address:
                return child.name
        return address

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
        await self._start_gateways(progress)
        self.local_gateways = {dc: list(self.gateways[dc]) for dc in self.datacenters}

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

    async def _start_gateways(self, progress: Callable[[str], None]) -> None:
        for attempt in range(START_ATTEMPTS):
            specs = self._gateway_specs(well_known_ports=self.spread and attempt == 0)
            for dc, dc_specs in specs.items():
                servers = [f"{s.spec.node}={s.address}" for s in self.servers if s.spec.dc == dc]
                remote = [
                    f"{other}={g.listen}"
                    for other in self.datacenters
                    if other != dc
                    for g in specs[other]
                ]
                for spec in dc_specs:
                    write_config(spec, servers, remote)
            self.gateways = {dc: [GatewayChild(s) for s in specs[dc]] for dc in self.datacenters}
            for child in self.children:
                await child.start()
            outcomes = await asyncio.gather(
                *(child.wait_listening(START_TIMEOUT) for child in self.children),
                return_exceptions=True,
            )
            errors = [o for o in outcomes if isinstance(o, BaseException)]
            if not errors:
                return
            await self.stop_gateways(self.children)
            start_errors = [e for e in errors if isinstance(e, GatewayStartError)]
            retry = start_errors and all(e.address_in_use for e in start_errors)
            if not retry or attempt == START_ATTEMPTS - 1:
                raise errors[0]
            progress("gateways: a port was taken meanwhile; starting them again on other ports")

    async def stop_gateways(self, children: list[GatewayChild]) -> list[int | None]:
        return list(await asyncio.gather(*(child.stop() for child in children)))

    async def close(self) -> None:
        await self.stop_gateways(self.children)
        for server in self.servers:
            await server.close()

    def retire(self, child: GatewayChild) -> None:
        """Servers stop dialing this gateway (as when it deregisters from the catalog)."""
        with contextlib.suppress(ValueError):
            self.local_gateways[child.spec.dc].remove(child)

    # --- rounds -------------------------------------------------------------------------------

    def _local_gateway(self, server: SimServer, index: int) -> GatewayChild:
        """Round robin over the datacenter's gateways, a different start for each server."""
        choices = self.local_gateways[server.spec.dc]
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
            server: SimServer, target: SimServer, child: GatewayChild
        ) -> tuple[PathResult, PacketSession | None]:
            async with limit:
                spec = child.spec
                return await server.probe(
                    target.spec, child.name, (spec.host, spec.port), EXCHANGE_TIMEOUT
                )

        jobs = []
        dialers: list[GatewayChild] = []
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

    async def _attribute(self, result: PathResult, child: GatewayChild) -> None:
        """Which remote gateways carried the path, from the dialing gateway's access log."""
        upstreams = await asyncio.gather(
            *(child.upstream_of(e.client, ACCESS_LOG_WAIT) for e in result.exchanges if e.client)
        )
        result.remote_gateways = sorted({self.gateway_named(u) for u in upstreams if u})

    async def counters(self) -> dict[str, Counters | None]:
        """Each running gateway's counters, from its /metrics (None where it cannot be read)."""

        async def read(child: GatewayChild) -> Counters | None:
            if not child.running:
                return None
            try:
                return parse_counters(await fetch_metrics(child.spec.admin))
            except (OSError, TimeoutError, ValueError):
                return None

        values = await asyncio.gather(*(read(child) for child in self.children))
        return {child.name: value for child, value in zip(self.children, values, strict=True)}
