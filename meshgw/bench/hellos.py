"""ClientHello bytes for the bench and the tests: real ones, taken apart and re-encoded.

:func:`python_hello` is the first flight of CPython's TLS client (OpenSSL underneath), driven
over memory BIOs: a real ClientHello, no socket. Everything else re-encodes such a hello: one
extension replaced, added or dropped (:func:`with_extension`, :func:`without_extension`), a
padding extension to a given size (:func:`padded_to`), the handshake message re-split across
records (:func:`reframe`).

OpenSSL 3.0 has no ML-KEM, so the post-quantum size is made by re-encoding:
:func:`with_mlkem_key_share` puts the X25519MLKEM768 group first in supported_groups and a
1,216-byte share first in key_share, as Chrome does; :func:`mlkem_hello` pads that to 1,712 bytes,
where browsers' hybrid hellos land. The share is filler derived from the hello (the same bytes on
every run): a proxy reads it, never uses it.

The parser here (:func:`decode`) is deliberately separate from meshgw's reader
(`meshgw.wire.clienthello`) and lenient: it only takes apart well-formed hellos so that variants
can be rebuilt, and the reader is then tested against them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, replace

EXT_SERVER_NAME = 0
EXT_SUPPORTED_GROUPS = 10
EXT_ALPN = 16
EXT_PADDING = 21
EXT_SUPPORTED_VERSIONS = 43
EXT_KEY_SHARE = 51
EXT_ECH = 0xFE0D
GROUP_X25519MLKEM768 = 0x11EC
MLKEM768_X25519_SHARE = 1184 + 32  # ML-KEM-768 encapsulation key + X25519 public key
MLKEM_HELLO_SIZE = 1712  # bytes on the wire, as a Chrome hybrid hello
MAX_RECORD = 1 << 14


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def u24(n: int) -> bytes:
    return n.to_bytes(3, "big")


def record(content_type: int, body: bytes, version: bytes = b"\x03\x01") -> bytes:
    return u8(content_type) + version + u16(len(body)) + body


# --- real hellos -------------------------------------------------------------------------------


@functools.cache
def python_hello(
    server_hostname: str | None,
    alpn: tuple[str, ...] = (),
    minimum_version: ssl.TLSVersion | None = None,
    maximum_version: ssl.TLSVersion | None = None,
) -> bytes:
    """The first flight of CPython's TLS client: exactly one ClientHello record.

    Cached: the same arguments give the same bytes for the life of the process.
    """
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
    with contextlib.suppress(ssl.SSLWantReadError):  # a client cannot finish without a server
        tls.do_handshake()
    return outgoing.read()


@functools.cache
def mlkem_hello(server_name: str) -> bytes:
    """CPython's hello for `server_name` at post-quantum size: 1,712 bytes (see the module doc)."""
    return padded_to(with_mlkem_key_share(python_hello(server_name)), MLKEM_HELLO_SIZE)


def sslv2_hello() -> bytes:
    """An SSLv2-compatible CLIENT-HELLO (RFC 6101 E.2 / RFC 5246 E.2), as old clients sent."""
    ciphers = bytes.fromhex("0100800700c000003500002f00000a")
    challenge = bytes(range(16))
    body = b"\x01\x03\x01" + u16(len(ciphers)) + u16(0) + u16(len(challenge))
    body += ciphers + challenge
    return u16(0x8000 | len(body)) + body


# --- taking a hello apart and putting it back together -----------------------------------------


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
    if not payload or payload[0] != 1:
        raise ValueError("not a ClientHello")
    body = payload[4 : 4 + int.from_bytes(payload[1:4], "big")]
    pos = 34  # legacy_version + random
    pos += 1 + body[pos]  # session id
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher suites
    pos += 1 + body[pos]  # compression methods
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
    """One handshake record holding the ClientHello of `parts`."""
    body = encode_body(parts)
    message = b"\x01" + u24(len(body)) + body
    if len(message) > MAX_RECORD:
        raise ValueError(f"{len(message)} bytes is too big for one record; use reframe")
    return record(0x16, message, parts.record_version)


def rebuild(hello: bytes, **changes: object) -> bytes:
    return encode(replace(decode(hello), **changes))  # type: ignore[arg-type]


def extension(hello: bytes, ext_type: int) -> bytes | None:
    for t, d in decode(hello).extensions or ():
        if t == ext_type:
            return d
    return None


def with_extension(hello: bytes, ext_type: int, data: bytes, *, first: bool = False) -> bytes:
    """Replace extension `ext_type` in place, or add it (last, or first)."""
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
    """The same hello with one host_name entry: `name`, sent as raw bytes."""
    return with_extension(hello, EXT_SERVER_NAME, server_name_ext((0, name)))


def with_mlkem_key_share(hello: bytes) -> bytes:
    """Grow a TLS 1.3 hello towards post-quantum size, as Chrome's X25519MLKEM768 hello.

    Adds the hybrid group first in supported_groups and a 1,216-byte share first in key_share;
    drops OpenSSL's padding extension, which only pads small hellos. Result: ~1.6 KB.
    """
    groups = extension(hello, EXT_SUPPORTED_GROUPS)
    shares = extension(hello, EXT_KEY_SHARE)
    if groups is None or shares is None:
        raise ValueError("needs a TLS 1.3 hello")
    new_groups = u16(GROUP_X25519MLKEM768) + groups[2:]
    # Deterministic filler (a hash stream of the hello): the same hello grows the same way.
    filler = hashlib.shake_256(hello).digest(MLKEM768_X25519_SHARE)
    share = u16(GROUP_X25519MLKEM768) + u16(MLKEM768_X25519_SHARE) + filler
    new_shares = share + shares[2:]
    out = without_extension(hello, EXT_PADDING)
    out = with_extension(out, EXT_SUPPORTED_GROUPS, u16(len(new_groups)) + new_groups)
    return with_extension(out, EXT_KEY_SHARE, u16(len(new_shares)) + new_shares)


def padded_to(hello: bytes, total: int) -> bytes:
    """The same hello with a padding extension (RFC 7685) sized so the record is `total`."""
    base = without_extension(hello, EXT_PADDING)
    pad = total - len(base) - 4
    if pad < 0:
        raise ValueError(f"hello is already {len(base)} bytes, more than {total} with padding")
    # Padding goes before pre_shared_key, which must stay last (RFC 8446 §4.2.11); simplest is
    # to put it last, as nothing here produces a pre_shared_key.
    out = with_extension(base, EXT_PADDING, bytes(pad))
    if len(out) != total:  # a hello without an extensions block grows by the block's length
        raise ValueError(f"cannot pad a {len(hello)}-byte hello to exactly {total}")
    return out


def reframe(hello: bytes, record_sizes: Sequence[int]) -> bytes:
    """Re-split the handshake payload of `hello` into records of `record_sizes` bytes.

    Sizes are used in order; the last one repeats until the payload is used up, and the final
    record takes what is left. Everything after the hello in `hello` is dropped.
    """
    if not record_sizes or any(s <= 0 for s in record_sizes):
        raise ValueError(f"record sizes must be positive: {record_sizes}")
    version, payload = handshake_payload(hello)
    out = bytearray()
    pos = 0
    i = 0
    while pos < len(payload):  # bounded: each turn consumes ≥ 1 byte
        size = record_sizes[min(i, len(record_sizes) - 1)]
        chunk = payload[pos : pos + size]
        out += record(0x16, chunk, version)
        pos += len(chunk)
        i += 1
    return bytes(out)
