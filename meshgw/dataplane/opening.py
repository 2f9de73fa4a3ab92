"""A client connection from accept until its upstream has the hello.

[Read a PROXY header from a trusted load balancer →] read the ClientHello (deadline, size cap) →
resolve the SNI → connect upstream (dialer.py: timeout, failover, passive health) → replay the
buffered bytes verbatim → hand the two sockets over to a Tunnel.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time

from meshgw.dataplane.context import DataPlane
from meshgw.dataplane.dialer import Dialer
from meshgw.dataplane.poller import CLOSED, IN
from meshgw.dataplane.tunnel import (
    LINGER_RESET,
    Handover,
    Tunnel,
    access_log,
    log_connection,
)
from meshgw.routing import Route
from meshgw.wire.clienthello import ClientHelloReader, Hello, Rejection
from meshgw.wire.proxyproto import ProxyHeader, ProxyHeaderReader, ProxyRejection

log = logging.getLogger("meshgw.dataplane")

# First bytes that can start a PROXY header (v1 "PROXY ", v2 "\r\n\r\n..."); a ClientHello
# starts with 0x16, so a direct client is never mistaken for one.
_PROXY_STARTS = frozenset(b"P\r")


class Opening:
    __slots__ = (
        "buffered",
        "client",
        "client_backlog",
        "client_eof",
        "client_fd",
        "closed",
        "dialer",
        "dp",
        "hello",
        "peer",
        "preface",
        "reader",
        "replayed",
        "started",
        "upstream_events",
    )

    def __init__(self, dp: DataPlane, client: socket.socket, peer: tuple) -> None:
        self.dp = dp
        self.client = client
        self.client_fd = client.fileno()
        self.peer = peer  # the client's address; a trusted PROXY header replaces it
        self.started = time.monotonic()
        self.closed = False
        proxy = dp.proxy_sources
        self.preface = ProxyHeaderReader() if proxy is not None and proxy.trusts(peer) else None
        # Set while the hello is being read; None once routed.
        self.reader: ClientHelloReader | None = ClientHelloReader(dp.config.max_hello_bytes)
        # Every byte from the client not yet upstream, the PROXY header excepted; replayed.
        self.buffered = bytearray()
        self.replayed = 0  # of those, how many the upstream took already
        self.client_eof = False
        self.client_backlog = False  # bytes left unread in the client socket (buffer bound)
        self.hello: Hello | None = None
        self.dialer: Dialer | None = None
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
            self._received(view[:n])
            if self.closed or (n < len(view) and not until_eof):
                return

    def _received(self, chunk: memoryview) -> None:
        if self.preface is not None:
            rest = self._preface(chunk)
            if rest is None:
                return
            chunk = rest
        elif not self.buffered and self.dp.proxy_sources is not None and chunk[0] in _PROXY_STARTS:
            self._reject("proxy_untrusted", "a PROXY header from a source not allowed to send one")
            return
        self.buffered += chunk
        if self.reader is None:
            # Bytes after the hello (early data) wait for the upstream, within a bound; the
            # rest stays in the socket until the tunnel reads it.
            if len(self.buffered) >= 2 * self.dp.config.max_hello_bytes:
                self.client_backlog = True
            return
        result = self.reader.feed(chunk)
        if isinstance(result, Rejection):
            self._reject(result.reason.value, result.detail)
        elif result is not None:
            self._route(result)

    def _preface(self, chunk: memoryview) -> memoryview | None:
        """Feed the PROXY header reader; what follows the header, or None (more, or refused)."""
        assert self.preface is not None
        before = self.preface.buffered
        result = self.preface.feed(chunk)
        if result is None:
            return None
        if isinstance(result, ProxyRejection):
            self._reject(f"proxy_{result.reason.value}", result.detail)
            return None
        self.preface = None
        if isinstance(result, ProxyHeader) and result.source is not None:
            self.peer = result.source
        return chunk[result.length - before :]

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
        if route is not None:
            self.routed(route)
            return
        refusal = dp.table.refused.get(hello.sni)
        if refusal is not None:
            dp.refused_once(hello.sni, refusal)
            self._reject(refusal)
        elif not dp.await_route(self, hello.sni):
            self._reject("unknown_sni")

    def routed(self, route: Route) -> None:
        """The route is known (at once, or once the control plane answered a demand)."""
        assert self.hello is not None
        if not self.dp.admit(route):
            self._reject("cluster_limit")
            return
        self.dialer = Dialer(self.dp, route, self.hello.sni, self._on_upstream_event)
        self.dialer.connect_next(self, self._exhausted)

    def route_timed_out(self) -> None:
        self._reject("unknown_sni")

    # --- the upstream -------------------------------------------------------------------------

    def _exhausted(self) -> None:
        assert self.dialer is not None
        self._reject("no_upstream")  # the access log names every attempt

    def connect_timed_out(self) -> None:
        dialer = self.dialer
        assert dialer is not None
        dialer.drop(TimeoutError(errno.ETIMEDOUT, "connect timed out"), self)
        self.upstream_events = 0
        dialer.connect_next(self, self._exhausted)

    def _upstream_ready(self) -> None:
        dialer = self.dialer
        assert dialer is not None and dialer.upstream is not None
        try:
            # A failed connect shows up here as the send error (ECONNREFUSED...): no getsockopt.
            sent = dialer.upstream.send(self.buffered)
        except BlockingIOError:
            return  # still connecting (a stale edge), or the hello fills the socket buffer
        except OSError as error:
            if self.replayed:  # part of the hello is upstream already: no failover now
                with contextlib.suppress(OSError):
                    self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                self.close("upstream_reset")
            else:
                dialer.drop(error, self)
                self.upstream_events = 0
                dialer.connect_next(self, self._exhausted)
            return
        if not self.replayed:
            dialer.connected(self)
        self.replayed += sent
        del self.buffered[:sent]
        if not self.buffered:
            self._hand_over(dialer)

    def _hand_over(self, dialer: Dialer) -> None:
        upstream, hello, target = dialer.upstream, self.hello, dialer.target
        assert upstream is not None and hello is not None and target is not None
        self.closed = True  # this phase is over; the sockets now belong to the tunnel
        handover = Handover(
            peer=self.peer,
            hello=hello,
            route=dialer.route,
            target=target,
            started=self.started,
            replayed=self.replayed,
            client_eof=self.client_eof,
            client_backlog=self.client_backlog,
            upstream_events=self.upstream_events,
        )
        tunnel = Tunnel(self.dp, self.client, upstream, handover)
        self.dialer = None  # it points back here: cut the cycle, as the tunnel does at close
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
        dp.forget_waiting(self)
        dp.poller.forget(self.client_fd)
        self.client.close()
        dialer, route = self.dialer, None
        if dialer is not None:
            dialer.close(self)
            route = dialer.route
            dp.release(route)
            if not rejected:
                dp.stats.connections[route.kind.value, route.datacenter, outcome] += 1
        dp.closed(self)
        if dp.config.access_log and access_log.isEnabledFor(logging.INFO):
            tried = "; ".join(dialer.attempts) if dialer is not None else ""
            log_connection(
                self.peer, self.hello, route, None, len(self.buffered) + self.replayed, 0,
                self.started, outcome, detail, tried,
            )  # fmt: skip
        self.dialer = None  # it points back here: cut the cycle
