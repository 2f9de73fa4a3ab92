"""The listener and the life of one connection, on plain callbacks.

accept → read the ClientHello (deadline, size cap) → resolve the SNI → connect upstream (timeout,
fail over to the next endpoint: nothing has been sent yet) → write the buffered hello bytes
verbatim → two Flows move the rest → close and account.

Why raw sockets and not asyncio transports: splice(2) needs the file descriptors, and a libuv
transport cannot share its descriptor. Each socket is registered once with the edge-triggered
Poller (poller.py) and never re-registered. No task is created per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import math
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from meshgw.dataplane import capacity
from meshgw.dataplane.poller import CLOSED, IN, OUT, Poller
from meshgw.dataplane.pump import BUFFER_SIZE, Flow
from meshgw.dataplane.splice import SPLICE_AVAILABLE, PipePool
from meshgw.metrics import Metrics
from meshgw.routing import Route, RouteTable, Target
from meshgw.wire.clienthello import ClientHelloReader, Hello, Rejection

log = logging.getLogger("meshgw.dataplane")
access_log = logging.getLogger("meshgw.access")

ACCEPT_BATCH = 64  # connections accepted per wake-up at most, so one busy listener cannot starve
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_LINGER_RESET = struct.pack("ii", 1, 0)  # close() then sends RST instead of FIN


@dataclass(frozen=True, slots=True)
class DataPlaneConfig:
    hello_timeout: float = 10.0
    connect_timeout: float = 5.0
    idle_timeout: float | None = None
    max_hello_bytes: int = 65536
    max_connections: int = 8192
    max_pipes: int = 512
    pump: str = "auto"  # auto | splice | userspace
    access_log: bool = True
    backlog: int = 4096


class Phase(enum.IntEnum):
    HELLO = 0
    CONNECTING = 1
    OPEN = 2
    CLOSED = 3


def _tune(sock: socket.socket) -> None:
    # Latency over batching: TLS handshakes are small, chatty writes. Keepalive finds dead peers
    # on the long, sparse connections WAN gossip and RPC keep open.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class Deadlines:
    """Connections waiting out one fixed timeout, oldest first.

    One periodic sweep serves them all instead of a timer armed and cancelled per connection:
    since the timeout is the same for every entry, insertion order is deadline order.
    """

    __slots__ = ("_waiting", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._waiting: OrderedDict[Connection, float] = OrderedDict()

    def add(self, conn: Connection, now: float) -> None:
        self._waiting.pop(conn, None)  # re-added (failover): a fresh deadline, at the end
        self._waiting[conn] = now + self.timeout

    def discard(self, conn: Connection) -> None:
        self._waiting.pop(conn, None)

    def expired(self, now: float) -> list[Connection]:
        waiting, due = self._waiting, []
        while waiting:
            conn, deadline = next(iter(waiting.items()))
            if deadline > now:
                break
            del waiting[conn]
            due.append(conn)
        return due

    def compact(self) -> bool:
        return capacity.compact(self._waiting)


class Connection:
    __slots__ = (
        "buffered",
        "client",
        "client_backlog",
        "client_eof",
        "client_fd",
        "down",
        "early_bytes",
        "hello",
        "idle_mark",
        "idle_since",
        "listener",
        "peer",
        "phase",
        "reader",
        "route",
        "started",
        "target",
        "targets",
        "up",
        "upstream",
        "upstream_events",
        "upstream_fd",
    )

    def __init__(self, listener: Listener, client: socket.socket, peer: tuple) -> None:
        self.listener = listener
        self.client = client
        self.client_fd = client.fileno()
        self.peer = peer
        self.phase = Phase.HELLO
        self.reader: ClientHelloReader | None = ClientHelloReader(listener.config.max_hello_bytes)
        # Every byte from the client until the upstream is connected; replayed verbatim.
        self.buffered = b""
        self.early_bytes = 0  # of those, how many were sent before the flows took over
        self.client_eof = False
        self.client_backlog = False  # bytes left unread in the client socket (buffer bound)
        self.hello: Hello | None = None
        self.route: Route | None = None
        self.targets: list[Target] = []
        self.target: Target | None = None
        self.upstream: socket.socket | None = None
        self.upstream_fd = -1
        self.upstream_events = 0  # what the upstream said while connecting, for the flows
        self.up: Flow | None = None  # client → upstream
        self.down: Flow | None = None  # upstream → client
        self.idle_mark = 0
        self.idle_since = 0.0
        self.started = time.monotonic()

    def start(self) -> None:
        """Begin with the hello. With TCP_DEFER_ACCEPT it is usually here already: reading it
        before registering saves a wake-up (registering reports only what is still unread)."""
        self.listener.hello_deadlines.add(self, self.started)
        self._read_client(until_eof=False)
        if self.phase is not Phase.CLOSED:
            self.listener.poller.register(self.client_fd, self._on_client_event)

    # --- events -------------------------------------------------------------------------------

    def _on_client_event(self, events: int) -> None:
        up = self.up
        if up is not None:  # the hot path: both flows are running
            if events & OUT:
                self.down.writable()  # type: ignore[union-attr]
            if events & (IN | CLOSED) and self.phase is Phase.OPEN:
                up.readable(bool(events & CLOSED))
            return
        if events & (IN | CLOSED):
            self._read_client(until_eof=bool(events & CLOSED))

    def _on_upstream_event(self, events: int) -> None:
        down = self.down
        if down is not None:
            if events & OUT:
                self.up.writable()  # type: ignore[union-attr]
            if events & (IN | CLOSED) and self.phase is Phase.OPEN:
                down.readable(bool(events & CLOSED))
            return
        if self.phase is Phase.CONNECTING:
            self.upstream_events |= events
            self._upstream_ready()

    # --- the client until the upstream is open ------------------------------------------------

    def _read_client(self, until_eof: bool) -> None:
        """Read what the client sent before any upstream exists: the hello, maybe more.

        `until_eof`: the client also closed its side; read on to see the EOF, which no later
        edge would report.
        """
        view = self.listener.view
        cap = self.listener.config.max_hello_bytes
        while not self.client_eof and not self.client_backlog:
            try:
                n = self.client.recv_into(view)
            except BlockingIOError:
                return
            except OSError:
                self._reject("client_reset")
                return
            if n == 0:
                if self.phase is Phase.HELLO:
                    self._reject("client_closed")
                    return
                self.client_eof = True  # half-close after the hello: delivered once open
                return
            chunk = view[:n]
            self.buffered += chunk
            if self.phase is Phase.CONNECTING:
                # Bytes after the hello (early data) wait for the upstream, within a bound;
                # the rest stays in the socket until the flows read it.
                if len(self.buffered) >= 2 * cap:
                    self.client_backlog = True
                    return
                continue
            result = self.reader.feed(chunk)  # type: ignore[union-attr]
            if result is None:
                continue
            if isinstance(result, Rejection):
                self._reject(result.reason.value, result.detail)
                return
            self._route(result)
            if self.phase is not Phase.CONNECTING or (n < len(view) and not until_eof):
                return

    def hello_timed_out(self) -> None:
        self._reject("hello_timeout")

    def _route(self, hello: Hello) -> None:
        self.listener.hello_deadlines.discard(self)
        self.hello = hello
        self.reader = None  # the hello is done: free its buffer
        stats = self.listener.stats
        stats.hello_bytes.observe(hello.length)
        stats.hello_seconds.observe(time.monotonic() - self.started)
        for protocol in hello.alpn or ("none",):
            stats.offered(protocol)
        route = self.listener.table.resolve(hello.sni)
        if route is None:
            self._reject("unknown_sni")
            return
        self.route = route
        self.targets = route.cluster.attempt_order()
        self.phase = Phase.CONNECTING
        self._connect_next()

    # --- upstream connection, with failover ---------------------------------------------------

    def _connect_next(self) -> None:
        while self.targets:
            target = self.targets.pop(0)
            if target.sockaddr is None:
                self.listener.spawn(self._resolve_then_connect(target))
                return
            try:
                sock = socket.socket(target.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as error:
                self._count_failure(error)
                continue
            try:
                _tune(sock)
                code = sock.connect_ex(target.sockaddr)
            except OSError as error:
                sock.close()
                self._count_failure(error)
                continue
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                self._count_failure(OSError(code, errno.errorcode.get(code, str(code))))
                continue
            self.upstream = sock
            self.upstream_fd = sock.fileno()
            self.target = target
            self.listener.connect_deadlines.add(self, time.monotonic())
            # Writable (connected) or an error is reported as an edge on this registration.
            self.listener.poller.register(self.upstream_fd, self._on_upstream_event)
            return
        self._reject("no_upstream")

    async def _resolve_then_connect(self, target: Target) -> None:
        """Slow path for endpoints named by DNS: resolve, then try the addresses in order."""
        endpoint = target.endpoint
        try:
            infos = await self.listener.loop.getaddrinfo(
                endpoint.host, endpoint.port, type=socket.SOCK_STREAM
            )
        except OSError as error:
            infos = []
            self._count_failure(error)
        if self.phase is not Phase.CONNECTING:
            return
        resolved = [Target(endpoint, family, sockaddr) for family, _, _, _, sockaddr in infos]
        self.targets[:0] = resolved
        self._connect_next()

    def connect_timed_out(self) -> None:
        self._drop_upstream(TimeoutError(errno.ETIMEDOUT, "connect timed out"))

    def _drop_upstream(self, error: OSError) -> None:
        """This endpoint failed before anything was sent to it: try the next one."""
        self._count_failure(error)
        self.listener.connect_deadlines.discard(self)
        if self.upstream is not None:
            self.listener.poller.forget(self.upstream_fd)
            self.upstream.close()
            self.upstream = None
            self.upstream_fd = -1
        self._connect_next()

    def _count_failure(self, error: OSError) -> None:
        route = self.route
        assert route is not None
        reason = errno.errorcode.get(error.errno or 0, "error").lower()
        self.listener.stats.upstream_failures[route.kind.value, route.datacenter, reason] += 1
        target = self.target.endpoint if self.target else None
        log.debug("upstream %s failed for %s: %s", target, self.hello and self.hello.sni, error)

    def _upstream_ready(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        try:
            # A failed connect shows up here as the send error (ECONNREFUSED...): no getsockopt.
            sent = upstream.send(self.buffered)
        except BlockingIOError:
            return  # still connecting (a stale edge), or the hello fills the socket buffer
        except OSError as error:
            if self.early_bytes:  # part of the hello is upstream already: no failover now
                self.abort(upstream, error)
            else:
                self._drop_upstream(error)
            return
        if not self.early_bytes:  # the first bytes went through: connected
            self.listener.connect_deadlines.discard(self)
            route = self.route
            assert route is not None
            self.listener.stats.connected(route.kind.value, time.monotonic() - self.started)
        self.early_bytes += sent
        self.buffered = self.buffered[sent:]
        if not self.buffered:
            self._open()

    def _open(self) -> None:
        listener = self.listener
        upstream = self.upstream
        assert upstream is not None
        mode, pool, view = listener.pump_mode, listener.pipes, listener.view
        up = self.up = Flow(self, self.client, upstream, view, pool, mode)
        down = self.down = Flow(self, upstream, self.client, view, pool, mode)
        up.bytes = self.early_bytes
        self.phase = Phase.OPEN
        self.idle_since = listener.loop.time()
        if self.client_eof:
            up.at_eof()  # the half-close that came while connecting
        # Edges consumed before the flows existed: the upstream may have answered (or closed)
        # already, and the client may have more than the bound let us read while connecting.
        events = self.upstream_events
        if events & (IN | CLOSED) and self.phase is Phase.OPEN:
            down.readable(bool(events & CLOSED))
        if self.client_backlog and self.phase is Phase.OPEN:
            up.readable(until_eof=False)

    # --- flows' callbacks and the end ---------------------------------------------------------

    def flow_finished(self, flow: Flow) -> None:
        """One direction delivered its EOF: pass it on as a FIN, or close if both are done."""
        up, down = self.up, self.down
        if up is not None and down is not None and up.done and down.done:
            self.close("closed")  # close() sends this last FIN: no shutdown() needed
            return
        try:
            flow.dst.shutdown(socket.SHUT_WR)
        except OSError as error:
            self.abort(flow.dst, error)

    def abort(self, dead: socket.socket, error: OSError) -> None:
        """One side failed: reset the other, so it learns of the abort (RST, not FIN)."""
        other = self.upstream if dead is self.client else self.client
        if other is not None:
            with contextlib.suppress(OSError):
                other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.close("client_reset" if dead is self.client else "upstream_reset")

    def _reject(self, reason: str, detail: str = "") -> None:
        self.listener.stats.rejections[reason] += 1
        self.close(reason, detail=detail, rejected=True)

    def close(self, outcome: str, *, detail: str = "", rejected: bool = False) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        listener = self.listener
        listener.hello_deadlines.discard(self)
        listener.connect_deadlines.discard(self)
        poller = listener.poller
        poller.forget(self.client_fd)
        self.client.close()
        if self.upstream is not None:
            poller.forget(self.upstream_fd)
            self.upstream.close()
        up, down = self.up, self.down
        if up is not None and down is not None:
            up.release()
            down.release()
        route = self.route
        if route is not None and not rejected:
            stats = listener.stats
            kind, dc = route.kind.value, route.datacenter
            stats.connections[kind, dc, outcome] += 1
            if up is not None and down is not None:
                stats.bytes[kind, dc, "upstream"] += up.bytes
                stats.bytes[kind, dc, "downstream"] += down.bytes
        listener.connection_closed(self)
        if listener.config.access_log and access_log.isEnabledFor(logging.INFO):
            self._log(outcome, detail)
        # The flows point back here: cut the cycle so reference counting frees the connection
        # now, rather than the cyclic collector walking thousands of them later.
        self.up = self.down = None

    def _log(self, outcome: str, detail: str) -> None:
        hello, route, target = self.hello, self.route, self.target
        fields = {
            "client": f"{self.peer[0]}:{self.peer[1]}" if self.peer else "",
            "sni": hello.sni if hello else None,
            "alpn": ",".join(hello.alpn) if hello and hello.alpn else None,
            "route": route.kind.value if route else None,
            "dc": route.datacenter if route else None,
            "upstream": str(target.endpoint) if target and self.up else None,
            "bytes_up": self.up.bytes if self.up else len(self.buffered),
            "bytes_down": self.down.bytes if self.down else 0,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
            "outcome": outcome,
        }
        if detail:
            fields["detail"] = detail
        access_log.info("connection", extra={"fields": fields})


class Listener:
    """Accepts on one address and owns every connection it accepted."""

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
        self.stats = self.metrics.dataplane
        self.stats.active = lambda: len(self.connections)
        self.table = table  # swapped whole by set_table; read once per connection
        self.host, self.port = host, port
        self.reuse_port = reuse_port
        self.connections: set[Connection] = set()
        self.view = memoryview(bytearray(BUFFER_SIZE))
        use_splice = SPLICE_AVAILABLE and config.pump != "userspace"
        self.pipes: PipePool | None = PipePool(config.max_pipes) if use_splice else None
        self.pump_mode = config.pump if use_splice else "userspace"
        pipes = self.pipes
        if pipes is not None:
            self.stats.pipe_shortages = lambda: pipes.shortages
            self.stats.pipes_open = lambda: pipes.open
        self.poller = Poller(loop, self._handler_failed)
        self._failures_logged: set[str] = set()
        self.hello_deadlines = Deadlines(config.hello_timeout)
        self.connect_deadlines = Deadlines(config.connect_timeout)
        self.sock: socket.socket | None = None
        self._accept_delay = 0.0
        self._idle: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.TimerHandle | None = None
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
            _tune(sock)
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
            self._schedule_sweep()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def listening(self) -> bool:
        return self.sock is not None

    async def open_connections(self) -> int:
        return len(self.connections)

    def set_table(self, table: RouteTable) -> None:
        """New connections use the new table; connections in flight keep their upstream."""
        self.table = table

    def stop_accepting(self) -> None:
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    async def drain(self, timeout: float) -> int:
        """Stop accepting, let open connections finish for up to `timeout` seconds, then close
        the rest. Returns how many had to be closed."""
        self.stop_accepting()
        if self.connections:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        left = list(self.connections)
        for conn in left:
            conn.close("drain_timeout")
        self.close()
        return len(left)

    def close(self) -> None:
        """Close everything now; safe to call again (drain ends with it, shutdown too)."""
        self.stop_accepting()
        for conn in list(self.connections):
            conn.close("shutdown")
        for task in self._tasks:
            task.cancel()
        for sweeper in (self._sweeper, self._deadline_sweeper):
            if sweeper is not None:
                sweeper.cancel()
        if self.pipes is not None:
            self.pipes.close()
        self.poller.close()

    # --- accepting ----------------------------------------------------------------------------

    def _on_accept(self) -> None:
        sock = self.sock
        if sock is None:
            return
        config = self.config
        for _ in range(ACCEPT_BATCH):
            try:
                client, peer = sock.accept()
            except BlockingIOError:
                break
            except OSError as error:
                name = errno.errorcode.get(error.errno or 0, "error")
                self.stats.accept_errors[name] += 1
                if error.errno in RESOURCE_ERRORS:
                    self._back_off(name)
                    return
                continue  # ECONNABORTED and the like: that client is gone, keep accepting
            self._accept_delay = 0.0
            if len(self.connections) >= config.max_connections:
                self.stats.rejections["max_connections"] += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                client.close()
                continue
            try:
                client.setblocking(False)
            except OSError:
                client.close()
                continue
            conn = Connection(self, client, peer)
            self.connections.add(conn)
            conn.start()

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
            len(self.connections),
        )
        self.loop.remove_reader(sock.fileno())

        def resume() -> None:
            if self.sock is sock:
                self.loop.add_reader(sock.fileno(), self._on_accept)

        self.loop.call_later(self._accept_delay, resume)

    def _handler_failed(self, handler: Callable[[int], None], error: Exception) -> None:
        """A bug met by one connection's handler: close that connection, count, log once."""
        self.stats.internal_errors += 1
        signature = f"{type(error).__name__}: {error}"
        if signature not in self._failures_logged and len(self._failures_logged) < 100:
            self._failures_logged.add(signature)
            log.error("connection handler failed; closing that connection", exc_info=error)
        owner = getattr(handler, "__self__", None)
        if isinstance(owner, Connection):
            owner.close("internal_error")

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self._idle is not None and not self.connections:
            self._idle.set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- timeouts ----------------------------------------------------------------------------

    def _sweep_deadlines(self) -> None:
        """Hello and connect deadlines, checked a few times per shortest timeout."""
        now = time.monotonic()
        for conn in self.hello_deadlines.expired(now):
            conn.hello_timed_out()
        for conn in self.connect_deadlines.expired(now):
            conn.connect_timed_out()
        self._compact_tables()
        shortest = min(self.config.hello_timeout, self.config.connect_timeout)
        self._deadline_sweeper = self.loop.call_later(
            min(max(shortest / 10, 0.01), 0.5), self._sweep_deadlines
        )

    def _compact_tables(self) -> None:
        """Tables grown for a past peak of connections give their space back (capacity.py)."""
        capacity.compact(self.connections)
        self.poller.compact()
        self.hello_deadlines.compact()
        self.connect_deadlines.compact()

    def _schedule_sweep(self) -> None:
        idle = self.config.idle_timeout
        assert idle
        self._sweeper = self.loop.call_later(max(idle / 4, 0.05), self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Close connections that moved no byte for idle_timeout; no per-read bookkeeping."""
        idle = self.config.idle_timeout
        assert idle
        now = self.loop.time()
        for conn in list(self.connections):
            up, down = conn.up, conn.down
            if up is None or down is None:
                continue
            moved = up.bytes + down.bytes
            if moved != conn.idle_mark:
                conn.idle_mark, conn.idle_since = moved, now
            elif now - conn.idle_since >= idle:
                conn.close("idle_timeout")
        self._schedule_sweep()
