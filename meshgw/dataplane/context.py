"""What every connection of one process shares: settings, the poller, the read buffer, the
splice pipes, the kernel tunnels, the counters, the deadlines and the route table in force.

A connection (an `Opening`, then a `Tunnel`, maybe then a `KernelTunnel`) reaches all of it
through one `DataPlane` value instead of through the listener, so the listener itself is only
accepting, backing off, sweeping and draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, fields
from typing import Any, Protocol

from meshgw.dataplane import capacity
from meshgw.dataplane.deadlines import Deadlines
from meshgw.dataplane.health import Outliers
from meshgw.dataplane.kernelplane import KernelPlane, open_kernel_plane, pump_unavailable
from meshgw.dataplane.poller import Poller
from meshgw.dataplane.pump import BUFFER_SIZE
from meshgw.dataplane.splice import SPLICE_AVAILABLE, PipePool
from meshgw.metrics import DataPlaneStats
from meshgw.routing import Route, RouteTable
from meshgw.wire.names import ServiceName, parse_sni

log = logging.getLogger("meshgw.dataplane")


@dataclass(frozen=True, slots=True)
class DataPlaneConfig:
    """The data plane's settings; `app.dataplane_config` fills it from Settings, where the
    defaults live."""

    hello_timeout: float
    connect_timeout: float  # where the route's cluster names none
    idle_timeout: float | None
    max_hello_bytes: int
    max_connections: int
    max_pipes: int
    pump: str  # one of PUMP_MODES
    access_log: bool
    # --proxy-protocol accept: the load balancers allowed to send a PROXY header (else None).
    proxy_protocol_from: tuple[IPNetwork, ...] | None = None
    backlog: int = 4096
    # How long a connection for a local service nobody asked for yet waits for its route.
    demand_timeout: float = 1.0
    # Log what holds for the whole gateway (a pump mode falling back) here: in one worker only.
    announce: bool = True

    def __reduce__(self) -> tuple[type[DataPlaneConfig], tuple[object, ...]]:
        # Pickled to the worker processes, and rebuilt through __init__: compiled with mypyc, a
        # frozen dataclass cannot be restored field by field (its __setattr__ refuses).
        return (DataPlaneConfig, tuple(getattr(self, f.name) for f in fields(self)))


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxySources:
    """The addresses a PROXY header is taken from; from anyone else it is a spoofing attempt."""

    __slots__ = ("networks",)

    def __init__(self, networks: tuple[IPNetwork, ...]) -> None:
        self.networks = networks

    def trusts(self, peer: tuple) -> bool:
        try:
            address = ipaddress.ip_address(peer[0])
        except (ValueError, IndexError):
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


class Connection(Protocol):
    """An open client connection, in whichever phase: what the listener and sweeps need."""

    def close(self, outcome: str) -> None: ...


def flow_mode(pump: str) -> str:
    """How Flows (userspace, splice) move bytes under `pump`: every connection in those modes;
    in sockmap mode those the kernel refused, which get auto's userspace-then-splice."""
    mode = "auto" if pump == "sockmap" else pump
    return mode if SPLICE_AVAILABLE else "userspace"


def pump_mode(pump: str) -> str:
    """The mode `pump` really runs as here, as the data plane reports it."""
    return "sockmap" if pump == "sockmap" and pump_unavailable(pump) is None else flow_mode(pump)


class DataPlane:
    """The state one process's connections share. Built by the listener, closed with it."""

    __slots__ = (
        "_connect",
        "_failures_logged",
        "_idle",
        "_refusals_logged",
        "_tasks",
        "config",
        "connections",
        "demand",
        "flow_mode",
        "hello_deadlines",
        "kernel",
        "load",
        "loop",
        "outliers",
        "pipes",
        "poller",
        "proxy_sources",
        "pump_mode",
        "route_deadlines",
        "stats",
        "table",
        "view",
        "waiting",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        config: DataPlaneConfig,
        table: RouteTable,
        stats: DataPlaneStats,
    ) -> None:
        self.loop = loop
        self.config = config
        self.table = table  # swapped whole; read once per connection
        self.stats = stats
        self.connections: set[Connection] = set()
        stats.active = lambda: len(self.connections)
        self.view = memoryview(bytearray(BUFFER_SIZE))  # every read of this process lands here
        self.flow_mode = flow_mode(config.pump)
        use_splice = self.flow_mode != "userspace"
        self.pipes = PipePool(config.max_pipes) if use_splice else None
        pipes = self.pipes
        if pipes is not None:
            stats.pipe_shortages = lambda: pipes.shortages
            stats.pipes_open = lambda: pipes.open
        self.kernel: KernelPlane | None = self._open_kernel(loop, config, stats)
        self.pump_mode = "sockmap" if self.kernel and config.pump == "sockmap" else self.flow_mode
        self.poller = Poller(loop, self.handler_failed)
        self.hello_deadlines = Deadlines(config.hello_timeout)
        self._connect: dict[float, Deadlines] = {}  # one per connect timeout in use
        self.route_deadlines = Deadlines(config.demand_timeout)
        self.outliers = Outliers()
        stats.down = self.outliers.down_now
        self.load: dict[str, int] = {}  # open connections per cluster with a limit
        networks = config.proxy_protocol_from
        self.proxy_sources = ProxySources(networks) if networks is not None else None
        # Asks the control plane to watch a local service a connection wants (set by the
        # gateway when services are watched on demand); connections wait for the route.
        self.demand: Callable[[str], None] | None = None
        self.waiting: dict[str, list[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: asyncio.Event | None = None
        self._failures_logged: set[str] = set()
        self._refusals_logged: set[str] = set()

    def _open_kernel(
        self, loop: asyncio.AbstractEventLoop, config: DataPlaneConfig, stats: DataPlaneStats
    ) -> KernelPlane | None:
        kernel, reason = open_kernel_plane(
            loop, config.pump, config.max_connections, self.handler_failed
        )
        if kernel is not None:
            tunnels = kernel.tunnels
            stats.kernel_capacity = tunnels.capacity
            stats.kernel_open = tunnels.__len__
            stats.kernel_refusals = lambda: tunnels.refusals
        elif reason is not None and config.announce:
            # Never a reason not to start: the Flows move every byte, only at a higher cost.
            level = logging.WARNING if config.pump == "sockmap" else logging.INFO
            log.log(
                level,
                "kernel tunnels unavailable (%s): --pump %s moves bytes with %s",
                reason,
                config.pump,
                "splice and userspace" if self.pipes else "userspace",
            )
        return kernel

    # --- deadlines, limits, routes on demand ----------------------------------------------------

    def connect_deadlines(self, timeout: float) -> Deadlines:
        """Connections waiting out this connect timeout (clusters may each have their own)."""
        deadlines = self._connect.get(timeout)
        if deadlines is None:
            deadlines = self._connect[timeout] = Deadlines(timeout)
        return deadlines

    def connect_deadline_sets(self) -> list[Deadlines]:
        return list(self._connect.values())

    def connect_timeouts(self) -> list[float]:
        return [self.config.connect_timeout, *self._connect]

    def admit(self, route: Route) -> bool:
        """Count one more connection on the route's cluster, unless its limit is reached."""
        limit = route.cluster.settings.max_connections
        if limit is None:
            return True
        name = route.cluster.name
        load = self.load.get(name, 0)
        if load >= limit:
            return False
        self.load[name] = load + 1
        return True

    def release(self, route: Route) -> None:
        if route.cluster.settings.max_connections is not None:
            name = route.cluster.name
            self.load[name] = self.load.get(name, 1) - 1

    def refused_once(self, sni: str, reason: str) -> None:
        """Say once per name why a known name is refused (bounded: names are the client's)."""
        if sni not in self._refusals_logged and len(self._refusals_logged) < 1024:
            self._refusals_logged.add(sni)
            log.warning("refusing %s: %s", sni, self.table.explain(sni).partition(": refused: ")[2])

    def await_route(self, opening: Any, sni: str) -> bool:
        """A name with no route may be a local service the control plane watches only on
        demand: ask for it, and let the connection wait (a second at most) for its route."""
        service = self._local_service(sni)
        if service is None or self.demand is None:
            return False
        if sni not in self.waiting:
            self.demand(service)
        self.waiting.setdefault(sni, []).append(opening)
        self.route_deadlines.add(opening, time.monotonic())
        return True

    def _local_service(self, sni: str) -> str | None:
        topology = self.table.topology
        if not topology.on_demand:
            return None
        parsed = parse_sni(sni, domain=topology.domain, trust_domain=topology.trust_domain)
        if isinstance(parsed, ServiceName) and parsed.datacenter == topology.datacenter:
            return parsed.service
        return None

    def forget_waiting(self, opening: Any) -> None:
        self.route_deadlines.discard(opening)
        hello = opening.hello
        if hello is not None and hello.sni in self.waiting:
            waiting = self.waiting[hello.sni]
            if opening in waiting:
                waiting.remove(opening)
            if not waiting:
                del self.waiting[hello.sni]

    def set_table(self, table: RouteTable) -> None:
        """New connections route by `table`; those waiting for a route on demand go on."""
        self.table = table
        for sni in [name for name in self.waiting if table.resolve(name) is not None]:
            route = table.resolve(sni)
            assert route is not None
            for opening in self.waiting.pop(sni):
                self.route_deadlines.discard(opening)
                opening.routed(route)

    # --- connections ---------------------------------------------------------------------------

    def opened(self, conn: Connection) -> None:
        self.connections.add(conn)

    def handed_over(self, old: Connection, new: Connection) -> None:
        """One connection changes phase (an Opening becomes a Tunnel)."""
        self.connections.discard(old)
        self.connections.add(new)

    def closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self._idle is not None and not self.connections:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> None:
        """Until every connection has closed, or `timeout` seconds."""
        if not self.connections:
            return
        self._idle = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A task a connection needs (a DNS lookup); cancelled when the data plane closes."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def handler_failed(self, handler: Callable[..., Any], error: Exception) -> None:
        """A bug met by one connection's handler: close that connection, count, log once."""
        self.stats.internal_errors += 1
        signature = f"{type(error).__name__}: {error}"
        if signature not in self._failures_logged and len(self._failures_logged) < 100:
            self._failures_logged.add(signature)
            log.error("connection handler failed; closing that connection", exc_info=error)
        owner: Callable[..., Any] | None = getattr(handler, "__self__", None)
        if owner in self.connections:
            owner.close("internal_error")  # type: ignore[union-attr]

    def compact_tables(self) -> None:
        """Tables grown for a past peak of connections give their space back (capacity.py);
        from the deadline sweep, never while a table is being iterated."""
        capacity.compact(self.connections)
        self.poller.compact()
        self.hello_deadlines.compact()
        self.route_deadlines.compact()
        for deadlines in self._connect.values():
            deadlines.compact()
        if self.kernel is not None:
            self.kernel.waiting.compact()

    def close(self) -> None:
        """Close every connection and everything shared; safe to call again."""
        for conn in list(self.connections):
            conn.close("shutdown")
        for task in self._tasks:
            task.cancel()
        if self.pipes is not None:
            self.pipes.close()
        if self.kernel is not None:
            self.kernel.close()
            self.kernel = None
        self.poller.close()
