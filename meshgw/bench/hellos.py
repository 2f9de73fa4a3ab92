"""The ClientHellos the load generator sends: real ones, from CPython's TLS client.

`classic` is what OpenSSL sends today (about 520 bytes: it pads small hellos to 512). `mlkem`
is the same hello grown to post-quantum size, as Chrome's X25519MLKEM768 hello: the hybrid group
first in supported_groups, a 1216-byte share first in key_share, and padding (RFC 7685) to
~1.7 KB overall, which is where browsers' hybrid hellos land. The box's OpenSSL has no ML-KEM,
so the share is random bytes of the right size: the proxy only reads it, never uses it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ssl

EXT_SUPPORTED_GROUPS = 10
EXT_PADDING = 21
EXT_KEY_SHARE = 51
GROUP_X25519MLKEM768 = 0x11EC
MLKEM768_X25519_SHARE = 1184 + 32  # ML-KEM-768 encapsulation key + X25519 public key
MLKEM_HELLO_SIZE = 1712  # bytes on the wire, as a Chrome hybrid hello


def _u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


@functools.cache
def client_hello(server_name: str) -> bytes:
    """The first flight of CPython's TLS client for `server_name`: one ClientHello record."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _split(hello: bytes) -> tuple[bytes, bytes, list[tuple[int, bytes]]]:
    """(record version, body up to the extensions, extensions) of a one-record ClientHello."""
    if hello[0] != 0x16 or hello[5] != 1:
        raise ValueError("not a ClientHello record")
    body = hello[9 : 9 + int.from_bytes(hello[6:9], "big")]
    pos = 34  # legacy_version + random
    pos += 1 + body[pos]  # session id
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher suites
    pos += 1 + body[pos]  # compression methods
    prefix = body[:pos]
    end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 2
    exts: list[tuple[int, bytes]] = []
    while pos < end:
        ext_type = int.from_bytes(body[pos : pos + 2], "big")
        ext_len = int.from_bytes(body[pos + 2 : pos + 4], "big")
        exts.append((ext_type, body[pos + 4 : pos + 4 + ext_len]))
        pos += 4 + ext_len
    return hello[1:3], prefix, exts


def _join(version: bytes, prefix: bytes, exts: list[tuple[int, bytes]]) -> bytes:
    block = b"".join(_u16(t) + _u16(len(d)) + d for t, d in exts)
    body = prefix + _u16(len(block)) + block
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16" + version + _u16(len(message)) + message


@functools.cache
def mlkem_hello(server_name: str) -> bytes:
    """The classic hello of `server_name` re-encoded at post-quantum size (see the module doc)."""
    version, prefix, exts = _split(client_hello(server_name))
    found = {t: d for t, d in exts}
    groups, shares = found.get(EXT_SUPPORTED_GROUPS), found.get(EXT_KEY_SHARE)
    if groups is None or shares is None:
        raise ValueError("needs a TLS 1.3 hello")
    new_groups = _u16(GROUP_X25519MLKEM768) + groups[2:]
    # Deterministic filler (a hash stream), so every run sends the same bytes.
    filler = hashlib.shake_256(server_name.encode()).digest(MLKEM768_X25519_SHARE)
    share = _u16(GROUP_X25519MLKEM768) + _u16(MLKEM768_X25519_SHARE) + filler
    new_shares = share + shares[2:]
    out: list[tuple[int, bytes]] = []
    for ext_type, data in exts:
        if ext_type == EXT_PADDING:
            continue
        if ext_type == EXT_SUPPORTED_GROUPS:
            data = _u16(len(new_groups)) + new_groups
        elif ext_type == EXT_KEY_SHARE:
            data = _u16(len(new_shares)) + new_shares
        out.append((ext_type, data))
    size = len(_join(version, prefix, out))
    if size + 4 <= MLKEM_HELLO_SIZE:
        out.append((EXT_PADDING, bytes(MLKEM_HELLO_SIZE - size - 4)))
    return _join(version, prefix, out)
