"""A connection whose bytes the kernel moves (sockmap.py): this process only watches its end.

A userspace Tunnel becomes one when it is joined (tunnel.py, `Tunnel.promote`). It has the same
face for the listener as a Tunnel (`close(outcome)`, `moved()`, the idle marks) and follows the
end-of-stream protocol of sockmap.py:
- its sockets are registered for their end only (JOINED_EVENTS): no wake-up per request;
- EOF on one side (EPOLLRDHUP, or EPOLLHUP) becomes shutdown(SHUT_WR) on the other once
  `flushed` says every byte before it has been written there; until then the check is
  retried on the loop after a growing delay (the bytes leave at the pace of the reader; the
  idle timeout bounds a reader that never reads);
- an error (EPOLLERR) resets the other side, as a Tunnel does;
- a fault of the program (a buffer it could not make exact, whose bytes it dropped) resets
  both sides: they must not take the stream for whole;
- closing leaves the tunnel first (freeing its slots), then closes both sockets, accounts the
  bytes (those moved in userspace before the join, plus the kernel's counters) and writes the
  access-log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import sys
from typing import Protocol

from meshgw.dataplane import sockmap
from meshgw.dataplane.context import DataPlane
from meshgw.dataplane.ending import LINGER_RESET, access_log, log_connection
from meshgw.dataplane.kernelplane import KernelPlane
from meshgw.routing import Route, Target
from meshgw.wire.clienthello import Hello

log = logging.getLogger("meshgw.dataplane")

if sys.platform == "linux":
    ERROR = select.EPOLLERR
    ENDED = select.EPOLLRDHUP | select.EPOLLHUP
else:  # pragma: no cover
    ERROR, ENDED = 0x8, 0x2010

# Delays between `flushed` checks after an EOF: the first catches the common case (the last
# bytes are on their way out within a millisecond), the growth keeps a slow reader cheap.
FLUSH_RETRY_FIRST, FLUSH_RETRY_LAST = 0.001, 0.25
UP, DOWN = 0, 1  # directions: client → upstream, upstream → client


class Origin(Protocol):
    """What a kernel tunnel keeps of the userspace tunnel it replaces."""

    peer: tuple
    hello: Hello
    route: Route
    target: Target
    started: float
    idle_mark: int
    idle_since: float


class KernelTunnel:
    __slots__ = (
        "before",
        "client",
        "client_fd",
        "closed",
        "dp",
        "ended",
        "handle",
        "hello",
        "idle_mark",
        "idle_since",
        "kernel",
        "peer",
        "retries",
        "route",
        "shut",
        "started",
        "target",
        "upstream",
        "upstream_fd",
    )

    def __init__(
        self,
        dp: DataPlane,
        kernel: KernelPlane,
        handle: sockmap.Tunnel,
        origin: Origin,
        before: tuple[int, int],
    ) -> None:
        self.dp, self.kernel, self.handle = dp, kernel, handle
        self.client, self.upstream = handle.a, handle.b
        self.client_fd, self.upstream_fd = handle.a.fileno(), handle.b.fileno()
        self.peer, self.hello, self.route = origin.peer, origin.hello, origin.route
        self.target, self.started = origin.target, origin.started
        self.idle_mark, self.idle_since = origin.idle_mark, origin.idle_since
        self.before = before  # bytes moved before the join, (up, down)
        self.ended = [False, False]  # EOF seen, per direction
        self.shut = [False, False]  # ... and passed on
        self.retries: list[asyncio.TimerHandle | None] = [None, None]
        self.closed = False

    def start(self) -> None:
        """Take the sockets' events over, for their end only. A socket that already ended or
        failed is reported again by the change."""
        poller = self.dp.poller
        self.handle.on_fault = self._on_fault
        poller.swap(self.client_fd, self._on_client_event)
        poller.swap(self.upstream_fd, self._on_upstream_event)
        poller.modify(self.client_fd, sockmap.JOINED_EVENTS)
        poller.modify(self.upstream_fd, sockmap.JOINED_EVENTS)

    # --- the end of each direction ----------------------------------------------------------

    def _on_client_event(self, events: int) -> None:
        self._on_event(events, UP)

    def _on_upstream_event(self, events: int) -> None:
        self._on_event(events, DOWN)

    def _on_event(self, events: int, direction: int) -> None:
        # Readable or writable bits come only from an edge reported before the join: nothing
        # to do, the kernel reads and writes these sockets now.
        if self.closed:
            return
        if events & ERROR:
            self._reset(self._source(direction))
        elif events & ENDED and not self.ended[direction]:
            self.ended[direction] = True
            self._flush(direction, FLUSH_RETRY_FIRST)

    def _retry(self, direction: int, delay: float) -> None:
        """A timer's call: a bug here closes this connection only, as in a poller handler."""
        self.retries[direction] = None
        try:
            self._flush(direction, delay)
        except Exception as error:
            self.dp.poller.failed(self._retry, error)

    def _flush(self, direction: int, delay: float) -> None:
        """Shut the other side for writing once everything before the EOF has reached it."""
        if self.closed:
            return
        src = self._source(direction)
        if not self.kernel.tunnels.flushed(self.handle, src):
            self.kernel.wake()  # the rest may be bytes userspace has to forward
            self.retries[direction] = self.dp.loop.call_later(
                delay, self._retry, direction, min(delay * 2, FLUSH_RETRY_LAST)
            )
            return
        self.shut[direction] = True
        if all(self.shut):
            self.close("closed")  # close() sends this last FIN: no shutdown() needed
            return
        dst = self._source(1 - direction)
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            self._reset(dst)

    def _source(self, direction: int) -> socket.socket:
        return self.client if direction == UP else self.upstream

    def _on_fault(self) -> None:
        """The kernel handed the program a buffer it could not make exact; it dropped it and
        everything after. Reset both sides rather than let either take the stream for whole."""
        log.warning(
            "kernel tunnel from %s to %s: a received buffer could not be made exact; "
            "connection reset",
            self.peer[0],
            self.target.address,
        )
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.close("tunnel_fault")

    def _reset(self, dead: socket.socket) -> None:
        """One side failed: reset the other, so it learns of the abort (RST, not FIN)."""
        other = self.upstream if dead is self.client else self.client
        with contextlib.suppress(OSError):
            other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.close("client_reset" if dead is self.client else "upstream_reset")

    # --- the face the listener knows --------------------------------------------------------

    def moved_each(self) -> tuple[int, int]:
        """Bytes moved so far, (up, down): before the join and since (shared memory reads)."""
        up, down = self.kernel.tunnels.moved(self.handle)
        return self.before[UP] + up, self.before[DOWN] + down

    def moved(self) -> int:
        """Bytes moved both ways so far (the idle sweep compares it between rounds)."""
        up, down = self.moved_each()
        return up + down

    def close(self, outcome: str) -> None:
        if self.closed:
            return
        self.closed = True
        for index, retry in enumerate(self.retries):
            if retry is not None:
                retry.cancel()  # it refers to this tunnel: no cycle left behind
                self.retries[index] = None
        bytes_up, bytes_down = self.moved_each()  # before leaving: the slots get reused
        self.kernel.tunnels.leave(self.handle)
        self.handle.on_fault = None  # it refers to this tunnel: no cycle left behind
        dp = self.dp
        poller = dp.poller
        poller.forget(self.client_fd)
        poller.forget(self.upstream_fd)
        self.client.close()
        self.upstream.close()
        stats, route = dp.stats, self.route
        dp.release(route)  # the cluster's connection count, as a Tunnel's close does
        kind, dc = route.kind.value, route.datacenter
        stats.connections[kind, dc, outcome] += 1
        stats.bytes[kind, dc, "upstream"] += bytes_up
        stats.bytes[kind, dc, "downstream"] += bytes_down
        dp.closed(self)
        if dp.config.access_log and access_log.isEnabledFor(logging.INFO):
            log_connection(
                self.peer, self.hello, route, self.target, bytes_up, bytes_down,
                self.started, outcome,
            )  # fmt: skip
