"""A client connection from accept until its upstream has the hello.

Read the ClientHello (deadline, size cap) → resolve the SNI → connect upstream (timeout, fail
over to the next endpoint: nothing has been sent yet) → replay the buffered bytes verbatim →
hand the two sockets over to a Tunnel.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time

from meshgw.dataplane.context import DataPlane
from meshgw.dataplane.poller import CLOSED, IN
from meshgw.dataplane.tunnel import (
    LINGER_RESET,
    Handover,
    Tunnel,
    access_log,
    log_connection,
)
from meshgw.routing import Route, Target
from meshgw.wire.clienthello import ClientHelloReader, Hello, Rejection

log = logging.getLogger("meshgw.dataplane")


def tune(sock: socket.socket) -> None:
    # Latency over batching: TLS handshakes are small, chatty writes. Keepalive finds dead peers
    # on the long, sparse connections WAN gossip and RPC keep open.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class Opening:
    __slots__ = (
        "buffered",
        "client",
        "client_backlog",
        "client_eof",
        "client_fd",
        "closed",
        "dp",
        "hello",
        "peer",
        "reader",
        "replayed",
        "route",
        "started",
        "target",
        "targets",
        "upstream",
        "upstream_events",
        "upstream_fd",
    )

    def __init__(self, dp: DataPlane, client: socket.socket, peer: tuple) -> None:
        self.dp = dp
        self.client = client
        self.client_fd = client.fileno()
        self.peer = peer
        self.started = time.monotonic()
        self.closed = False
        # Set while the hello is being read; None once routed.
        self.reader: ClientHelloReader | None = ClientHelloReader(dp.config.max_hello_bytes)
        # Every byte from the client not yet upstream; replayed verbatim.
        self.buffered = bytearray()
        self.replayed = 0  # of those, how many the upstream took already
        self.client_eof = False
        self.client_backlog = False  # bytes left unread in the client socket (buffer bound)
        self.hello: Hello | None = None
        self.route: Route | None = None
        self.targets: list[Target] = []
        self.target: Target | None = None
        self.upstream: socket.socket | None = None
        self.upstream_fd = -1
        self.upstream_events = 0  # what the upstream said while connecting, for the tunnel

    def start(self) -> None:
        """Begin with the hello. With TCP_DEFER_ACCEPT it is usually here already: reading it
        before registering saves a wake-up (registering reports only what is still unread)."""
        self.dp.hello_deadlines.add(self, self.started)
        self._read_client(until_eof=False)
        if not self.closed:
            self.dp.poller.register(self.client_fd, self._on_client_event)

    def _on_client_event(self, events: int) -> None:
        if events & (IN | CLOSED):
            self._read_client(until_eof=bool(events & CLOSED))

    def _on_upstream_event(self, events: int) -> None:
        self.upstream_events |= events
        self._upstream_ready()

    # --- the client, until the upstream has the hello -----------------------------------------

    def _read_client(self, until_eof: bool) -> None:
        """Read what the client sent before any upstream exists: the hello, maybe more.

        `until_eof`: the client also closed its side; read on to see the EOF, which no later
        edge would report.
        """
        view = self.dp.view
        cap = self.dp.config.max_hello_bytes
        while not self.client_eof and not self.client_backlog:
            try:
                n = self.client.recv_into(view)
            except BlockingIOError:
                return
            except OSError:
                self._reject("client_reset")
                return
            if n == 0:
                if self.reader is not None:
                    self._reject("client_closed")
                    return
                self.client_eof = True  # a half-close after the hello: the tunnel delivers it
                return
            chunk = view[:n]
            self.buffered += chunk
            if self.reader is None:
                # Bytes after the hello (early data) wait for the upstream, within a bound;
                # the rest stays in the socket until the tunnel reads it.
                if len(self.buffered) >= 2 * cap:
                    self.client_backlog = True
                    return
                continue
            result = self.reader.feed(chunk)
            if result is None:
                continue
            if isinstance(result, Rejection):
                self._reject(result.reason.value, result.detail)
                return
            self._route(result)
            if self.closed or (n < len(view) and not until_eof):
                return

    def hello_timed_out(self) -> None:
        self._reject("hello_timeout")

    def _route(self, hello: Hello) -> None:
        dp = self.dp
        dp.hello_deadlines.discard(self)
        self.hello = hello
        self.reader = None  # the hello is done: free its buffer
        stats = dp.stats
        stats.hello_bytes.observe(hello.length)
        stats.hello_seconds.observe(time.monotonic() - self.started)
        for protocol in hello.alpn or ("none",):
            stats.offered(protocol)
        route = dp.table.resolve(hello.sni)
        if route is None:
            self._reject("unknown_sni")
            return
        self.route = route
        self.targets = route.cluster.attempt_order()
        self._connect_next()

    # --- the upstream, with failover ----------------------------------------------------------

    def _connect_next(self) -> None:
        while self.targets:
            target = self.targets.pop(0)
            if target.sockaddr is None:
                self.dp.spawn(self._resolve_then_connect(target))
                return
            try:
                sock = socket.socket(target.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as error:
                self._count_failure(error)
                continue
            try:
                tune(sock)
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
            self.dp.connect_deadlines.add(self, time.monotonic())
            # Writable (connected) or an error is reported as an edge on this registration.
            self.dp.poller.register(self.upstream_fd, self._on_upstream_event)
            return
        self._reject("no_upstream")

    async def _resolve_then_connect(self, target: Target) -> None:
        """Slow path for endpoints named by DNS: resolve, then try the addresses in order."""
        endpoint = target.endpoint
        try:
            infos = await self.dp.loop.getaddrinfo(
                endpoint.host, endpoint.port, type=socket.SOCK_STREAM
            )
        except OSError as error:
            infos = []
            self._count_failure(error)
        if self.closed:
            return
        resolved = [Target.of(endpoint, str(sockaddr[0])) for _, _, _, _, sockaddr in infos]
        self.targets[:0] = resolved
        self._connect_next()

    def connect_timed_out(self) -> None:
        self._drop_upstream(TimeoutError(errno.ETIMEDOUT, "connect timed out"))

    def _drop_upstream(self, error: OSError) -> None:
        """This endpoint failed before anything was sent to it: try the next one."""
        self._count_failure(error)
        self.dp.connect_deadlines.discard(self)
        if self.upstream is not None:
            self.dp.poller.forget(self.upstream_fd)
            self.upstream.close()
            self.upstream = None
            self.upstream_fd = -1
            self.upstream_events = 0
        self._connect_next()

    def _count_failure(self, error: OSError) -> None:
        route = self.route
        assert route is not None
        reason = errno.errorcode.get(error.errno or 0, "error").lower()
        self.dp.stats.upstream_failures[route.kind.value, route.datacenter, reason] += 1
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
            if self.replayed:  # part of the hello is upstream already: no failover now
                with contextlib.suppress(OSError):
                    self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                self.close("upstream_reset")
            else:
                self._drop_upstream(error)
            return
        if not self.replayed:  # the first bytes went through: connected
            self.dp.connect_deadlines.discard(self)
            route = self.route
            assert route is not None
            self.dp.stats.connected(route.kind.value, time.monotonic() - self.started)
        self.replayed += sent
        del self.buffered[:sent]
        if not self.buffered:
            self._hand_over()

    def _hand_over(self) -> None:
        upstream, hello, route, target = self.upstream, self.hello, self.route, self.target
        assert upstream is not None and hello and route and target
        self.closed = True  # this phase is over; the sockets now belong to the tunnel
        handover = Handover(
            peer=self.peer,
            hello=hello,
            route=route,
            target=target,
            started=self.started,
            replayed=self.replayed,
            client_eof=self.client_eof,
            client_backlog=self.client_backlog,
            upstream_events=self.upstream_events,
        )
        tunnel = Tunnel(self.dp, self.client, upstream, handover)
        self.dp.handed_over(self, tunnel)
        tunnel.start(handover)

    # --- the end ------------------------------------------------------------------------------

    def _reject(self, reason: str, detail: str = "") -> None:
        self.dp.stats.rejections[reason] += 1
        self._end(reason, detail, rejected=True)

    def close(self, outcome: str) -> None:
        """Closed from outside (drain, shutdown, a bug in a handler) before the tunnel."""
        self._end(outcome, "", rejected=False)

    def _end(self, outcome: str, detail: str, rejected: bool) -> None:
        if self.closed:
            return
        self.closed = True
        dp = self.dp
        dp.hello_deadlines.discard(self)
        dp.connect_deadlines.discard(self)
        dp.poller.forget(self.client_fd)
        self.client.close()
        if self.upstream is not None:
            dp.poller.forget(self.upstream_fd)
            self.upstream.close()
        route = self.route
        if route is not None and not rejected:
            dp.stats.connections[route.kind.value, route.datacenter, outcome] += 1
        dp.closed(self)
        if dp.config.access_log and access_log.isEnabledFor(logging.INFO):
            log_connection(
                self.peer, self.hello, route, None, len(self.buffered) + self.replayed, 0,
                self.started, outcome, detail,
            )  # fmt: skip
