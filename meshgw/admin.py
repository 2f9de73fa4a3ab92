"""The admin HTTP face: /metrics, /healthz, /ready, /v1/routes, /v1/topology.

It binds to loopback unless told otherwise and only reads state through the callables it is
given, so it knows nothing of how the gateway is built.

It shares the process with the data plane, so it must never take what the data plane needs:
connections are capped (a Prometheus server, the kubelet's probes and a person fit easily; at the
cap the longest-waiting idle connection makes room), a request must arrive whole within a deadline
and within a size cap, and an idle keep-alive connection is closed. Bad requests are expected input:
a 4xx, a counter and at most a debug line. Only GET and HEAD, and only to a `Host` that is an IP
literal, `localhost` or a name configured for it, so that a web page that rebinds its own DNS name
to this address cannot read the topology through a browser.

HTTP/1.1 is parsed by h11 (sans-I/O, bounded); this module owns only the socket side.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import h11
from prometheus_client import CONTENT_TYPE_LATEST

from meshgw.metrics import AdminStats

log = logging.getLogger("meshgw.admin")

MAX_CONNECTIONS = 32  # out of the process's reserve of descriptors (dataplane/budget.py)
REQUEST_TIMEOUT = 10.0  # seconds for a whole request to arrive
IDLE_TIMEOUT = 30.0  # seconds a keep-alive connection may wait for its next request
MAX_REQUEST_BYTES = 8192  # request line and headers; the admin port takes no bodies


@dataclass(frozen=True)
class AdminViews:
    routes: Callable[[], Awaitable[dict[str, Any]]]
    topology: Callable[[], dict[str, Any]]
    # (ready, reason): ready once the listener is up and a first usable topology exists.
    ready: Callable[[], tuple[bool, str]]
    # Prometheus exposition text, of every worker when there are several.
    metrics: Callable[[], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


class AdminServer:
    def __init__(
        self,
        views: AdminViews,
        host: str,
        port: int,
        *,
        stats: AdminStats | None = None,
        allowed_hosts: Iterable[str] = (),
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.views = views
        self.host, self.port = host, port
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts) | {"localhost"}
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.stats = stats or AdminStats()
        # In arrival order, so the longest-waiting connection is the one to evict.
        self.connections: dict[_AdminConnection, None] = {}
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _AdminConnection(self), self.host, self.port, reuse_address=True
        )
        if self.port == 0:  # report the port the kernel chose
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                conn.close()
            await self._server.wait_closed()
            self._server = None

    def evict_one(self) -> bool:
        """Make room for a newcomer: close the oldest connection that is not being answered
        (idle, or still sending its request). A quick request then always gets through,
        however many connections sit idle; only when every one is being answered is the
        newcomer refused."""
        for conn in self.connections:
            if conn.answering is None:
                self.stats.refuse("evicted")
                del self.connections[conn]
                conn.close()
                return True
        return False

    def host_allowed(self, value: str) -> bool:
        """An IP literal (with or without a port), `localhost` or a configured name."""
        host = value.strip().lower()
        if host.startswith("["):  # [v6]:port
            host = host[1 : host.find("]")] if "]" in host else host
        elif host.count(":") == 1:
            host = host.partition(":")[0]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return host.rstrip(".") in self.allowed_hosts
        return True

    async def answer(self, path: str) -> Reply:
        views = self.views
        if path == "/healthz":
            return Reply(200, b"ok\n")
        if path == "/ready":
            is_ready, reason = views.ready()
            return Reply(200 if is_ready else 503, reason.encode() + b"\n")
        if path == "/metrics":
            return Reply(200, await views.metrics(), CONTENT_TYPE_LATEST)
        if path == "/v1/routes":
            return _json(await views.routes())
        if path == "/v1/topology":
            return _json(views.topology())
        return Reply(404, b"not found: /metrics /healthz /ready /v1/routes /v1/topology\n")


def _json(value: Any) -> Reply:
    body = json.dumps(value, indent=2, default=str) + "\n"
    return Reply(200, body.encode(), "application/json")


class _AdminConnection(asyncio.Protocol):
    """One admin client: requests in order, each answered before the next is read."""

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.request: h11.Request | None = None
        self.has_body = False
        self.answering: asyncio.Task[None] | None = None  # while set, later bytes wait in h11

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        server = self.server
        if len(server.connections) >= server.max_connections and not server.evict_one():
            server.stats.refuse("connection_limit")
            self.transport.write(_plain_response(503, b"too many admin connections\n"))
            self.transport.close()
            return
        server.connections[self] = None
        self._deadline(server.request_timeout, "request_timeout")

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        self.http.receive_data(data)
        self._read_requests()

    def eof_received(self) -> bool | None:
        self.http.receive_data(b"")
        self._read_requests()
        return None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _deadline(self, seconds: float, reason: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(seconds, self._expired, reason)

    def _expired(self, reason: str) -> None:
        self.server.stats.refuse(reason)
        self.close()

    def _read_requests(self) -> None:
        """Take h11's events until a whole request is in, then answer it."""
        while self.answering is None:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as error:
                self._bad_request(error)
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Request):
                self.request, self.has_body = event, False
            elif isinstance(event, h11.Data):
                self.has_body = True  # dropped: bounded by the request deadline
            elif isinstance(event, h11.EndOfMessage):
                assert self.request is not None
                if self.timer is not None:
                    self.timer.cancel()
                self.answering = asyncio.get_running_loop().create_task(self._respond(self.request))
            else:  # ConnectionClosed, or PAUSED after a request we will not take
                self.close()
                return

    def _bad_request(self, error: h11.RemoteProtocolError) -> None:
        status = error.error_status_hint
        self.server.stats.refuse("malformed")
        log.debug("admin: malformed request (%d): %s", status, error)
        if self.transport is not None:
            self.transport.write(_plain_response(status, b"bad request\n"))
        self.close()

    async def _respond(self, request: h11.Request) -> None:
        try:
            reply = await self._reply(request)
        except Exception:
            log.exception("admin: %s failed", request.target.decode(errors="replace"))
            reply = Reply(500, b"internal error\n")
        if self.transport is None or self.transport.is_closing():
            return
        self.server.stats.answered(reply.status)
        headers = [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body)))]
        body = b"" if request.method == b"HEAD" else reply.body
        out = self.http.send(h11.Response(status_code=reply.status, headers=headers)) or b""
        out += self.http.send(h11.Data(data=body)) or b""
        out += self.http.send(h11.EndOfMessage()) or b""
        self.transport.write(out)
        if self.http.our_state is not h11.DONE or self.http.their_state is not h11.DONE:
            self.close()
            return
        self.http.start_next_cycle()
        self.answering = None
        self._deadline(self.server.idle_timeout, "idle_timeout")
        self._read_requests()  # a pipelined request may be waiting already

    async def _reply(self, request: h11.Request) -> Reply:
        # h11 bounds a request still arriving; one that arrived whole in one read is measured
        # here, so the cap holds however the bytes came.
        size = len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers)
        if size > MAX_REQUEST_BYTES:
            self.server.stats.refuse("malformed")
            log.debug("admin: a request of %d bytes refused", size)
            return Reply(431, b"request too large\n")
        if request.method not in (b"GET", b"HEAD"):
            return Reply(405, b"only GET and HEAD\n")
        if self.has_body:
            return Reply(413, b"the admin port takes no request bodies\n")
        host = next((v for k, v in request.headers if k == b"host"), b"").decode("latin-1")
        if not self.server.host_allowed(host):
            self.server.stats.refuse("host")
            return Reply(421, b"this admin port does not answer for that Host\n")
        path = request.target.decode("latin-1").partition("?")[0]
        return await self.server.answer(path)


def _plain_response(status: int, body: bytes) -> bytes:
    reason = {400: "Bad Request", 414: "URI Too Long", 431: "Request Header Fields Too Large"}
    phrase = reason.get(status, "Service Unavailable" if status == 503 else "Error")
    return (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
