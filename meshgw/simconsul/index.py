"""The raft index behind blocking queries, and the signals waiters listen to.

Every mutation is one raft write: it bumps a single global counter and stamps the keys it
touched (("catalog", dc), ("service", dc, name), ("fed",), ...). A view reports the highest stamp
of the keys it depends on, so a blocking query returns when that passes ``?index=``, and an
unrelated write does not wake it for good (it re-checks and waits again).

All state of the simulated cluster is guarded by `RaftIndex.lock` (re-entrant): test threads
mutate while the server's loop reads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable


class Signal:
    """'Something changed': wakes threads (a condition on the shared lock) and coroutines on the
    server's loop (a fresh event per generation). Waiters re-check their own predicate."""

    def __init__(self, lock: threading.RLock) -> None:
        self.condition = threading.Condition(lock)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._event = asyncio.Event()

    @property
    def event(self) -> asyncio.Event:
        """This generation's event: take it *before* checking a predicate, then await it."""
        assert self._event is not None, "the server is not started"
        return self._event

    def notify(self) -> None:
        with self.condition:
            self.condition.notify_all()
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake()
        else:
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._event is not None:
            event, self._event = self._event, asyncio.Event()
            event.set()

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block the calling thread until predicate() holds; False on timeout."""
        with self.condition:
            return self.condition.wait_for(predicate, timeout)

    async def wait_async(self, predicate: Callable[[], bool], timeout: float) -> None:
        """As wait, for a coroutine on the server's loop; TimeoutError on timeout."""
        async with asyncio.timeout(timeout):
            while True:
                event = self.event
                with self.condition:
                    if predicate():
                        return
                await event.wait()


class RaftIndex:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.signal = Signal(self.lock)  # the cluster changed: blocking queries re-check
        # Something a test watches changed (parked queries, recorded requests). Apart from
        # `signal`, so a query that parks does not wake itself.
        self.observed = Signal(self.lock)
        self._index = 0
        self._stamps: dict[tuple[str, ...], int] = {}
        self.blocked = 0  # blocking queries parked right now

    @property
    def index(self) -> int:
        return self._index

    def commit(self, *keys: tuple[str, ...]) -> int:
        """One raft write: bump the index, stamp the keys, wake every waiter."""
        with self.lock:
            self._index += 1
            for key in keys:
                self._stamps[key] = self._index
        self.signal.notify()
        return self._index

    def view(self, *keys: tuple[str, ...]) -> int:
        # Consul never answers a blocking query with index 0.
        with self.lock:
            return max([1, *(self._stamps.get(k, 0) for k in keys)])

    def stamped(self, key: tuple[str, ...]) -> bool:
        with self.lock:
            return key in self._stamps

    def stamp(self, key: tuple[str, ...]) -> int:
        with self.lock:
            return self._stamps.get(key, 0)

    def reset(self, to: int = 1) -> None:
        """The index goes backwards (snapshot restore, a new cluster): every view drops to at
        most `to`; later writes count up from there."""
        with self.lock:
            self._index = to
            self._stamps = {k: min(v, to) for k, v in self._stamps.items()}
        self.signal.notify()

    def park(self, delta: int) -> None:
        """Count a blocking query that starts (+1) or stops (-1) waiting."""
        with self.lock:
            self.blocked += delta
        self.observed.notify()

    def wait_blocked(self, count: int = 1, timeout: float = 10.0) -> None:
        """Block the calling thread until `count` queries are parked in a blocking wait."""
        if not self.observed.wait(lambda: self.blocked >= count, timeout):
            raise TimeoutError(f"{self.blocked} blocked queries, wanted {count}")

    async def wait_blocked_async(self, count: int = 1, timeout: float = 10.0) -> None:
        """As wait_blocked, for a coroutine on the server's loop."""
        await self.observed.wait_async(lambda: self.blocked >= count, timeout)
