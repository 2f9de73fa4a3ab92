"""One fixed timeout for many connections, without a timer per connection."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from meshgw.dataplane import capacity


class Deadlines:
    """Connections waiting out one fixed timeout, oldest first.

    One periodic sweep serves them all instead of a timer armed and cancelled per connection:
    since the timeout is the same for every entry, insertion order is deadline order.
    """

    __slots__ = ("_waiting", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._waiting: OrderedDict[Any, float] = OrderedDict()

    def add(self, conn: Any, now: float) -> None:
        self._waiting.pop(conn, None)  # re-added (failover): a fresh deadline, at the end
        self._waiting[conn] = now + self.timeout

    def discard(self, conn: Any) -> None:
        self._waiting.pop(conn, None)

    def deadline(self, conn: Any) -> float | None:
        return self._waiting.get(conn)

    def compact(self) -> bool:
        return capacity.compact(self._waiting)

    def expired(self, now: float) -> list[Any]:
        waiting, due = self._waiting, []
        while waiting:
            conn, deadline = next(iter(waiting.items()))
            if deadline > now:
                break
            del waiting[conn]
            due.append(conn)
        return due
