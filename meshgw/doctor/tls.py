"""Check 7: a TLS handshake with each remote datacenter's server names through the local
gateway (the probe, its verdicts, the client context and the names to try)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from meshgw.addresses import hostport
from meshgw.control.catalog import lan_address
from meshgw.doctor.checks import (
    TLS,
    Check,
    Outcome,
    check_statuses,
    failed,
    is_wanfed,
    mesh_gateways,
    passed,
    server_nodes,
    skipped,
)
from meshgw.wire.names import server_sni

__all__ = [
    "DoctorOptions",
    "Probe",
    "Unreachable",
    "Verdict",
    "connected",
    "tls_probe",
]

# What a server offers when it dials another DC's server (docs/consul.md#server-dialing).
ALPN = "consul/rpc-multi"
DEFAULT_TIMEOUT = 5.0
# After a TLS 1.3 handshake the client cannot tell yet whether the server accepted its
# certificate: the verdict is a session ticket (accepted) or an alert (refused). A server that
# sends neither is given this long before the handshake counts as accepted.
POST_HANDSHAKE_WAIT = 1.0


# --- 7. TLS through the local gateway -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DoctorOptions:
    gateways: tuple[tuple[str, int], ...] = ()  # --gateway; empty: the local catalog's
    server_ca_file: str | None = None  # --server-ca-file: the servers' CA, not the API's
    cert: str | None = None
    key: str | None = None
    timeout: float = DEFAULT_TIMEOUT


def name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 as Go and OpenSSL apply it: exact, or `*.` standing for exactly one label."""
    pattern = pattern.lower().rstrip(".")
    name = name.lower().rstrip(".")
    if pattern == name:
        return True
    if pattern.startswith("*.") and "." in name:
        return name.split(".", 1)[1] == pattern[2:]
    return False


def certificate_names(peer: Mapping[str, Any] | None) -> list[str]:
    """The DNS subjectAltNames of an `SSLObject.getpeercert()` dictionary."""
    names = []
    for kind, value in (peer or {}).get("subjectAltName", ()):
        if kind == "DNS":
            names.append(str(value))
    return names


class Verdict(enum.Enum):
    """How a probe ended; `classify_probe` turns it into a check."""

    ACCEPTED = "accepted"  # handshake done, certificate valid for the name, mTLS accepted
    CLIENT_CERT_DEMANDED = "client-cert-demanded"  # ... but the server wanted a client cert
    CLIENT_CERT_REFUSED = "client-cert-refused"  # the server refused our --cert
    CLOSED_AFTER_HANDSHAKE = "closed-after-handshake"
    NAME_MISMATCH = "name-mismatch"
    UNTRUSTED = "untrusted"
    NO_ALPN = "no-alpn"
    HANDSHAKE_REFUSED = "handshake-refused"  # an alert during the handshake
    CLOSED = "closed"  # EOF or reset before the handshake finished: no route at the gateway
    UNREACHABLE = "unreachable"  # the gateway's port does not accept
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class Probe:
    gateway: str
    name: str
    verdict: Verdict
    detail: str = ""
    names: tuple[str, ...] = ()  # the certificate's DNS names, when it was seen
    alpn: str | None = None
    version: str | None = None


_CLIENT_CERT_ALERTS = (
    "CERTIFICATE_REQUIRED",
    "BAD_CERTIFICATE",
    "UNKNOWN_CA",
    "CERTIFICATE_UNKNOWN",
    "ACCESS_DENIED",
    "DECRYPT_ERROR",
    "HANDSHAKE_FAILURE",
)


def _alert(error: ssl.SSLError) -> str:
    return str(error.reason or error.strerror or error)


def classify_probe(probe: Probe, dc: str, local_dc: str, *, with_cert: bool) -> Check:
    subject = f"{probe.name} via {probe.gateway}"
    got = f"; the certificate names {', '.join(probe.names)}" if probe.names else ""
    verdict = probe.verdict
    reissue = (
        f"Reissue {dc}'s server certificates with server.{dc}.<domain> and "
        f"<node>.server.{dc}.<domain> (consul tls cert create -server -dc {dc} -node NODE, "
        "or meshgw tls cert create), signed by the CA given in --server-ca-file."
    )
    route_fix = (
        f"Check that the local gateway knows {dc}'s gateways (federation states, or meshgw "
        f"--gateway {dc}=HOST:PORT), runs with -expose-servers, and that {dc}'s gateways "
        f"reach {dc}'s servers."
    )
    if verdict is Verdict.ACCEPTED:
        how = "mutual TLS accepted" if with_cert else "the server asked for no client certificate"
        return passed(TLS, subject, f"certificate valid for {probe.name}, ALPN {probe.alpn}, {how}")
    if verdict is Verdict.CLIENT_CERT_DEMANDED:
        return passed(
            TLS,
            subject,
            f"certificate valid for {probe.name}, ALPN {probe.alpn}; the server then demanded "
            f"a client certificate ({probe.detail}): pass --cert/--key to test mutual TLS too",
        )
    if verdict is Verdict.CLOSED_AFTER_HANDSHAKE and not with_cert:
        return passed(
            TLS,
            subject,
            f"certificate valid for {probe.name}, ALPN {probe.alpn}; the server then closed "
            "the connection, presumably for want of a client certificate (pass --cert/--key)",
        )
    if verdict in (Verdict.CLIENT_CERT_REFUSED, Verdict.CLOSED_AFTER_HANDSHAKE):
        return failed(
            TLS,
            subject,
            f"certificate valid for {probe.name}, but the server refused the client "
            f"certificate --cert ({probe.detail or 'closed the connection'})",
            f"Pass as --cert/--key a server certificate of {local_dc} signed by the same CA "
            f"as {dc}'s servers: with ALPN, Consul always requires mutual TLS.",
        )
    if verdict is Verdict.NAME_MISMATCH:
        return failed(TLS, subject, f"the certificate is not valid for {probe.name}{got}", reissue)
    if verdict is Verdict.UNTRUSTED:
        return failed(
            TLS,
            subject,
            f"the certificate does not verify against --server-ca-file: {probe.detail}",
            f"Give --server-ca-file the CA that signed {dc}'s server certificates, or reissue them "
            "from the agent CA every datacenter shares.",
        )
    if verdict is Verdict.NO_ALPN:
        return failed(
            TLS,
            subject,
            f"certificate valid for {probe.name}, but the server selected no ALPN protocol "
            f"({ALPN} offered): not a Consul server's RPC port",
            f"Make the gateways of {dc} route {probe.name} to the servers' RPC port (8300), "
            "where Consul selects consul/rpc-multi.",
        )
    if verdict is Verdict.HANDSHAKE_REFUSED:
        if not with_cert and any(a in probe.detail.upper() for a in _CLIENT_CERT_ALERTS):
            return failed(
                TLS,
                subject,
                f"the server refused the handshake ({probe.detail}) before its name could be "
                "checked, as a TLS 1.2 server that requires a client certificate does",
                f"Pass --cert/--key (a server certificate of {local_dc}) so the handshake can "
                "complete.",
            )
        return failed(TLS, subject, f"the server refused the handshake ({probe.detail})", reissue)
    if verdict is Verdict.CLOSED:
        return failed(
            TLS,
            subject,
            f"the connection closed before the handshake finished ({probe.detail}): the "
            f"gateway has no route for {probe.name}, or no path to {dc}'s servers",
            route_fix,
        )
    if verdict is Verdict.UNREACHABLE:
        return failed(
            TLS,
            subject,
            f"cannot connect to the gateway: {probe.detail}",
            "Start the local gateway, or pass --gateway HOST:PORT of one that is reachable "
            "from here.",
        )
    return failed(  # TIMEOUT
        TLS,
        subject,
        f"no TLS answer: {probe.detail}",
        route_fix,
    )


async def tls_probe(
    host: str,
    port: int,
    name: str,
    context: ssl.SSLContext,
    timeout: float,
    *,
    with_cert: bool,
) -> Probe:
    """One handshake with SNI `name` through the gateway at host:port.

    Sans-I/O TLS (ssl.MemoryBIO) over a plain stream, so that the moments are told apart: the
    handshake, the certificate check, and what the server says after it. In TLS 1.3 the client
    finishes before the server has seen the client certificate; the server's verdict comes
    afterwards as a session ticket (accepted) or an alert (refused)."""
    gateway = hostport(host, port)
    try:
        async with connected(host, port, timeout) as (reader, writer):
            return await _handshake(reader, writer, gateway, name, context, timeout, with_cert)
    except Unreachable as error:
        verdict = Verdict.TIMEOUT if error.timed_out else Verdict.UNREACHABLE
        return Probe(gateway, name, verdict, str(error))


class Unreachable(Exception):
    """The gateway's port did not accept the connection; `timed_out` when it never answered."""

    def __init__(self, detail: str, *, timed_out: bool = False) -> None:
        super().__init__(detail)
        self.timed_out = timed_out


@contextlib.asynccontextmanager
async def connected(
    host: str, port: int, timeout: float
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A connection to a gateway, closed on the way out; raises Unreachable."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
    except OSError as error:
        raise Unreachable(error.strerror or str(error)) from None
    except TimeoutError:
        raise Unreachable(f"connecting took over {timeout:g}s", timed_out=True) from None
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    gateway: str,
    name: str,
    context: ssl.SSLContext,
    timeout: float,
    with_cert: bool,
) -> Probe:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)

    async def flush() -> None:
        data = outgoing.read()
        if data:
            writer.write(data)
            await writer.drain()

    async def fill() -> None:
        data = await reader.read(65536)
        if data:
            incoming.write(data)
        else:
            incoming.write_eof()

    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await flush()
                    await fill()
            await flush()
    except TimeoutError:
        return Probe(gateway, name, Verdict.TIMEOUT, f"no handshake within {timeout:g}s")
    except ssl.SSLCertVerificationError as error:
        return Probe(gateway, name, Verdict.UNTRUSTED, str(error.verify_message or error))
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError) as error:
        return Probe(gateway, name, Verdict.CLOSED, type(error).__name__)
    except ssl.SSLError as error:
        if "NO_APPLICATION_PROTOCOL" in _alert(error).upper():
            return Probe(gateway, name, Verdict.NO_ALPN, _alert(error))
        return Probe(gateway, name, Verdict.HANDSHAKE_REFUSED, _alert(error))

    names = tuple(certificate_names(tls.getpeercert()))
    alpn = tls.selected_alpn_protocol()
    version = tls.version()

    def seen(verdict: Verdict, detail: str = "") -> Probe:
        return Probe(gateway, name, verdict, detail, names, alpn, version)

    # Hostname verification by hand (the context has check_hostname off) so that a mismatch can
    # still show which names the certificate does carry.
    if not any(name_matches(pattern, name) for pattern in names):
        return seen(Verdict.NAME_MISMATCH)
    if alpn != ALPN:
        return seen(Verdict.NO_ALPN)
    if version != "TLSv1.3":
        # Before 1.3 the server checks the client certificate inside the handshake.
        return seen(Verdict.ACCEPTED)
    try:
        async with asyncio.timeout(POST_HANDSHAKE_WAIT):
            while True:
                try:
                    tls.read(1)
                    return seen(Verdict.ACCEPTED)  # the server spoke first: it accepted us
                except ssl.SSLWantReadError:
                    session = tls.session
                    if session is not None and session.has_ticket:
                        return seen(Verdict.ACCEPTED)
                    await fill()
    except TimeoutError:  # neither ticket nor alert: nothing refused us
        return seen(Verdict.ACCEPTED)
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError) as error:
        return seen(Verdict.CLOSED_AFTER_HANDSHAKE, type(error).__name__)
    except ssl.SSLError as error:
        alert = _alert(error)
        if any(a in alert.upper() for a in _CLIENT_CERT_ALERTS):
            refused = Verdict.CLIENT_CERT_REFUSED if with_cert else Verdict.CLIENT_CERT_DEMANDED
            return seen(refused, alert)
        return seen(Verdict.HANDSHAKE_REFUSED, alert)


def tls_context(options: DoctorOptions) -> ssl.SSLContext:
    """What a Consul server dialing another datacenter uses: the agent CA, its own server
    certificate as client certificate, one ALPN protocol. Raises ValueError naming the flag."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # checked by hand after the handshake; see _handshake
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=options.server_ca_file)
    except (ssl.SSLError, OSError) as error:
        raise ValueError(
            f"--server-ca-file {options.server_ca_file}: not a PEM CA certificate ({error})"
        ) from None
    if options.cert is not None and options.key is not None:
        try:
            context.load_cert_chain(options.cert, options.key)
        except (ssl.SSLError, OSError) as error:
            raise ValueError(
                f"--cert {options.cert} with --key {options.key}: not a matching PEM "
                f"certificate and key ({error})"
            ) from None
    context.set_alpn_protocols([ALPN])
    return context


def tls_subjects(dc: str, domain: str, servers: Outcome | None) -> tuple[list[str], list[Check]]:
    """The names to try for a remote datacenter: the any-server name, then each known
    server's own name (servers dial those, item 5); names that cannot exist are skipped."""
    try:
        names = [server_sni(dc, domain)]
    except ValueError as error:
        return [], [skipped(TLS, dc, f"no SNI name can be formed: {error}")]
    notes: list[Check] = []
    for node in server_nodes(servers) if isinstance(servers, list) else []:
        try:
            names.append(server_sni(dc, domain, node))
        except ValueError:
            notes.append(skipped(TLS, f"{node} in {dc}", "node name cannot be part of an SNI name"))
    return names, notes


def local_gateway_addresses(document: Outcome) -> list[tuple[str, int]]:
    """The local datacenter's wanfed gateways as its servers dial them: LAN best address
    (service Address, else node Address) and service Port, critical ones left out
    (docs/consul.md#gateway-locator)."""
    out: list[tuple[str, int]] = []
    for entry in mesh_gateways(document):
        if not is_wanfed(entry) or "critical" in check_statuses(entry):
            continue
        address = lan_address(entry)
        if address is not None and address not in out:
            out.append(address)
    return out
