"""What every connection of one process shares: settings, the poller, the read buffer, the
splice pipes, the counters, the deadlines and the route table in force.

A connection (an `Opening`, then a `Tunnel`) reaches all of it through one `DataPlane` value
instead of through the listener, so the listener itself is only accepting, backing off,
sweeping and draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, fields
from typing import Any, Protocol

from meshgw.dataplane.poller import Handler, Poller
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
    pump: str  # auto | splice | userspace
    access_log: bool
    backlog: int = 4096

    def __reduce__(self) -> tuple[type[DataPlaneConfig], tuple[object, ...]]:
        # Pickled to the worker processes, and rebuilt through __init__: compiled with mypyc, a
        # frozen dataclass cannot be restored field by field (its __setattr__ refuses).
        return (DataPlaneConfig, tuple(getattr(self, f.name) for f in fields(self)))


class Connection(Protocol):
    """An open client connection, in whichever phase: what the listener and sweeps need."""

    def close(self, outcome: str) -> None: ...


class Deadlines:
    """Connections waiting out one fixed timeout, oldest first.

    One periodic sweep serves them all instead of a timer armed and cancelled per connection:
    since the timeout is the same for every entry, insertion order is deadline order.
    """

    __slots__ = ("_waiting", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._waiting: OrderedDict[Any, float] = OrderedDict()

    def add(self, conn: Any, now: float) -> None:
        self._waiting.pop(conn, None)  # re-added (failover): a fresh deadline, at the end
        self._waiting[conn] = now + self.timeout

    def discard(self, conn: Any) -> None:
        self._waiting.pop(conn, None)

    def expired(self, now: float) -> list[Any]:
        waiting, due = self._waiting, []
        while waiting:
            conn, deadline = next(iter(waiting.items()))
            if deadline > now:
                break
            del waiting[conn]
            due.append(conn)
        return due


class DataPlane:
    """The state one process's connections share. Built by the listener, closed with it."""

    __slots__ = (
        "_failures_logged",
        "_idle",
        "_tasks",
        "config",
        "connect_deadlines",
        "connections",
        "hello_deadlines",
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
        use_splice = SPLICE_AVAILABLE and config.pump != "userspace"
        self.pipes = PipePool(config.max_pipes) if use_splice else None
        self.pump_mode = config.pump if use_splice else "userspace"
        pipes = self.pipes
        if pipes is not None:
            stats.pipe_shortages = lambda: pipes.shortages
            stats.pipes_open = lambda: pipes.open
        self.poller = Poller(loop, self._handler_failed)
        self.hello_deadlines = Deadlines(config.hello_timeout)
        self.connect_deadlines = Deadlines(config.connect_timeout)
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: asyncio.Event | None = None
        self._failures_logged: set[str] = set()

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

    def _handler_failed(self, handler: Handler, error: Exception) -> None:
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
        self.poller.close()
