"""One direction of a proxied connection: move bytes from `src` to `dst`, verbatim.

Two ways to move them:
- userspace: `recv_into` a buffer shared by every connection of the process, then `send`. For
  small request/response traffic this is as cheap as splice (two system calls either way) and it
  holds no per-connection memory.
- splice: socket → pipe → socket inside the kernel; the bulk path.
In `auto` mode a flow starts in userspace and switches to splice for good the first time one read
fills the whole shared buffer (a bulk transfer), as HAProxy's splice-auto does.

Backpressure is explicit and symmetrical: when `dst` cannot take everything, the flow stops
reading `src` and waits for `dst` to become writable; then it flushes and reads again. EOF on
`src` becomes `shutdown(SHUT_WR)` on `dst` once everything before it is delivered (half-close);
the other direction keeps flowing.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Protocol

from meshgw.dataplane.splice import SPLICE_FLAGS, PipePool

if TYPE_CHECKING:
    import asyncio

BUFFER_SIZE = 65536


class Owner(Protocol):
    """What a flow needs from its connection."""

    def flow_finished(self) -> None: ...
    def abort(self, dead: socket.socket, error: OSError) -> None: ...


class Flow:
    __slots__ = (
        "bytes",
        "done",
        "dst",
        "dst_fd",
        "in_pipe",
        "loop",
        "owner",
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
        loop: asyncio.AbstractEventLoop,
        owner: Owner,
        src: socket.socket,
        dst: socket.socket,
        view: memoryview,
        pool: PipePool | None,
        mode: str,
    ) -> None:
        self.loop = loop
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
        self.bytes = 0
        self.done = False

    # --- events -------------------------------------------------------------------------------

    def on_readable(self) -> None:
        if self.splice:
            self._splice_in()
            return
        view = self.view
        try:
            n = self.src.recv_into(view)
        except BlockingIOError:
            return
        except OSError as error:
            self.owner.abort(self.src, error)
            return
        if n == 0:
            self.at_eof()
            return
        self.bytes += n
        try:
            sent = self.dst.send(view[:n])
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self.owner.abort(self.dst, error)
            return
        if sent < n:
            # The shared buffer is reused by the next read anywhere: keep a copy of the rest.
            self.pending = view[sent:n].tobytes()
            self._pause()
        elif n == len(view) and self.splice_when_bulk:
            self.splice = True

    def on_writable(self) -> None:
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
        elif self.in_pipe and not self._splice_out():
            return
        self._resume()

    # --- splice path --------------------------------------------------------------------------

    def _splice_in(self) -> None:
        pipe = self.pipe
        if pipe is None:
            pipe = self.pipe = self.pool.take()  # type: ignore[union-attr]
        try:
            n = os.splice(self.src_fd, pipe[1], 1 << 20, flags=SPLICE_FLAGS)
        except BlockingIOError:
            self._release_empty_pipe()
            return
        except OSError as error:
            self.owner.abort(self.src, error)
            return
        if n == 0:
            self._release_empty_pipe()
            self.at_eof()
            return
        self.bytes += n
        self.in_pipe = n
        if self._splice_out():
            self._release_empty_pipe()
        else:
            self._pause()

    def _splice_out(self) -> bool:
        """Move the pipe's bytes to `dst`; True once the pipe is empty."""
        read_end = self.pipe[0]  # type: ignore[index]
        while self.in_pipe:
            try:
                sent = os.splice(read_end, self.dst_fd, self.in_pipe, flags=SPLICE_FLAGS)
            except BlockingIOError:
                return False
            except OSError as error:
                self.owner.abort(self.dst, error)
                return False
            self.in_pipe -= sent
        return True

    def _release_empty_pipe(self) -> None:
        if self.pipe is not None and not self.in_pipe:
            self.pool.give(self.pipe)  # type: ignore[union-attr]
            self.pipe = None

    # --- flow control and ends ----------------------------------------------------------------

    def _pause(self) -> None:
        self.loop.remove_reader(self.src_fd)
        self.loop.add_writer(self.dst_fd, self.on_writable)

    def _resume(self) -> None:
        self._release_empty_pipe()
        self.loop.remove_writer(self.dst_fd)
        self.loop.add_reader(self.src_fd, self.on_readable)

    def at_eof(self) -> None:
        # Reading only happens while nothing is held, so everything before EOF is delivered.
        self.done = True
        self.loop.remove_reader(self.src_fd)
        self._finish()

    def _finish(self) -> None:
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as error:
            self.owner.abort(self.dst, error)
            return
        self.owner.flow_finished()

    def release(self) -> None:
        """Give back or close the pipe when the connection closes."""
        if self.pipe is not None:
            if self.in_pipe:
                PipePool.discard(self.pipe)  # bytes left in it: never reuse
            else:
                self.pool.give(self.pipe)  # type: ignore[union-attr]
            self.pipe = None
            self.in_pipe = 0
