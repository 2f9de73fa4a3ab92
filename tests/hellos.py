"""Real ClientHello bytes for the wire tests, and tools to re-frame and re-encode them.

Sources:
* :func:`python_hello` — CPython's ``ssl`` (OpenSSL underneath) driven over memory BIOs: the
  first flight of a real client handshake, no socket.
* :func:`openssl_hello` — ``openssl s_client`` dialing a throw-away listener on 127.0.0.1; the
  listener keeps the bytes up to the end of the hello (found with meshgw's own reader).

The box's OpenSSL 3.0 has no ML-KEM, so the post-quantum sizes (~1.7 KB, as Chrome's
X25519MLKEM768 hello; ~2.5 KB as in caddy-l4 #455) are made by re-encoding a real hello with a
bigger key_share or a padding extension: :func:`with_mlkem_key_share`, :func:`padded_to`.

The structural parser here (:func:`decode`) is deliberately separate from the code under test
and lenient: it only has to take apart well-formed hellos so tests can rebuild variants.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from meshgw.wire.clienthello import ClientHelloReader, Hello, Rejection, RejectReason

TRUST_DOMAIN = "7f42f496-fbc7-8692-05ed-334aa5340c1e.consul"

EXT_SERVER_NAME = 0
EXT_SUPPORTED_GROUPS = 10
EXT_ALPN = 16
EXT_PADDING = 21
EXT_SUPPORTED_VERSIONS = 43
EXT_KEY_SHARE = 51
EXT_ECH = 0xFE0D
GROUP_X25519MLKEM768 = 0x11EC
MLKEM768_X25519_SHARE = 1184 + 32  # ML-KEM-768 encapsulation key + X25519 public key

CAPTURE_TIMEOUT = 10.0  # seconds for one openssl capture, connect to hello
_WHOLE_HELLO_REASONS = frozenset({RejectReason.NO_SNI, RejectReason.INVALID_SERVER_NAME})


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def u24(n: int) -> bytes:
    return n.to_bytes(3, "big")


# ---------------------------------------------------------------------------------------------
# Taking a hello apart and putting it back together.


@dataclass(frozen=True)
class HelloParts:
    record_version: bytes  # 2 bytes of the first record header
    prefix: bytes  # body from legacy_version through compression_methods
    extensions: tuple[tuple[int, bytes], ...] | None  # None: no extensions block at all
    trailer: bytes = b""  # bytes after the extensions block (only for malformed variants)


def handshake_payload(data: bytes) -> tuple[bytes, bytes]:
    """Concatenate the bodies of the leading handshake records: (record_version, payload)."""
    out = bytearray()
    pos = 0
    version = data[1:3]
    for _ in range(len(data)):  # bounded: each turn consumes a record
        if pos + 5 > len(data) or data[pos] != 0x16:
            break
        rec_len = int.from_bytes(data[pos + 3 : pos + 5], "big")
        out += data[pos + 5 : pos + 5 + rec_len]
        pos += 5 + rec_len
        if len(out) >= 4 and len(out) >= 4 + int.from_bytes(out[1:4], "big"):
            break
    return version, bytes(out)


def decode(hello: bytes) -> HelloParts:
    version, payload = handshake_payload(hello)
    assert payload[0] == 1, "not a ClientHello"
    body = payload[4 : 4 + int.from_bytes(payload[1:4], "big")]
    pos = 34
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 1 + body[pos]
    prefix = body[:pos]
    if pos == len(body):
        return HelloParts(version, prefix, None)
    end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 2
    exts: list[tuple[int, bytes]] = []
    for _ in range(len(body)):  # bounded
        if pos >= end:
            break
        ext_type = int.from_bytes(body[pos : pos + 2], "big")
        ext_len = int.from_bytes(body[pos + 2 : pos + 4], "big")
        exts.append((ext_type, body[pos + 4 : pos + 4 + ext_len]))
        pos += 4 + ext_len
    return HelloParts(version, prefix, tuple(exts), body[end:])


def encode_body(parts: HelloParts) -> bytes:
    if parts.extensions is None:
        return parts.prefix + parts.trailer
    block = b"".join(u16(t) + u16(len(d)) + d for t, d in parts.extensions)
    return parts.prefix + u16(len(block)) + block + parts.trailer


def encode(parts: HelloParts) -> bytes:
    """One handshake record holding the ClientHello of ``parts``."""
    body = encode_body(parts)
    message = b"\x01" + u24(len(body)) + body
    assert len(message) <= 1 << 14, "too big for one record; use reframe"
    return b"\x16" + parts.record_version + u16(len(message)) + message


def rebuild(hello: bytes, **changes: object) -> bytes:
    return encode(replace(decode(hello), **changes))  # type: ignore[arg-type]


def extension(hello: bytes, ext_type: int) -> bytes | None:
    for t, d in decode(hello).extensions or ():
        if t == ext_type:
            return d
    return None


def with_extension(hello: bytes, ext_type: int, data: bytes, *, first: bool = False) -> bytes:
    """Replace extension ``ext_type`` in place, or add it (last, or first)."""
    parts = decode(hello)
    exts = list(parts.extensions or ())
    for i, (t, _) in enumerate(exts):
        if t == ext_type:
            exts[i] = (ext_type, data)
            break
    else:
        exts.insert(0 if first else len(exts), (ext_type, data))
    return encode(replace(parts, extensions=tuple(exts)))


def without_extension(hello: bytes, ext_type: int) -> bytes:
    parts = decode(hello)
    exts = tuple((t, d) for t, d in parts.extensions or () if t != ext_type)
    return encode(replace(parts, extensions=exts))


def server_name_ext(*entries: tuple[int, bytes]) -> bytes:
    """RFC 6066 ServerNameList from (name_type, name) pairs."""
    body = b"".join(u8(t) + u16(len(n)) + n for t, n in entries)
    return u16(len(body)) + body


def alpn_ext(*names: bytes) -> bytes:
    body = b"".join(u8(len(n)) + n for n in names)
    return u16(len(body)) + body


def with_server_name(hello: bytes, name: bytes) -> bytes:
    """The same hello with one host_name entry: ``name``, sent as raw bytes."""
    return with_extension(hello, EXT_SERVER_NAME, server_name_ext((0, name)))


def with_mlkem_key_share(hello: bytes) -> bytes:
    """Grow a TLS 1.3 hello to post-quantum size, as Chrome's X25519MLKEM768 hello.

    Adds the hybrid group first in supported_groups and a 1216-byte share first in key_share;
    drops OpenSSL's padding extension, which only pads small hellos. Result: ~1.7 KB.
    """
    groups = extension(hello, EXT_SUPPORTED_GROUPS)
    shares = extension(hello, EXT_KEY_SHARE)
    assert groups is not None and shares is not None, "needs a TLS 1.3 hello"
    new_groups = u16(GROUP_X25519MLKEM768) + groups[2:]
    share = u16(GROUP_X25519MLKEM768) + u16(MLKEM768_X25519_SHARE)
    share += os.urandom(MLKEM768_X25519_SHARE)
    new_shares = share + shares[2:]
    out = without_extension(hello, EXT_PADDING)
    out = with_extension(out, EXT_SUPPORTED_GROUPS, u16(len(new_groups)) + new_groups)
    return with_extension(out, EXT_KEY_SHARE, u16(len(new_shares)) + new_shares)


def padded_to(hello: bytes, total: int) -> bytes:
    """The same hello with a padding extension (RFC 7685) sized so the record is ``total``."""
    base = without_extension(hello, EXT_PADDING)
    pad = total - len(base) - 4
    assert pad >= 0, f"hello is already {len(base)} bytes"
    # Padding goes before pre_shared_key, which must stay last (RFC 8446 §4.2.11); simplest is
    # to put it last, as the helpers never produce a pre_shared_key.
    out = with_extension(base, EXT_PADDING, bytes(pad))
    assert len(out) == total
    return out


def reframe(hello: bytes, record_sizes: Sequence[int]) -> bytes:
    """Re-split the handshake payload of ``hello`` into records of ``record_sizes`` bytes.

    Sizes are used in order; the last one repeats until the payload is used up, and the final
    record takes what is left. Everything after the hello in ``hello`` is dropped.
    """
    assert record_sizes and all(s > 0 for s in record_sizes)
    version, payload = handshake_payload(hello)
    out = bytearray()
    pos = 0
    i = 0
    while pos < len(payload):  # bounded: each turn consumes ≥ 1 byte
        size = record_sizes[min(i, len(record_sizes) - 1)]
        chunk = payload[pos : pos + size]
        out += b"\x16" + version + u16(len(chunk)) + chunk
        pos += len(chunk)
        i += 1
    return bytes(out)


def record(content_type: int, body: bytes, version: bytes = b"\x03\x01") -> bytes:
    return u8(content_type) + version + u16(len(body)) + body


def sslv2_hello() -> bytes:
    """An SSLv2-compatible CLIENT-HELLO (RFC 6101 E.2 / RFC 5246 E.2), as old clients sent."""
    ciphers = bytes.fromhex("0100800700c000003500002f00000a")
    challenge = bytes(range(16))
    body = b"\x01\x03\x01" + u16(len(ciphers)) + u16(0) + u16(len(challenge))
    body += ciphers + challenge
    return u16(0x8000 | len(body)) + body


# ---------------------------------------------------------------------------------------------
# Real hellos.


@functools.cache
def python_hello(
    server_hostname: str | None,
    alpn: tuple[str, ...] = (),
    minimum_version: ssl.TLSVersion | None = None,
    maximum_version: ssl.TLSVersion | None = None,
) -> bytes:
    """The first flight of CPython's ssl client: exactly one ClientHello record."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_hostname is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if minimum_version is not None:
        ctx.minimum_version = minimum_version
    if maximum_version is not None:
        ctx.maximum_version = maximum_version
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    else:  # pragma: no cover - a client cannot finish without a server
        raise AssertionError("handshake finished without a server")
    return outgoing.read()


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


@functools.cache
def openssl_hello(
    servername: str | None, alpn: tuple[str, ...] = (), args: tuple[str, ...] = ()
) -> bytes:
    """Capture the ClientHello ``openssl s_client`` sends to a local listener.

    The listener reads until meshgw's reader answers (or the deadline passes), then the client
    process is killed by its PID and reaped, whatever happened.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(CAPTURE_TIMEOUT)
        port = listener.getsockname()[1]
        cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-ign_eof"]
        cmd += ["-servername", servername] if servername else ["-noservername"]
        if alpn:
            cmd += ["-alpn", ",".join(alpn)]
        cmd += list(args)
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            conn, _ = listener.accept()
            with conn:
                return _capture(conn)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=CAPTURE_TIMEOUT)


def _capture(conn: socket.socket) -> bytes:
    reader = ClientHelloReader()
    data = bytearray()
    deadline = time.monotonic() + CAPTURE_TIMEOUT
    while len(data) <= reader.max_bytes:  # bounded by size and by the deadline
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("openssl sent no complete ClientHello in time")
        conn.settimeout(remaining)
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("openssl closed before the ClientHello was complete")
        data += chunk
        result = reader.feed(chunk)
        if isinstance(result, Hello):
            return bytes(data[: result.length])
        if isinstance(result, Rejection) and result.reason in _WHOLE_HELLO_REASONS:
            return bytes(data[: reader.buffered])  # a whole hello, just not a routable one
        if result is not None:
            raise AssertionError(f"openssl sent something the reader rejects: {result}")
    raise AssertionError("ClientHello larger than the reader's cap")


def feed_in_pieces(reader: ClientHelloReader, data: bytes, cuts: Iterable[int]) -> object:
    """Feed ``data`` cut at the sorted offsets ``cuts``; return the last answer."""
    result = None
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if start <= cut:
            result = reader.feed(data[start:cut])
            start = cut
    return result
