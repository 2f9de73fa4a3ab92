"""The far ends of the peering demo, and how its clients dial them through the gateways.

- A server's gRPC TLS port, as a peer dials it (docs/consul.md#peering): TLS with the server's
  certificate for `server.<dc>.peering.<td>` (and its own `<node>.server.<dc>.<domain>`), ALPN
  `h2`. It reads the HTTP/2 client preface and answers with a SETTINGS frame, the first thing a
  gRPC server sends; the peering stream itself is not simulated.
- An exported service's instance (its sidecar's port): TLS with a certificate for the name the
  importer dials (standing in for the SPIFFE identity a sidecar checks); it answers one line.

The clients verify the far end against the exporting cluster's CA and the name they dialed:
the gateways in between never terminate TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshgw.demo.servers import TlsListener, failure_reason

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # empty SETTINGS frame, stream 0
ALPN_H2 = "h2"
READ_TIMEOUT = 10.0

# What a client says once connected; it returns who answered.
Talk = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[str]]


class TlsEndpoint(TlsListener):
    """A TLS listener that counts what it accepted and why connections failed."""

    def __init__(self, name: str, host: str, cert: Path, key: Path, alpn: list[str]) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key)
        if alpn:
            context.set_alpn_protocols(alpn)
        super().__init__(host, context)
        self.name = name
        self.accepted = 0
        self.refused: Counter[str] = Counter()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                await self.serve(reader, writer)
        except (OSError, EOFError, TimeoutError, ValueError) as error:
            self.refused[type(error).__name__] += 1

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class PeeringServer(TlsEndpoint):
    """A Consul server's gRPC TLS port, where peers (through the gateways) open their stream."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_H2:
            raise ValueError("no h2")
        if await reader.readexactly(len(HTTP2_PREFACE)) != HTTP2_PREFACE:
            raise ValueError("not the HTTP/2 client preface")
        writer.write(HTTP2_SETTINGS)
        await writer.drain()
        await reader.read(1)  # until the client closes


class ServiceInstance(TlsEndpoint):
    """An instance of an exported TCP service: answers one line with its name."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        writer.write(f"{self.name}: {line.decode(errors='replace').strip()}\n".encode())
        await writer.drain()


# --- dialing through a gateway -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dial:
    """One connection through a local gateway: who answered, or why it failed."""

    client: str = ""  # this end's address, as the local gateway's access log names it
    answered: str = ""  # the far end's identity (its certificate, or its reply)
    alpn: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def client_context(ca: Path, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname verification on
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(ca)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def server_node(peer: Mapping[str, Any] | None) -> str:
    """The node of the `<node>.server.<dc>.<domain>` name among a server certificate's DNS
    names (an `SSLObject.getpeercert()` dictionary)."""
    for kind, value in (peer or {}).get("subjectAltName", ()):
        if kind == "DNS" and ".server." in str(value):
            return str(value).split(".", 1)[0]
    return "?"


async def dial(
    gateway: tuple[str, int],
    sni: str,
    context: ssl.SSLContext,
    talk: Talk,
    *,
    local_host: str,
    timeout: float,
) -> Dial:
    """TLS with `sni` through the gateway at `gateway`, then `talk` (which says who answered).

    The TCP connection is made first, so that its address is known even when the handshake is
    refused: the local gateway's access log names connections by it."""
    loop = asyncio.get_running_loop()
    client = ""
    writer: asyncio.StreamWriter | None = None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        async with asyncio.timeout(timeout):
            sock.setblocking(False)
            sock.bind((local_host, 0))
            await loop.sock_connect(sock, gateway)
            host, port = sock.getsockname()[:2]
            client = f"{host}:{port}"
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=context, server_hostname=sni, ssl_handshake_timeout=timeout
            )
            ssl_object = writer.get_extra_info("ssl_object")
            alpn = ssl_object.selected_alpn_protocol() if ssl_object else None
            return Dial(client, await talk(reader, writer), alpn)
    except (OSError, EOFError, TimeoutError, ValueError) as error:
        return Dial(client, error=failure_reason(error))
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
        else:
            sock.close()


async def open_peering_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    """The start of a gRPC stream: the client preface, then the server's SETTINGS frame."""
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_H2:
        raise ValueError("the server did not select h2")
    writer.write(HTTP2_PREFACE + HTTP2_SETTINGS)
    await writer.drain()
    frame = await reader.readexactly(len(HTTP2_SETTINGS))
    if frame[3] != HTTP2_SETTINGS[3]:
        raise ValueError(f"answered HTTP/2 frame type {frame[3]}, not SETTINGS")
    return server_node(ssl_object.getpeercert())


async def ask_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    writer.write(b"hello from the importing cluster\n")
    await writer.drain()
    line = (await reader.readline()).decode(errors="replace").strip()
    if not line:
        raise EOFError
    return line.split(":", 1)[0]
