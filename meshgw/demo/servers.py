"""Simulated Consul servers: TLS endpoints that behave like Consul servers towards a gateway.

Towards the gateway they are what a wanfed Consul server is (docs/consul.md#server-dialing,
#alpn-and-gossip and #tls-material):
- they accept only TLS, present their own `<node>.server.<dc>.consul` certificate, refuse a server
  name that is not theirs, require a client certificate signed by the agent CA, and dispatch on the
  ALPN protocol (`consul/rpc-multi`, `consul/wan-gossip/packet`, `consul/wan-gossip/stream`);
- they dial the servers of other datacenters through a gateway of their own datacenter, as Consul
  does: TLS with SNI `<node>.server.<dc>.consul`, exactly one ALPN protocol, hostname verification
  on, their own server certificate as client certificate.

All of them run in one asyncio process (the demo's), which keeps a 2-core machine free for the
gateways.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ssl
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from meshgw.demo.layout import ServerSpec
from meshgw.demo.protocols import (
    ALPN_PACKET,
    ALPN_PROTOCOLS,
    ALPN_RPC,
    ALPN_STREAM,
    Ack,
    MemberState,
    PacketReader,
    PacketTooLarge,
    Ping,
    PushPull,
    RpcFacts,
    decode_message,
    decode_push_pull,
    encode_message,
    encode_push_pull,
    frame,
    rpc_answer,
)

HANDSHAKE_TIMEOUT = 10.0
PACKET_READ_TIMEOUT = 120.0  # wanfed reads each length prefix with a 2-minute deadline
STREAM_TIMEOUT = 10.0
RPC_IDLE_TIMEOUT = 120.0
PINGS_PER_PATH = 3
READ_CHUNK = 65536

Address = tuple[str, int]


def server_context(spec: ServerSpec, ca: Path, on_refused: Callable[[str], None]) -> ssl.SSLContext:
    """A Consul server's incoming TLS: its own certificate, mTLS against the CA, ALPN dispatch."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # Consul's default tls_min_version
    context.load_cert_chain(spec.cert, spec.key)
    context.load_verify_locations(ca)
    context.verify_mode = ssl.CERT_REQUIRED  # verify_incoming
    context.set_alpn_protocols(list(ALPN_PROTOCOLS))
    own_names = {spec.sni, spec.sni.split(".", 1)[1]}  # <node>.server.<dc>.<d>, server.<dc>.<d>

    def check_name(_: ssl.SSLObject, name: str | None, __: ssl.SSLContext) -> int | None:
        # A gateway that delivers another server's name here has routed wrongly: say so in the
        # handshake rather than answer for a server this is not. (No SNI: a direct LAN dial.)
        if name is not None and name.lower() not in own_names:
            on_refused("wrong_server_name")
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None

    context.sni_callback = check_name
    return context


def client_context(spec: ServerSpec, ca: Path, alpn: str) -> ssl.SSLContext:
    """A Consul server's outgoing TLS through a gateway (tlsutil wrapALPNTLSClient)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname verification on
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(ca)
    context.load_cert_chain(spec.cert, spec.key)
    context.set_alpn_protocols([alpn])  # exactly one protocol, as Consul offers
    return context


class TlsListener:
    """A TLS listener on a preferred port when it is free, else on any; the connections it is
    serving end when it closes. Subclasses say what a connection gets (`handle`)."""

    def __init__(self, host: str, context: ssl.SSLContext, backlog: int = 100) -> None:
        self.host = host
        self.port = 0
        self._context = context
        self._backlog = backlog
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self, preferred_port: int | None) -> None:
        if preferred_port:
            try:
                self._server = await self._listen(preferred_port)
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    raise
        if self._server is None:
            self._server = await self._listen(0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _listen(self, port: int) -> asyncio.Server:
        return await asyncio.start_server(
            self._accept,
            self.host,
            port,
            ssl=self._context,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            backlog=self._backlog,
            reuse_address=True,
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self.handle(reader, writer)
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection that completed its handshake; its errors are for the
        subclass to count."""
        raise NotImplementedError


def failure_reason(error: BaseException) -> str:
    """A short, stable name for why a handshake or an exchange failed."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate verify failed ({error.verify_message})"
    if isinstance(error, ssl.SSLError):
        return (error.reason or type(error).__name__).lower()
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, asyncio.IncompleteReadError | EOFError):
        return "closed by the other end"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ConnectionResetError | BrokenPipeError):
        return "connection reset"
    if isinstance(error, OSError) and error.errno is not None:
        return errno.errorcode.get(error.errno, str(error.errno)).lower()
    return str(error) or type(error).__name__


class ExchangeError(Exception):
    """The far end answered, but not what a Consul server would."""


@dataclass(frozen=True, slots=True)
class Exchange:
    """One connection of a path: a protocol spoken to the target through the gateways."""

    protocol: str
    error: str | None = None
    client: str = ""  # this end's address, as the local gateway's access log names it
    learned: tuple[MemberState, ...] = ()  # push/pull only

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class PathResult:
    """Everything one server learned dialing one remote server through one local gateway."""

    source: str
    target: str
    target_dc: str
    local_gateway: str
    exchanges: list[Exchange]
    rtt: float | None = None  # seconds, median gossip ping/ack round trip
    remote_gateways: list[str] = field(default_factory=list)  # filled from the access logs

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.exchanges)

    def fail(self, protocol: str, error: BaseException) -> None:
        self.exchanges.append(Exchange(protocol, error=failure_reason(error)))

    @property
    def errors(self) -> list[str]:
        return [f"{e.protocol}: {e.error}" for e in self.exchanges if e.error]


class SimServer(TlsListener):
    """One simulated Consul server: accepts like one and dials like one."""

    def __init__(self, spec: ServerSpec, ca: Path, datacenters: tuple[str, ...]) -> None:
        super().__init__(spec.host, server_context(spec, ca, self._refuse), backlog=1024)
        self.spec = spec
        self.datacenters = datacenters
        self.peers: list[SimServer] = [self]  # its datacenter's servers, itself included
        self.accepted: Counter[str] = Counter()  # by ALPN protocol
        self.refused: Counter[str] = Counter()  # by reason
        self._clients = {alpn: client_context(spec, ca, alpn) for alpn in ALPN_PROTOCOLS}

    @property
    def member(self) -> str:
        return self.spec.member

    def _refuse(self, reason: str) -> None:
        self.refused[reason] += 1

    # --- accepting --------------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (OSError, EOFError, TimeoutError, PacketTooLarge, ValueError) as error:
            self._refuse(
                failure_reason(error) if not isinstance(error, ValueError) else "bad_message"
            )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A client refused during the handshake (no or foreign certificate, another server's
        # name) never gets here: asyncio closes it and the client sees the refusal.
        ssl_object = writer.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object else None
        if alpn not in ALPN_PROTOCOLS:
            # Consul would read an RPC type byte here; the demo speaks ALPN protocols only.
            self._refuse("no_alpn")
            return
        self.accepted[alpn] += 1
        if alpn == ALPN_PACKET:
            await self._serve_packets(reader, writer)
        elif alpn == ALPN_STREAM:
            await self._serve_stream(reader, writer)
        else:
            await self._serve_rpc(reader, writer)

    async def _serve_packets(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        packets = PacketReader()
        while True:
            async with asyncio.timeout(PACKET_READ_TIMEOUT):
                data = await reader.read(READ_CHUNK)
            if not data:
                return
            try:
                batch = packets.feed(data)
            except PacketTooLarge:
                self._refuse("packet_too_large")
                return
            for payload in batch:
                message = decode_message(payload)
                if not isinstance(message, Ping):
                    continue
                if message.target != self.member:
                    # memberlist with RequireNodeNames drops a ping meant for another node.
                    self._refuse("ping_for_other_node")
                    return
                # Real memberlist acks over its own pooled connection the other way; acking on
                # this one keeps the demo's round trip the one path under test.
                writer.write(frame(encode_message(Ack(message.seq, self.member))))
            await writer.drain()

    def view(self) -> PushPull:
        members = tuple(MemberState(p.member, p.address) for p in self.peers)
        return PushPull(self.member, members)

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        async with asyncio.timeout(STREAM_TIMEOUT):
            decode_push_pull(await reader.readline())
            writer.write(encode_push_pull(self.view()))
            await writer.drain()

    def facts(self) -> RpcFacts:
        return RpcFacts(self.member, self.peers[0].address, self.datacenters)

    async def _serve_rpc(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            async with asyncio.timeout(RPC_IDLE_TIMEOUT):
                line = await reader.readline()
            if not line:
                return
            writer.write(rpc_answer(self.facts(), line.decode(errors="replace")).encode() + b"\n")
            await writer.drain()

    # --- dialing ----------------------------------------------------------------------------

    async def probe(
        self, target: ServerSpec, gateway_name: str, gateway: Address, timeout: float
    ) -> tuple[PathResult, PacketSession | None]:
        """Speak every protocol to `target` through `gateway`, one connection each.

        The gossip packet connection stays open (Consul pools them) and is handed back, so that
        round trips can be timed later, when no handshake competes for this process.
        """
        session: PacketSession | None = None
        exchanges = []
        for alpn in (ALPN_PACKET, ALPN_RPC, ALPN_STREAM):
            exchange, opened = await self._exchange(target, alpn, gateway, timeout)
            exchanges.append(exchange)
            session = session or opened
        return PathResult(self.member, target.member, target.dc, gateway_name, exchanges), session

    async def _exchange(
        self, target: ServerSpec, alpn: str, gateway: Address, timeout: float
    ) -> tuple[Exchange, PacketSession | None]:
        client = ""
        writer: asyncio.StreamWriter | None = None
        keep = False
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    *gateway,
                    ssl=self._clients[alpn],
                    server_hostname=target.sni,
                    local_addr=(self.spec.host, 0),  # dial from this server's own address
                    ssl_handshake_timeout=timeout,
                )
                host, port = writer.get_extra_info("sockname")[:2]
                client = f"{host}:{port}"
                ssl_object = writer.get_extra_info("ssl_object")
                selected = ssl_object.selected_alpn_protocol() if ssl_object else None
                if selected != alpn:
                    raise ExchangeError(f"server selected ALPN {selected!r}")
                if alpn == ALPN_PACKET:
                    session = PacketSession(reader, writer, self.member, target.member)
                    await session.ping()  # proves the path; timing comes later
                    keep = True
                    return Exchange(alpn, client=client), session
                if alpn == ALPN_RPC:
                    await _rpc_ping(reader, writer, target)
                    return Exchange(alpn, client=client), None
                learned = await self._push_pull(reader, writer, target)
                return Exchange(alpn, client=client, learned=learned), None
        except (OSError, EOFError, TimeoutError, ExchangeError, ValueError) as error:
            return Exchange(alpn, error=failure_reason(error), client=client), None
        finally:
            if writer is not None and not keep:
                await _close(writer)

    async def _push_pull(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: ServerSpec
    ) -> tuple[MemberState, ...]:
        writer.write(encode_push_pull(self.view()))
        await writer.drain()
        line = await reader.readline()
        if not line:
            raise EOFError
        answer = decode_push_pull(line)
        if answer.source != target.member:
            raise ExchangeError(f"push/pull answered by {answer.source!r}")
        return answer.members


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 1.0)


async def _rpc_ping(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: ServerSpec
) -> None:
    writer.write(b"Status.Ping\n")
    await writer.drain()
    answer = (await reader.readline()).decode(errors="replace").strip()
    if answer != f"pong {target.member}":
        raise ExchangeError(f"Status.Ping answered {answer!r}")


class PacketSession:
    """An open `consul/wan-gossip/packet` connection to one remote member."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: str, target: str
    ) -> None:
        self.reader, self.writer = reader, writer
        self.source, self.target = source, target
        self._packets = PacketReader()
        self._seq = 0

    async def ping(self) -> float:
        """One gossip ping/ack; the round trip in seconds."""
        self._seq += 1
        seq = self._seq
        sent = time.perf_counter()
        self.writer.write(frame(encode_message(Ping(seq, self.target, self.source))))
        await self.writer.drain()
        answers: list[bytes] = []
        while not answers:
            data = await self.reader.read(READ_CHUNK)
            if not data:
                raise EOFError
            answers = self._packets.feed(data)
        rtt = time.perf_counter() - sent
        ack = decode_message(answers[0])
        if not isinstance(ack, Ack) or ack.seq != seq or ack.source != self.target:
            raise ExchangeError(f"unexpected answer {ack!r}")
        return rtt

    async def round_trip(self, count: int = PINGS_PER_PATH) -> float:
        """The median of a few ping/ack round trips."""
        return statistics.median([await self.ping() for _ in range(count)])

    async def close(self) -> None:
        await _close(self.writer)
