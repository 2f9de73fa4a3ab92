"""What every connection of one process shares: settings, the poller, the read buffer, the
splice pipes, the kernel tunnels, the counters, the deadlines and the route table in force.

A connection (an `Opening`, then a `Tunnel`, maybe then a `KernelTunnel`) reaches all of it
through one `DataPlane` value instead of through the listener, so the listener itself is only
accepting, backing off, sweeping and draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from meshgw.dataplane.deadlines import Deadlines
from meshgw.dataplane.kernelplane import KernelPlane, open_kernel_plane, pump_unavailable
from meshgw.dataplane.poller import Poller
from meshgw.dataplane.pump import BUFFER_SIZE
from meshgw.dataplane.splice import SPLICE_AVAILABLE, PipePool
from meshgw.metrics import DataPlaneStats
from meshgw.routing import RouteTable

log = logging.getLogger("meshgw.dataplane")


@dataclass(frozen=True, slots=True)
class DataPlaneConfig:
    """The data plane's settings; `app.dataplane_config` fills it from Settings, where the
    defaults live."""

    hello_timeout: float
    connect_timeout: float
    idle_timeout: float | None
    max_hello_bytes: int
    max_connections: int
    max_pipes: int
    pump: str  # one of PUMP_MODES
    access_log: bool
    backlog: int = 4096
    # Log what holds for the whole gateway (a pump mode falling back) here: in one worker only.
    announce: bool = True


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
        "_failures_logged",
        "_idle",
        "_tasks",
        "config",
        "connect_deadlines",
        "connections",
        "flow_mode",
        "hello_deadlines",
        "kernel",
        "loop",
        "pipes",
        "poller",
        "pump_mode",
        "stats",
        "table",
        "view",
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
        self.poller = Poller(loop, self._handler_failed)
        self.hello_deadlines = Deadlines(config.hello_timeout)
        self.connect_deadlines = Deadlines(config.connect_timeout)
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: asyncio.Event | None = None
        self._failures_logged: set[str] = set()

    def _open_kernel(
        self, loop: asyncio.AbstractEventLoop, config: DataPlaneConfig, stats: DataPlaneStats
    ) -> KernelPlane | None:
        kernel, reason = open_kernel_plane(
            loop, config.pump, config.max_connections, self._handler_failed
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

    def _handler_failed(self, handler: Callable[..., object], error: Exception) -> None:
        """A bug met by one connection's handler: close that connection, count, log once."""
        self.stats.internal_errors += 1
        signature = f"{type(error).__name__}: {error}"
        if signature not in self._failures_logged and len(self._failures_logged) < 100:
            self._failures_logged.add(signature)
            log.error("connection handler failed; closing that connection", exc_info=error)
        owner: Callable[..., Any] | None = getattr(handler, "__self__", None)
        if owner in self.connections:
            owner.close("internal_error")  # type: ignore[union-attr]

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
