"""One direction of a proxied connection: move bytes from `src` to `dst`, verbatim.

Both sockets are registered once, edge-triggered, for reading and writing (see poller.py), so a
flow is told "src may have bytes" and "dst may take bytes" and never asks the kernel to change a
registration. With edge triggering a flow must read until the socket is drained; a read that
returns less than it asked for means drained, unless the peer also closed (EPOLLRDHUP), in which
case it reads on to the EOF.

Two ways to move bytes:
- userspace: `recv_into` a buffer shared by every connection of the process, then `send`. For
  small request/response traffic this is as cheap as splice (two system calls either way) and
  holds no per-connection memory.
- splice: socket → pipe → socket inside the kernel; the bulk path.
In `auto` mode a flow starts in userspace and switches to splice for good the first time one read
fills the whole shared buffer (a bulk transfer), as HAProxy's splice-auto does.

Backpressure is explicit and symmetrical: when `dst` cannot take everything, the flow keeps what
it holds, stops reading `src` and waits for `dst` to become writable; then it flushes and reads
again. EOF on `src` becomes `shutdown(SHUT_WR)` on `dst` once everything before it is delivered
(half-close); the other direction keeps flowing.
"""

from __future__ import annotations

import os
import socket
from typing import Protocol

from meshgw.dataplane.splice import SPLICE_FLAGS, PipePool

BUFFER_SIZE = 65536


class Owner(Protocol):
    """What a flow needs from its connection."""

    def flow_finished(self, flow: Flow) -> None: ...
    def abort(self, dead: socket.socket, error: OSError) -> None: ...


class Flow:
    __slots__ = (
        "bytes",
        "done",
        "dst",
        "dst_fd",
        "eof",
        "in_pipe",
        "owner",
        "paused",
        "pending",
        "pipe",
        "pool",
        "splice",
        "splice_when_bulk",
        "src",
        "src_fd",
        "view",
    )

    def __init__(
        self,
        owner: Owner,
        src: socket.socket,
        dst: socket.socket,
        view: memoryview,
        pool: PipePool | None,
        mode: str,
    ) -> None:
        self.owner = owner
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.view = view  # the process-wide read buffer
        self.pool = pool  # None where splice is unavailable or not wanted
        self.splice = pool is not None and mode == "splice"
        self.splice_when_bulk = pool is not None and mode == "auto"
        self.pending = b""  # userspace bytes read but not yet sent
        self.pipe: tuple[int, int] | None = None
        self.in_pipe = 0  # bytes sitting in self.pipe
        self.paused = False  # dst is full: src is left unread until dst drains
        self.eof = False  # src said EOF; dst is shut once what is held is delivered
        self.done = False  # EOF delivered
        self.bytes = 0

    # --- events -------------------------------------------------------------------------------

    def readable(self, until_eof: bool) -> None:
        """`src` has bytes or an EOF: move them until it is drained or `dst` is full.

        `until_eof`: the peer closed its side too (or readiness was not tracked while paused),
        so read on until EOF or EAGAIN rather than stopping at the first short read.
        """
        if self.paused or self.eof:
            return
        if self.splice and self._splice():
            return
        view = self.view
        size = len(view)
        src, dst = self.src, self.dst
        while True:
            try:
                n = src.recv_into(view)
            except BlockingIOError:
                return
            except OSError as error:
                self.owner.abort(src, error)
                return
            if n == 0:
                self.at_eof()
                return
            self.bytes += n
            try:
                sent = dst.send(view[:n])
            except BlockingIOError:
                sent = 0
            except OSError as error:
                self.owner.abort(dst, error)
                return
            if sent < n:
                # The shared buffer is reused by the next read anywhere: keep a copy.
                self.pending = view[sent:n].tobytes()
                self.paused = True
                return
            if n == size:
                if self.splice_when_bulk:
                    self.splice = True
                    if self._splice():
                        return
                    # No pipe to be had: this burst goes on through userspace.
            elif not until_eof:
                return  # a short read drained the socket

    def writable(self) -> None:
        """`dst` can take bytes again: flush what is held, then resume reading `src`."""
        if self.pending:
            try:
                sent = self.dst.send(self.pending)
            except BlockingIOError:
                return
            except OSError as error:
                self.owner.abort(self.dst, error)
                return
            self.pending = self.pending[sent:]
            if self.pending:
                return
        elif self.in_pipe:
            if not self._splice_out():
                return
            self._release_pipe()
        else:
            return  # nothing held: a writable edge with nothing to say
        if self.eof:
            self._finish()
        elif self.paused:
            self.paused = False
            # Readiness edges on src were ignored while paused: read on until EAGAIN.
            self.readable(until_eof=True)

    # --- splice path --------------------------------------------------------------------------

    def _splice(self) -> bool:
        """Move a burst through a pipe until `src` is drained or `dst` is full. False when no
        pipe could be had (nothing was read): the caller moves the burst in userspace."""
        pool = self.pool
        assert pool is not None
        src_fd = self.src_fd
        while True:
            pipe = self.pipe
            if pipe is None:
                pipe = self.pipe = pool.take()
                if pipe is None:
                    return False
            want = pool.capacity or BUFFER_SIZE
            try:
                n = os.splice(src_fd, pipe[1], want, flags=SPLICE_FLAGS)
            except BlockingIOError:
                self._release_pipe()
                return True
            except OSError as error:
                self.owner.abort(self.src, error)
                return True
            if n == 0:
                self._release_pipe()
                self.at_eof()
                return True
            self.bytes += n
            self.in_pipe = n
            if not self._splice_out():
                self.paused = True  # keep the pipe and its bytes until dst drains
                return True
            # No early stop on a short splice: a pipe also fills up by slots (one per socket
            # buffer), so a short count does not prove the socket drained. Read to EAGAIN.

    def _splice_out(self) -> bool:
        """Move the pipe's bytes to `dst`; True once the pipe is empty."""
        read_end = self.pipe[0]  # type: ignore[index]
        dst_fd = self.dst_fd
        while self.in_pipe:
            try:
                sent = os.splice(read_end, dst_fd, self.in_pipe, flags=SPLICE_FLAGS)
            except BlockingIOError:
                return False
            except OSError as error:
                self.owner.abort(self.dst, error)
                return False
            self.in_pipe -= sent
        return True

    def _release_pipe(self) -> None:
        if self.pipe is not None and not self.in_pipe:
            self.pool.give(self.pipe)  # type: ignore[union-attr]
            self.pipe = None

    @property
    def quiet(self) -> bool:
        """Holds no byte and has seen no EOF: a kernel tunnel may take this direction over."""
        return not (self.pending or self.in_pipe or self.eof)

    # --- the end ------------------------------------------------------------------------------

    def at_eof(self) -> None:
        """`src` said EOF: shut `dst` for writing once everything held is delivered."""
        self.eof = True
        if not self.pending and not self.in_pipe:
            self._finish()

    def _finish(self) -> None:
        self.done = True
        self.owner.flow_finished(self)  # shuts dst for writing, or closes both

    def release(self) -> None:
        """Give back or close the pipe when the connection closes."""
        if self.pipe is not None:
            if self.in_pipe:
                self.pool.discard(self.pipe)  # type: ignore[union-attr]  # bytes left: never reuse
            else:
                self.pool.give(self.pipe)  # type: ignore[union-attr]
            self.pipe = None
            self.in_pipe = 0
