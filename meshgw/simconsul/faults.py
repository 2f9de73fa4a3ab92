"""What a test makes go wrong, and what it can see: faults per path, and every request recorded.

Faults: fail (a status and body), hang (never answer until cleared), drop (close the connection
without a response), garbage (200 with a body that is not JSON). Paths are prefixes, or globs
when they contain ``*?[``. The index going backwards and the listener going away live with the
index (`RaftIndex.reset`) and the server (`SimConsul.down`).
"""

from __future__ import annotations

import enum
import fnmatch
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

from meshgw.simconsul.index import RaftIndex


def path_matches(pattern: str, path: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(path, pattern)
    return path.startswith(pattern)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    query: CIMultiDictProxy[str] | Mapping[str, str]
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def token(self) -> str | None:
        return self.headers.get("X-Consul-Token")


class RequestLog:
    """Every request the server received, in arrival order."""

    def __init__(self, raft: RaftIndex) -> None:
        self._raft = raft
        self._requests: list[RecordedRequest] = []

    def record(self, request: RecordedRequest) -> None:
        with self._raft.lock:
            self._requests.append(request)
        self._raft.observed.notify()  # wake wait_for callers

    def __iter__(self) -> Iterator[RecordedRequest]:
        with self._raft.lock:
            return iter(list(self._requests))

    def __len__(self) -> int:
        return len(self._requests)

    def find(self, path: str, method: str | None = None) -> list[RecordedRequest]:
        """Recorded requests whose path matches (prefix, or glob with *?[)."""
        return [
            r for r in self if (method is None or r.method == method) and path_matches(path, r.path)
        ]

    def wait_for(
        self, path: str, *, count: int = 1, method: str | None = None, timeout: float = 10.0
    ) -> RecordedRequest:
        """Block the calling thread until `count` requests matching path have arrived."""
        if not self._raft.observed.wait(lambda: len(self.find(path, method)) >= count, timeout):
            raise TimeoutError(f"no {count} requests for {path} within {timeout}s")
        return self.find(path, method)[count - 1]

    async def wait_for_async(
        self, path: str, *, count: int = 1, method: str | None = None, timeout: float = 10.0
    ) -> RecordedRequest:
        """As wait_for, for a coroutine on the server's loop."""
        await self._raft.observed.wait_async(lambda: len(self.find(path, method)) >= count, timeout)
        return self.find(path, method)[count - 1]


class FaultKind(enum.Enum):
    FAIL = "fail"
    HANG = "hang"
    DROP = "drop"
    GARBAGE = "garbage"


@dataclass(slots=True)
class Fault:
    kind: FaultKind
    pattern: str
    status: int = 500
    body: str = ""
    times: int | None = None
    method: str | None = None
    released: bool = False  # a HANG fault lets its parked requests go

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        return path_matches(self.pattern, path)


class Faults:
    def __init__(self, raft: RaftIndex, stopping: Callable[[], bool]) -> None:
        self._raft = raft
        self._stopping = stopping
        self._active: list[Fault] = []
        self._spent: list[Fault] = []  # used up, but their hung requests wait for clear()

    def fail(
        self,
        path: str,
        status: int = 500,
        body: str = "rpc error: internal failure",
        *,
        times: int | None = None,
        method: str | None = None,
    ) -> None:
        """Answer requests under `path` (prefix, or glob with *?[) with status and body."""
        self._add(Fault(FaultKind.FAIL, path, status, body, times, method))

    def hang(self, path: str, *, times: int | None = None, method: str | None = None) -> None:
        """Never answer (until clear() or stop())."""
        self._add(Fault(FaultKind.HANG, path, times=times, method=method))

    def drop(self, path: str, *, times: int | None = None, method: str | None = None) -> None:
        """Close the connection without a response."""
        self._add(Fault(FaultKind.DROP, path, times=times, method=method))

    def garbage(self, path: str, *, times: int | None = None, method: str | None = None) -> None:
        """200 with a body that is not JSON (and a valid X-Consul-Index)."""
        self._add(Fault(FaultKind.GARBAGE, path, times=times, method=method))

    def clear(self, path: str | None = None) -> None:
        """Remove faults (all, or those added for `path`); hung requests then proceed."""
        with self._raft.lock:
            keep = [f for f in self._active if path is not None and f.pattern != path]
            for fault in self._active + self._spent:
                if fault not in keep:
                    fault.released = True
            self._active, self._spent = keep, []
        self._raft.signal.notify()

    def _add(self, fault: Fault) -> None:
        with self._raft.lock:
            self._active.append(fault)

    def take(self, method: str, path: str) -> Fault | None:
        """The fault this request meets, if any (counting down `times`)."""
        with self._raft.lock:
            for fault in self._active:
                if fault.matches(method, path):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self._active.remove(fault)
                            self._spent.append(fault)
                    return fault
        return None

    async def answer(self, request: web.Request, fault: Fault) -> web.StreamResponse | None:
        """The faulty answer; None when a HANG was released and the request should proceed."""
        if fault.kind is FaultKind.FAIL:
            return web.Response(status=fault.status, text=fault.body, content_type="text/plain")
        if fault.kind is FaultKind.GARBAGE:
            headers = {
                "X-Consul-Index": str(max(self._raft.index, 1)),
                "X-Consul-KnownLeader": "true",
            }
            return web.Response(
                status=200,
                text='{"Datacenter": "dc1", <html>',
                headers=headers,
                content_type="application/json",
            )
        if fault.kind is FaultKind.DROP:
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=200)  # never reaches the client
        # HANG: wait for the fault to be cleared or the server to stop, then proceed normally.
        while not self._stopping():
            event = self._raft.signal.event
            with self._raft.lock:
                if fault.released:
                    return None
            await event.wait()
        return web.Response(status=503, text="shutting down", content_type="text/plain")
