"""The upstream side of an opening: connect to the route's targets in turn and replay the bytes
the client has sent so far.

Failover is safe until the first byte has gone upstream: a connect that is refused, times out
(the cluster's connect timeout) or fails to take the first bytes moves on to the next target,
marking the failed one down for a while (health.py). Success is seen as the first send that
works: a failed connect shows up as that send's error, so no getsockopt per connection. Every
attempt and its error is kept for the access log.

A socket that cannot be had (the process is out of descriptors) is no fault of the target: the
same target is tried again after a growing pause, until the connect timeout, and nobody is
marked down.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable

from meshgw.dataplane.budget import RESOURCE_ERRORS
from meshgw.dataplane.context import DataPlane
from meshgw.dataplane.poller import Handler
from meshgw.routing import Route, Target

log = logging.getLogger("meshgw.dataplane")

# Pauses before asking again for a socket the process had no descriptor for.
SHORT_RETRY_MIN, SHORT_RETRY_MAX = 0.01, 0.2


def tune(sock: socket.socket) -> None:
    # Latency over batching: TLS handshakes are small, chatty writes. Keepalive finds dead peers
    # on the long, sparse connections WAN gossip and RPC keep open.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def _keepalive(sock: socket.socket, settings: tuple[int, int, int]) -> None:
    idle, interval, probes = settings
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)


def _reason(error: OSError) -> str:
    return errno.errorcode.get(error.errno or 0, "error").lower()


class Dialer:
    __slots__ = (
        "attempts",
        "closed",
        "deadlines",
        "dp",
        "on_event",
        "retry",
        "retry_delay",
        "route",
        "short",
        "sni",
        "started",
        "target",
        "targets",
        "upstream",
        "upstream_fd",
    )

    def __init__(self, dp: DataPlane, route: Route, sni: str, on_event: Handler) -> None:
        self.dp = dp
        self.route = route
        self.sni = sni
        self.on_event = on_event  # the opening's handler for the upstream socket's edges
        self.started = time.monotonic()
        outliers = dp.outliers
        self.targets = route.cluster.attempt_order(lambda t: outliers.is_down(t.address))
        timeout = route.cluster.settings.connect_timeout or dp.config.connect_timeout
        self.deadlines = dp.connect_deadlines(timeout)
        self.target: Target | None = None
        self.upstream: socket.socket | None = None
        self.upstream_fd = -1
        self.attempts: list[str] = []  # "address error" of every failed target, in order
        self.closed = False
        self.short: Target | None = None  # waiting for a descriptor to connect to it
        self.retry: asyncio.TimerHandle | None = None
        self.retry_delay = 0.0

    def connect_next(self, waiter: object, exhausted: Callable[[], None]) -> None:
        """Connect to the next target; `exhausted` when none is left. `waiter` is what the
        connect deadline names when it passes."""
        while self.targets:
            target = self.targets.pop(0)
            if target.sockaddr is None:
                self.dp.spawn(self._resolve_then_connect(target, waiter, exhausted))
                return
            try:
                sock = self._socket(target)
            except OSError as error:
                if error.errno in RESOURCE_ERRORS:
                    self._wait_for_descriptor(target, error, waiter, exhausted)
                    return
                self.failed(target, error)
                continue
            try:
                code = sock.connect_ex(target.sockaddr)
            except OSError as error:
                code = error.errno or errno.EINVAL
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                self.failed(target, OSError(code, errno.errorcode.get(code, str(code))))
                continue
            self.upstream, self.upstream_fd, self.target = sock, sock.fileno(), target
            self.deadlines.add(waiter, time.monotonic())
            # Writable (connected) or an error is reported as an edge on this registration.
            self.dp.poller.register(self.upstream_fd, self.on_event)
            return
        exhausted()

    def _wait_for_descriptor(
        self, target: Target, error: OSError, waiter: object, exhausted: Callable[[], None]
    ) -> None:
        """Counted, but the target is not marked down: ask again for the same target after a
        growing pause. The connect timeout, armed at the first shortage, bounds the wait."""
        route = self.route
        self.dp.stats.upstream_failures[route.kind.value, route.datacenter, _reason(error)] += 1
        if self.retry_delay == 0.0:  # the first shortage of this wait
            self.deadlines.add(waiter, time.monotonic())
        self.short = target
        self.retry_delay = min(max(self.retry_delay * 2, SHORT_RETRY_MIN), SHORT_RETRY_MAX)
        self.retry = self.dp.loop.call_later(self.retry_delay, self._retry_short, waiter, exhausted)

    def _retry_short(self, waiter: object, exhausted: Callable[[], None]) -> None:
        target, self.short, self.retry = self.short, None, None
        assert target is not None
        self.targets.insert(0, target)
        self.connect_next(waiter, exhausted)

    def _socket(self, target: Target) -> socket.socket:
        sock = socket.socket(target.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            tune(sock)
            keepalive = self.route.cluster.settings.keepalive
            if keepalive is not None:
                _keepalive(sock, keepalive)
        except OSError:
            sock.close()
            raise
        return sock

    async def _resolve_then_connect(
        self, target: Target, waiter: object, exhausted: Callable[[], None]
    ) -> None:
        """A host name the resolver has not answered for yet: resolve it now, off the loop."""
        endpoint = target.endpoint
        try:
            infos = await self.dp.loop.getaddrinfo(
                endpoint.host, endpoint.port, type=socket.SOCK_STREAM
            )
        except OSError as error:
            infos = []
            self.failed(target, error)
        if self.closed:  # the opening ended meanwhile
            return
        resolved = [Target.of(endpoint, str(sockaddr[0])) for _, _, _, _, sockaddr in infos]
        self.targets[:0] = resolved
        self.connect_next(waiter, exhausted)

    def failed(self, target: Target, error: OSError) -> None:
        """This target failed before anything was sent to it: count, remember, mark it down."""
        route, reason = self.route, _reason(error)
        self.dp.stats.upstream_failures[route.kind.value, route.datacenter, reason] += 1
        self.dp.outliers.failed(target.address, reason)
        self.attempts.append(f"{target.address} {reason}")
        log.debug("upstream %s failed for %s: %s", target.address, self.sni, error)

    def drop(self, error: OSError, waiter: object) -> None:
        """The current target failed before anything was sent to it: let go of it."""
        self.deadlines.discard(waiter)
        if self.target is not None:
            self.failed(self.target, error)
        elif self.short is not None:  # the connect timeout passed while no descriptor came
            self.attempts.append(f"{self.short.address} no descriptor")
        self.release()

    def connected(self, waiter: object) -> None:
        """The first bytes went through: this target works."""
        self.deadlines.discard(waiter)
        assert self.target is not None
        self.dp.outliers.succeeded(self.target.address)
        self.dp.stats.connected(self.route.kind.value, time.monotonic() - self.started)

    def close(self, waiter: object) -> None:
        """The opening ends without a tunnel: give everything back."""
        self.closed = True
        self.deadlines.discard(waiter)
        self.release()

    def release(self) -> None:
        """Close the current upstream socket, if any (the tunnel did not take it), or stop
        waiting for a descriptor."""
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        self.short, self.retry_delay = None, 0.0
        if self.upstream is not None:
            self.dp.poller.forget(self.upstream_fd)
            self.upstream.close()
            self.upstream, self.upstream_fd, self.target = None, -1, None
