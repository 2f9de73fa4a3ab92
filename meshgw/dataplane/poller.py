"""Edge-triggered epoll for the data plane's sockets, driven by the asyncio event loop.

Why not `loop.add_reader`/`add_writer`: every registration change is an `epoll_ctl` (and libuv
adds a probe and an ioctl per new descriptor), and a proxy changes registrations all the time.
Here each socket is registered once, for reading and writing, edge-triggered: the kernel reports
changes of state only, so a permanently registered "writable" costs nothing, and closing a socket
removes it from the set without another system call. The one change ever made: a socket handed
to a kernel tunnel (kerneltunnel.py) is switched to the events that announce its end. The epoll
descriptor itself sits in the asyncio loop as one reader, so timers and the control plane share
the same thread.
"""

from __future__ import annotations

import asyncio
import select
import sys
from collections.abc import Callable

from meshgw.dataplane import capacity

EPOLL_AVAILABLE = sys.platform == "linux" and hasattr(select, "epoll")

if EPOLL_AVAILABLE:
    IN = select.EPOLLIN
    OUT = select.EPOLLOUT
    # Peer closed, hung up or failed: read on until EOF or the error shows.
    CLOSED = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
    _MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
else:  # pragma: no cover - the data plane needs Linux epoll
    IN, OUT, CLOSED, _MASK = 1, 4, 0x2018, 0

MAX_EVENTS = 512

Handler = Callable[[int], None]
# Told of an exception a connection's callback raised (an event handler, or a timer's), to
# close that connection (the callback's owner) and count it.
FailureHandler = Callable[[Callable[..., object], Exception], None]


class Poller:
    __slots__ = ("_epoll", "_loop", "failed", "handlers")

    def __init__(self, loop: asyncio.AbstractEventLoop, failed: FailureHandler) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self.handlers: dict[int, Handler] = {}
        # A handler that raises must not take the rest of the batch with it: with edge
        # triggering, an event not delivered now is never reported again.
        self.failed = failed
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def register(self, fd: int, handler: Handler) -> None:
        """Watch `fd` for reading and writing until it is closed; `handler(events)` is called."""
        self.handlers[fd] = handler
        self._epoll.register(fd, _MASK)

    def swap(self, fd: int, handler: Handler) -> None:
        """Give a registered `fd`'s events to another handler: no system call."""
        self.handlers[fd] = handler

    def modify(self, fd: int, mask: int) -> None:
        """Watch a registered `fd` for other events (a socket joined to a kernel tunnel wants
        only its end reported). A state that matches the new mask is reported again."""
        self._epoll.modify(fd, mask)

    def forget(self, fd: int) -> None:
        """Before closing `fd`: closing removes it from the epoll set, this from our table."""
        self.handlers.pop(fd, None)

    def compact(self) -> bool:
        """Give back the handler table's space after a peak (capacity.py); never call this
        from a handler, as dispatch may be walking the table."""
        return capacity.compact(self.handlers)

    def _dispatch(self) -> None:
        handlers = self.handlers
        for fd, events in self._epoll.poll(0, MAX_EVENTS):
            handler = handlers.get(fd)
            # A descriptor closed earlier in this batch may be reused already; a stale edge
            # only makes a handler find nothing to read or write.
            if handler is not None:
                try:
                    handler(events)
                except Exception as error:
                    self.failed(handler, error)

    def close(self) -> None:
        """Idempotent: drain and shutdown paths may both get here."""
        if self._epoll.closed:
            return
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self.handlers.clear()
