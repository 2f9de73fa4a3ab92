"""The listener: accept, back off when descriptors run out, sweep deadlines, drain.

Each accepted client becomes an Opening (hello → route → connect → replay, opening.py), which
hands over to a Tunnel (tunnel.py), which may hand its sockets to a KernelTunnel
(kerneltunnel.py); what they share lives in one DataPlane (context.py).

Why raw sockets and not asyncio transports: splice(2) needs the file descriptors, and a libuv
transport cannot share its descriptor. Each socket is registered once with the edge-triggered
Poller (poller.py) and never re-registered. No task is created per connection.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
import time
from collections.abc import Callable

from meshgw.dataplane.budget import RESOURCE_ERRORS
from meshgw.dataplane.context import DataPlane, DataPlaneConfig
from meshgw.dataplane.dialer import tune
from meshgw.dataplane.kerneltunnel import KernelTunnel
from meshgw.dataplane.opening import Opening
from meshgw.dataplane.tunnel import LINGER_RESET, Tunnel
from meshgw.metrics import Metrics
from meshgw.routing import RouteTable

log = logging.getLogger("meshgw.dataplane")

ACCEPT_BATCH = 64  # connections accepted per wake-up at most, so one busy listener cannot starve


class Listener:
    """Accepts on one address; its DataPlane holds every connection it accepted."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        config: DataPlaneConfig,
        table: RouteTable,
        host: str,
        port: int,
        *,
        metrics: Metrics | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.loop = loop
        self.config = config
        self.metrics = metrics or Metrics()
        self.dp = DataPlane(loop, config, table, self.metrics.dataplane)
        self.host, self.port = host, port
        self.reuse_port = reuse_port
        self.sock: socket.socket | None = None
        self._accept_delay = 0.0
        self._idle_sweeper: asyncio.TimerHandle | None = None
        self._deadline_sweeper: asyncio.TimerHandle | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # Accepted sockets inherit these: two system calls fewer per connection.
            tune(sock)
            if hasattr(socket, "TCP_DEFER_ACCEPT"):
                # Wake up for a connection only once it has sent something: clients that
                # connect and stay silent cost no descriptor and no work until they speak.
                sock.setsockopt(
                    socket.IPPROTO_TCP,
                    socket.TCP_DEFER_ACCEPT,
                    max(1, math.ceil(self.config.hello_timeout)),
                )
            sock.bind((self.host, self.port))
            sock.listen(max(self.config.backlog, socket.SOMAXCONN))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.loop.add_reader(sock.fileno(), self._on_accept)
        self._sweep_deadlines()
        if self.config.idle_timeout:
            self._schedule_idle_sweep()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def listening(self) -> bool:
        return self.sock is not None

    @property
    def pump_mode(self) -> str:
        return self.dp.pump_mode

    async def open_connections(self) -> int:
        return len(self.dp.connections)

    async def extra_metrics(self) -> list[bytes]:
        return []  # this process's counters are in the registry it was given

    async def down_endpoints(self) -> dict[str, str]:
        return self.dp.outliers.down_now()

    def set_demand(self, demand: Callable[[str], None]) -> None:
        self.dp.demand = demand

    def set_table(self, table: RouteTable) -> None:
        """New connections use the new table; connections in flight keep their upstream."""
        self.dp.set_table(table)

    def stop_accepting(self) -> None:
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    async def drain(self, timeout: float) -> int:
        """Stop accepting, let open connections finish for up to `timeout` seconds, then close
        the rest. Returns how many had to be closed."""
        self.stop_accepting()
        await self.dp.wait_idle(timeout)
        left = list(self.dp.connections)
        for conn in left:
            conn.close("drain_timeout")
        self.close()
        return len(left)

    def close(self) -> None:
        """Close everything now; safe to call again (drain ends with it, shutdown too)."""
        self.stop_accepting()
        for sweeper in (self._idle_sweeper, self._deadline_sweeper):
            if sweeper is not None:
                sweeper.cancel()
        self.dp.close()

    # --- accepting ----------------------------------------------------------------------------

    def _on_accept(self) -> None:
        sock = self.sock
        if sock is None:
            return
        dp = self.dp
        stats, cap = dp.stats, self.config.max_connections
        for _ in range(ACCEPT_BATCH):
            try:
                client, peer = sock.accept()
            except BlockingIOError:
                break
            except OSError as error:
                name = errno.errorcode.get(error.errno or 0, "error")
                stats.accept_errors[name] += 1
                if error.errno in RESOURCE_ERRORS:
                    self._back_off(name)
                    return
                continue  # ECONNABORTED and the like: that client is gone, keep accepting
            self._accept_delay = 0.0
            if len(dp.connections) >= cap:
                stats.rejections["max_connections"] += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                client.close()
                continue
            try:
                client.setblocking(False)
            except OSError:
                client.close()
                continue
            opening = Opening(dp, client, peer)
            dp.opened(opening)
            try:
                opening.start()  # reads a hello that is already here, outside the poller
            except Exception as error:  # a bug: contained as the poller contains its handlers'
                dp.handler_failed(opening.start, error)

    def _back_off(self, reason: str) -> None:
        """Out of descriptors or memory: stop accepting for a moment instead of spinning."""
        sock = self.sock
        if sock is None:
            return
        self._accept_delay = min(max(self._accept_delay * 2, 0.05), 1.0)
        log.warning(
            "accept failed (%s): pausing accepts for %.2fs; open connections: %d",
            reason,
            self._accept_delay,
            len(self.dp.connections),
        )
        self.loop.remove_reader(sock.fileno())

        def resume() -> None:
            if self.sock is sock:
                self.loop.add_reader(sock.fileno(), self._on_accept)

        self.loop.call_later(self._accept_delay, resume)

    # --- timeouts ----------------------------------------------------------------------------

    def _sweep_deadlines(self) -> None:
        """Hello and connect deadlines, checked a few times per shortest timeout."""
        now = time.monotonic()
        dp = self.dp
        for opening in dp.hello_deadlines.expired(now):
            opening.hello_timed_out()
        for deadlines in dp.connect_deadline_sets():
            for opening in deadlines.expired(now):
                opening.connect_timed_out()
        for opening in dp.route_deadlines.expired(now):
            opening.route_timed_out()
        dp.compact_tables()
        shortest = min(self.config.hello_timeout, *dp.connect_timeouts())
        self._deadline_sweeper = self.loop.call_later(
            min(max(shortest / 10, 0.01), 0.5), self._sweep_deadlines
        )

    def _schedule_idle_sweep(self) -> None:
        idle = self.config.idle_timeout
        assert idle
        self._idle_sweeper = self.loop.call_later(max(idle / 4, 0.05), self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Close tunnels that moved no byte for idle_timeout; no per-read bookkeeping."""
        idle = self.config.idle_timeout
        assert idle
        now = self.loop.time()
        for conn in list(self.dp.connections):
            if not isinstance(conn, Tunnel | KernelTunnel):
                continue
            moved = conn.moved()
            if moved != conn.idle_mark:
                conn.idle_mark, conn.idle_since = moved, now
            elif now - conn.idle_since >= idle:
                conn.close("idle_timeout")
        self._schedule_idle_sweep()
