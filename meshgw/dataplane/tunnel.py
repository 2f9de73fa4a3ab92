"""An open connection: the hello has gone upstream, two Flows move everything else.

EOF from one side becomes a half-close of the other once everything before it is delivered;
an error on one side resets the other; the last close accounts the bytes and writes the
access-log line. The Tunnel takes over the sockets' poller registrations from the Opening by
swapping their handlers (no system call).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from dataclasses import dataclass

from meshgw.dataplane.context import DataPlane
from meshgw.dataplane.poller import CLOSED, IN, OUT
from meshgw.dataplane.pump import Flow
from meshgw.routing import Route, Target
from meshgw.wire.clienthello import Hello

access_log = logging.getLogger("meshgw.access")

LINGER_RESET = struct.pack("ii", 1, 0)  # close() then sends RST instead of FIN


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
    )

    def __init__(
        self, dp: DataPlane, client: socket.socket, upstream: socket.socket, handover: Handover
    ) -> None:
        self.dp = dp
        self.client, self.upstream = client, upstream
        self.client_fd, self.upstream_fd = client.fileno(), upstream.fileno()
        self.peer, self.hello = handover.peer, handover.hello
        self.route, self.target, self.started = handover.route, handover.target, handover.started
        mode, pipes, view = dp.pump_mode, dp.pipes, dp.view
        self.up: Flow | None = Flow(self, client, upstream, view, pipes, mode)
        self.down: Flow | None = Flow(self, upstream, client, view, pipes, mode)
        self.up.bytes = handover.replayed
        self.closed = False
        self.idle_mark = 0
        self.idle_since = dp.loop.time()

    def start(self, handover: Handover) -> None:
        """Take the sockets' events over, then act on what happened before the flows
        existed: the upstream may have answered (or closed) already, the client may have
        half-closed, or left more bytes than the Opening's bound let it read."""
        poller = self.dp.poller
        poller.swap(self.client_fd, self._on_client_event)
        poller.swap(self.upstream_fd, self._on_upstream_event)
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
        if events & OUT:
            self.down.writable()  # type: ignore[union-attr]
        if events & (IN | CLOSED) and not self.closed:
            self.up.readable(bool(events & CLOSED))  # type: ignore[union-attr]

    def _on_upstream_event(self, events: int) -> None:
        if events & OUT:
            self.up.writable()  # type: ignore[union-attr]
        if events & (IN | CLOSED) and not self.closed:
            self.down.readable(bool(events & CLOSED))  # type: ignore[union-attr]

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


def log_connection(
    peer: tuple | None,
    hello: Hello | None,
    route: Route | None,
    target: Target | None,
    bytes_up: int,
    bytes_down: int,
    started: float,
    outcome: str,
    detail: str = "",
    tried: str = "",
) -> None:
    """The access-log line of one connection, whichever phase it ended in. `tried`: the
    upstreams that failed before, and their errors."""
    fields = {
        "client": f"{peer[0]}:{peer[1]}" if peer else "",
        "sni": hello.sni if hello else None,
        "alpn": ",".join(hello.alpn) if hello and hello.alpn else None,
        "route": route.kind.value if route else None,
        "dc": route.datacenter if route else None,
        "upstream": str(target.endpoint) if target else None,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "duration_ms": round((time.monotonic() - started) * 1000, 3),
        "outcome": outcome,
    }
    if tried:
        fields["tried"] = tried
    if detail:
        fields["detail"] = detail
    access_log.info("connection", extra={"fields": fields})
