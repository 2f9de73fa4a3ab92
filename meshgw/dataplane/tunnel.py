"""An open connection: the hello has gone upstream, two Flows move everything else.

EOF from one side becomes a half-close of the other once everything before it is delivered;
an error on one side resets the other; the last close accounts the bytes and writes the
access-log line. The Tunnel takes over the sockets' poller registrations from the Opening by
swapping their handlers (no system call).

Where the data plane has kernel tunnels (kernelplane.py), a Tunnel may hand both sockets to
one (`promote`) at a moment when neither Flow holds a byte: at once in sockmap mode, once it
has shown it is long-lived in auto mode. It then gives way to a KernelTunnel.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass

from meshgw.dataplane.context import DataPlane
from meshgw.dataplane.ending import LINGER_RESET, access_log, log_connection
from meshgw.dataplane.kernelplane import RETRY, KernelPlane
from meshgw.dataplane.kerneltunnel import KernelTunnel
from meshgw.dataplane.poller import CLOSED, IN, OUT
from meshgw.dataplane.pump import Flow
from meshgw.dataplane.sockmap import TunnelRefused
from meshgw.routing import Route, Target
from meshgw.wire.clienthello import Hello

__all__ = ["LINGER_RESET", "Handover", "Tunnel", "access_log", "log_connection"]


@dataclass(slots=True)
class Handover:
    """What an Opening passes to its Tunnel besides the two sockets."""

    peer: tuple
    hello: Hello
    route: Route
    target: Target
    started: float  # time.monotonic() at accept
    replayed: int  # bytes the Opening sent upstream (the hello, maybe more)
    client_eof: bool  # the client half-closed while the upstream was connecting
    client_backlog: bool  # bytes wait unread in the client socket (the Opening's bound)
    upstream_events: int  # edges the upstream reported that no Flow has seen yet


class Tunnel:
    __slots__ = (
        "client",
        "client_fd",
        "closed",
        "down",
        "dp",
        "hello",
        "idle_mark",
        "idle_since",
        "peer",
        "route",
        "started",
        "target",
        "up",
        "upstream",
        "upstream_fd",
        "wakeups",
    )

    def __init__(
        self, dp: DataPlane, client: socket.socket, upstream: socket.socket, handover: Handover
    ) -> None:
        self.dp = dp
        self.client, self.upstream = client, upstream
        self.client_fd, self.upstream_fd = client.fileno(), upstream.fileno()
        self.peer, self.hello = handover.peer, handover.hello
        self.route, self.target, self.started = handover.route, handover.target, handover.started
        mode, pipes, view = dp.flow_mode, dp.pipes, dp.view
        self.up: Flow | None = Flow(self, client, upstream, view, pipes, mode)
        self.down: Flow | None = Flow(self, upstream, client, view, pipes, mode)
        self.up.bytes = handover.replayed
        self.closed = False
        self.idle_mark = 0
        self.idle_since = dp.loop.time()
        self.wakeups = 0  # events handled: what a kernel tunnel would have spared

    def start(self, handover: Handover) -> None:
        """Take the sockets' events over (or hand them to a kernel tunnel), then act on what
        happened before the flows existed: the upstream may have answered (or closed)
        already, the client may have half-closed, or left more bytes than the Opening's
        bound let it read."""
        poller = self.dp.poller
        poller.swap(self.client_fd, self._on_client_event)
        poller.swap(self.upstream_fd, self._on_upstream_event)
        kernel = self.dp.kernel
        if kernel is not None and self._join_at_start(kernel, handover.client_eof):
            return
        up, down = self.up, self.down
        assert up is not None and down is not None
        if handover.client_eof:
            up.at_eof()
        events = handover.upstream_events
        if events & (IN | CLOSED) and not self.closed:
            down.readable(bool(events & CLOSED))
        if handover.client_backlog and not self.closed:
            up.readable(until_eof=False)

    # --- the hot path -------------------------------------------------------------------------

    def _on_client_event(self, events: int) -> None:
        self.wakeups += 1
        if events & OUT:
            self.down.writable()  # type: ignore[union-attr]
        if events & (IN | CLOSED) and not self.closed:
            self.up.readable(bool(events & CLOSED))  # type: ignore[union-attr]

    def _on_upstream_event(self, events: int) -> None:
        self.wakeups += 1
        if events & OUT:
            self.up.writable()  # type: ignore[union-attr]
        if events & (IN | CLOSED) and not self.closed:
            self.down.readable(bool(events & CLOSED))  # type: ignore[union-attr]

    # --- into the kernel ----------------------------------------------------------------------

    @property
    def bulk(self) -> bool:
        up, down = self.up, self.down
        return (up is not None and up.splice) or (down is not None and down.splice)

    def promote(self, trigger: str) -> str:
        """Hand both sockets to a kernel tunnel, if neither Flow holds a byte (the join's
        precondition). Returns "joined" (this Tunnel is done), "held" (not now), "closed", or
        why the kernel refused: full, busy, eof (the Flows go on), error (reset, closed)."""
        up, down, kernel = self.up, self.down, self.dp.kernel
        if self.closed or up is None or down is None or kernel is None:
            return "closed"
        if not (up.quiet and down.quiet):
            return "held"
        try:
            handle = kernel.tunnels.join(self.client, self.upstream)
        except TunnelRefused as refused:
            up.bytes += refused.caught_up[0]
            down.bytes += refused.caught_up[1]
            if refused.failed is not None:
                self.abort(refused.failed, OSError(str(refused)))  # a reset, met catching up
            elif refused.reason == "error":
                self._reset_both()
            else:
                # Bytes queued before the attempt have no edge left to announce them.
                self._read_until_drained()
            return refused.reason
        before = (up.bytes + handle.caught_up[0], down.bytes + handle.caught_up[1])
        self.closed = True  # the sockets belong to the kernel tunnel from here on
        up.release()
        down.release()
        self.up = self.down = None  # cut the cycle, as close() does
        kernel.forget(self)
        joined = KernelTunnel(self.dp, kernel, handle, self, before)
        self.dp.stats.kernel_joins[trigger] += 1
        self.dp.handed_over(self, joined)
        joined.start()
        return "joined"

    def _join_at_start(self, kernel: KernelPlane, client_eof: bool) -> bool:
        """Join now (sockmap) or later (auto); True when the sockets are no longer ours."""
        if not kernel.policy.at_start:
            kernel.consider(self)
            return False
        if client_eof:
            return False  # half-closed already: the join could only refuse
        result = self.promote("start")
        if result in RETRY:
            kernel.consider(self)  # full or busy now: try again later
        # Reading on after a refusal may have ended the connection already.
        return result == "joined" or self.closed

    def _read_until_drained(self) -> None:
        if not self.closed:
            self.up.readable(until_eof=True)  # type: ignore[union-attr]
        if not self.closed:
            self.down.readable(until_eof=True)  # type: ignore[union-attr]

    def _reset_both(self) -> None:
        """The join failed half-way: neither side can be trusted to carry on."""
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.close("join_failed")

    # --- what the flows report ----------------------------------------------------------------

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
        with contextlib.suppress(OSError):
            other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.close("client_reset" if dead is self.client else "upstream_reset")

    # --- the end ------------------------------------------------------------------------------

    def moved(self) -> int:
        """Bytes moved both ways so far (the idle sweep compares it between rounds)."""
        up, down = self.up, self.down
        return up.bytes + down.bytes if up is not None and down is not None else 0

    def close(self, outcome: str) -> None:
        if self.closed:
            return
        self.closed = True
        dp = self.dp
        if dp.kernel is not None:
            dp.kernel.forget(self)
        poller = dp.poller
        poller.forget(self.client_fd)
        poller.forget(self.upstream_fd)
        self.client.close()
        self.upstream.close()
        up, down = self.up, self.down
        assert up is not None and down is not None
        up.release()
        down.release()
        stats, route = dp.stats, self.route
        dp.release(route)
        kind, dc = route.kind.value, route.datacenter
        stats.connections[kind, dc, outcome] += 1
        stats.bytes[kind, dc, "upstream"] += up.bytes
        stats.bytes[kind, dc, "downstream"] += down.bytes
        dp.closed(self)
        if dp.config.access_log and access_log.isEnabledFor(logging.INFO):
            log_connection(
                self.peer, self.hello, route, self.target, up.bytes, down.bytes,
                self.started, outcome,
            )  # fmt: skip
        # The flows point back here: cut the cycle so reference counting frees the tunnel
        # now, rather than the cyclic collector walking thousands of them later.
        self.up = self.down = None
