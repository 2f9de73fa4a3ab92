"""Incremental, sans-I/O reader of a TLS ClientHello.

Feed it the first bytes of a connection in any split; it answers ``None`` (need more), a
:class:`Hello` or a :class:`Rejection`. It never terminates TLS and never owns a socket: the data
plane keeps the raw bytes it fed and replays them upstream verbatim.

Decisions, in stream order, each as early as the bytes allow:

* byte 0: ``0x16`` is a TLS handshake record; high bit set with message type 1 at byte 2 is an
  SSLv2-compatible hello (:attr:`RejectReason.SSLV2`); anything else is
  :attr:`RejectReason.NOT_TLS`. A record version major other than 3 is ``NOT_TLS`` too.
* first handshake byte: type 1 or :attr:`RejectReason.NOT_CLIENT_HELLO`.
* records: the hello may span several handshake records (RFC 8446 §5.1). Each record's length
  must be 1..2^14: RFC 8446 §5.1 caps TLSPlaintext at 2^14 and the ClientHello is plaintext, and
  Consul's servers (Go crypto/tls) answer record_overflow above it, so the 2^14+2048 slack of
  TLS 1.2 ciphertext buys nothing. Zero-length handshake records are forbidden by the same
  section. Any other record type before the hello is complete is ``MALFORMED``.
* the hello must end exactly at a record boundary. A record that carries bytes past the
  ClientHello would hold the start of a second handshake message, which a client cannot send
  before the server has answered; refusing it means :attr:`Hello.length` is always the end of a
  record, so the data plane can replay exactly ``length`` bytes and splice the rest.
* size: once the handshake length is known, the least number of stream bytes the hello can
  occupy (record headers so far + the message) is checked against ``max_bytes``; before that,
  the declared record lengths are. Either going over the cap is ``TOO_LARGE`` immediately, so
  the reader never accumulates more than ``max_bytes``.
* body: walked once, with strict bounds (see :func:`_parse_body`). Structure errors win over a
  bad or missing server name.

Cost: record headers are parsed as they arrive and only handshake payload is accumulated, so a
hello fed in n pieces costs O(total bytes + n). A whole single-record hello in one feed (the
common case) skips the accumulator entirely.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from meshgw.wire.names import normalize_host_name

__all__ = [
    "DEFAULT_MAX_HELLO_BYTES",
    "MAX_RECORD_PAYLOAD",
    "ClientHelloReader",
    "Hello",
    "RejectReason",
    "Rejection",
    "parse_client_hello",
]

DEFAULT_MAX_HELLO_BYTES: Final = 65536
MAX_RECORD_PAYLOAD: Final = 1 << 14  # RFC 8446 §5.1: TLSPlaintext.length MUST NOT exceed 2^14

_RECORD_HEADER: Final = 5
_HANDSHAKE_HEADER: Final = 4
_CT_HANDSHAKE: Final = 0x16
_HT_CLIENT_HELLO: Final = 0x01

_EXT_SERVER_NAME: Final = 0
_EXT_ALPN: Final = 16
_EXT_SUPPORTED_VERSIONS: Final = 43
_EXT_ECH: Final = 0xFE0D
_SNI_HOST_NAME: Final = 0

# legacy_version(2) random(32) session_id_len(1) suites_len(2) one_suite(2) comp_len(1) comp(1)
_MIN_BODY: Final = 41
# ALPN names kept: printable ASCII without space. Others (GREASE values such as b"\x0a\x0a",
# RFC 8701, or arbitrary bytes) are skipped: valid on the wire, useless as a metric label.
_ALPN_PRINTABLE: Final = bytes(range(0x21, 0x7F))
_PREVIEW: Final = 64  # bytes of a bad name quoted in a rejection detail
# struct beats per-byte indexing and shifting in the extension walk (about a third faster).
_unpack_u16 = struct.Struct(">H").unpack_from
_unpack_ext_header = struct.Struct(">HH").unpack_from


class RejectReason(enum.Enum):
    """Why a connection's first bytes are not a usable ClientHello (a metric label value)."""

    NOT_TLS = "not_tls"
    SSLV2 = "sslv2"
    NOT_CLIENT_HELLO = "not_client_hello"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    INVALID_SERVER_NAME = "invalid_server_name"
    NO_SNI = "no_sni"


@dataclass(frozen=True, slots=True)
class Hello:
    """What meshgw needs from a ClientHello."""

    sni: str  # canonical host name: ASCII, lower-case, no trailing dot
    alpn: tuple[str, ...]  # printable-ASCII protocol names, in offer order (others skipped)
    legacy_version: int  # ClientHello.legacy_version, e.g. 0x0303
    supported_versions: tuple[int, ...]  # as sent, GREASE included; () without the extension
    has_ech: bool  # encrypted_client_hello (0xfe0d) offered: ``sni`` is the outer name
    length: int  # stream bytes the hello occupied, record headers included


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: RejectReason
    detail: str  # short, bounded, safe to log


Result = Hello | Rejection


class _Malformed(Exception):
    """Internal: a bounds or grammar check failed inside the handshake body."""


class ClientHelloReader:
    """Feed bytes, get ``None`` (need more), a :class:`Hello` or a :class:`Rejection`.

    Bounded by construction: it never holds more than ``max_bytes`` of stream. Once it has
    answered a Hello or a Rejection the answer is final: later ``feed`` calls return the same
    object and ignore their data. Bytes after the hello in the feed that completed it (a
    pipelined ChangeCipherSpec, early data) are not consumed: ``Hello.length`` says where the
    hello ended. Not thread-safe; one reader per connection.
    """

    __slots__ = (
        "_hdr",
        "_hs_len",
        "_max",
        "_payload",
        "_payload_declared",
        "_rec_left",
        "_records",
        "_result",
        "buffered",
    )

    def __init__(self, max_bytes: int = DEFAULT_MAX_HELLO_BYTES) -> None:
        if max_bytes < _RECORD_HEADER + _HANDSHAKE_HEADER:
            raise ValueError(f"max_bytes={max_bytes} is too small to hold any ClientHello")
        self._max = max_bytes
        self._hdr = bytearray()  # a record header split across feeds (< 5 bytes)
        self._payload = bytearray()  # handshake bytes accumulated from record bodies
        self._rec_left = 0  # body bytes of the current record not yet seen
        self._records = 0  # record headers accepted
        self._payload_declared = 0  # sum of the accepted records' lengths
        self._hs_len = -1  # handshake message length, once its 4-byte header is in
        self._result: Result | None = None
        #: Stream bytes consumed so far (never more than ``max_bytes``; equals
        #: ``Hello.length`` once a Hello is answered).
        self.buffered = 0

    @property
    def max_bytes(self) -> int:
        return self._max

    @property
    def result(self) -> Result | None:
        """The final answer, or ``None`` while more bytes are needed."""
        return self._result

    def feed(self, data: bytes | bytearray | memoryview) -> Result | None:
        if self._result is not None:
            return self._result
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1 or not mv.contiguous:
            mv = memoryview(mv.tobytes())  # rare: a typed or strided view, flatten to bytes
        if self.buffered == 0:
            fast = self._fast_path(mv)
            if fast is not None:
                return fast
        n = len(mv)
        pos = 0
        while pos < n:  # each turn consumes ≥ 1 byte or returns
            if self._rec_left == 0:
                take = min(_RECORD_HEADER - len(self._hdr), n - pos)
                self._hdr += mv[pos : pos + take]
                pos += take
                self.buffered += take
                rejected = self._check_header()
                if rejected is not None:
                    return self._finish(rejected)
            else:
                take = min(self._rec_left, n - pos)
                self._payload += mv[pos : pos + take]
                pos += take
                self._rec_left -= take
                self.buffered += take
                result = self._after_payload()
                if result is not None:
                    return self._finish(result)
        return None

    # -- record layer --------------------------------------------------------------------------

    def _check_header(self) -> Rejection | None:
        """Judge the (possibly partial) record header in ``_hdr``; accept it once complete."""
        hdr = self._hdr
        first = self._records == 0
        if first:
            if hdr[0] != _CT_HANDSHAKE:
                if hdr[0] & 0x80:
                    # SSLv2 record: 2-byte length with the high bit set, then msg type 1.
                    if len(hdr) < 3:
                        return None
                    if hdr[2] == 1:
                        return Rejection(RejectReason.SSLV2, "SSLv2-compatible ClientHello")
                return Rejection(RejectReason.NOT_TLS, f"first byte 0x{hdr[0]:02x}")
            if len(hdr) >= 2 and hdr[1] != 3:
                return Rejection(RejectReason.NOT_TLS, f"record version major {hdr[1]}")
        else:
            if hdr[0] != _CT_HANDSHAKE:
                return _malformed(f"record type {hdr[0]} inside the ClientHello")
            if len(hdr) >= 2 and hdr[1] != 3:
                return _malformed(f"record version major {hdr[1]} inside the ClientHello")
        if len(hdr) < _RECORD_HEADER:
            return None
        rec_len = (hdr[3] << 8) | hdr[4]
        hdr.clear()
        if rec_len == 0:
            return _malformed("zero-length handshake record")
        if rec_len > MAX_RECORD_PAYLOAD:
            return _malformed(f"record length {rec_len} > {MAX_RECORD_PAYLOAD}")
        self._records += 1
        self._payload_declared += rec_len
        self._rec_left = rec_len
        return self._check_bounds()

    def _check_bounds(self) -> Rejection | None:
        """Size and framing checks that depend only on declared lengths."""
        need = self._payload_declared
        if self._hs_len >= 0:
            msg = _HANDSHAKE_HEADER + self._hs_len
            if need > msg:
                return _malformed("record extends past the end of the ClientHello")
            need = msg
        least = self._records * _RECORD_HEADER + need
        if least > self._max:
            return Rejection(
                RejectReason.TOO_LARGE, f"ClientHello needs at least {least} > {self._max} bytes"
            )
        return None

    # -- handshake layer -----------------------------------------------------------------------

    def _after_payload(self) -> Result | None:
        buf = self._payload
        if self._hs_len < 0:
            if buf[0] != _HT_CLIENT_HELLO:
                return Rejection(RejectReason.NOT_CLIENT_HELLO, f"handshake type {buf[0]}")
            if len(buf) >= _HANDSHAKE_HEADER:
                self._hs_len = int.from_bytes(buf[1:4], "big")
                rejected = self._check_bounds()
                if rejected is not None:
                    return rejected
        if self._hs_len >= 0 and len(buf) >= _HANDSHAKE_HEADER + self._hs_len:
            # _check_bounds guarantees the last record ends exactly here.
            return _parse_body(bytes(buf[_HANDSHAKE_HEADER:]), self.buffered)
        if self._rec_left == 0:
            return self._check_next_record()
        return None

    def _check_next_record(self) -> Rejection | None:
        """The hello goes on in another record: count that record's header and at least one
        byte of it now, before reading any of it, so that even the header's first bytes are
        never read past the cap. While the handshake header itself is incomplete, the message
        still needs at least its four bytes."""
        message = _HANDSHAKE_HEADER + max(self._hs_len, 0)
        least = (self._records + 1) * _RECORD_HEADER + max(self._payload_declared + 1, message)
        if least > self._max:
            return Rejection(
                RejectReason.TOO_LARGE, f"ClientHello needs at least {least} > {self._max} bytes"
            )
        return None

    def _fast_path(self, mv: memoryview) -> Result | None:
        """A whole ClientHello in one record at the start of one feed: no accumulation.

        Takes only input on which every check of the general path passes up to the body,
        so both paths always agree; anything else returns None and goes the long way.
        """
        if len(mv) < _RECORD_HEADER + _HANDSHAKE_HEADER:
            return None
        if mv[0] != _CT_HANDSHAKE or mv[1] != 3 or mv[5] != _HT_CLIENT_HELLO:
            return None
        rec_len = (mv[3] << 8) | mv[4]
        total = _RECORD_HEADER + rec_len
        if (
            rec_len > MAX_RECORD_PAYLOAD
            or total > self._max
            or len(mv) < total
            or int.from_bytes(mv[6:9], "big") + _HANDSHAKE_HEADER != rec_len
        ):
            return None
        self._records = 1
        self.buffered = total
        return self._finish(_parse_body(bytes(mv[9:total]), total))

    def _finish(self, result: Result) -> Result:
        self._result = result
        # Release what is no longer needed; the answer is final.
        self._payload.clear()
        self._hdr.clear()
        return result


def _malformed(detail: str) -> Rejection:
    return Rejection(RejectReason.MALFORMED, detail)


def _preview(raw: bytes) -> str:
    text = repr(raw[:_PREVIEW])
    return text + "..." if len(raw) > _PREVIEW else text


def _parse_body(body: bytes, length: int) -> Result:
    """Walk a ClientHello body (after the 4-byte handshake header) strictly.

    legacy_version must be 3.x; session_id at most 32 bytes; cipher_suites non-empty and even;
    at least one compression method; extensions, if present, must fill the body exactly, each
    type at most once; no bytes may follow them. Inside the extensions we read: server_name
    (a non-empty list; the single host_name entry, a second one is malformed as in RFC 6066 §3),
    ALPN (non-empty list of non-empty names), supported_versions (non-empty, even), and the ECH
    extension's presence.
    """
    try:
        return _walk_body(body, length)
    except _Malformed as exc:
        return _malformed(str(exc))


def _walk_body(b: bytes, length: int) -> Result:
    end = len(b)
    if end < _MIN_BODY:
        raise _Malformed(f"ClientHello body of {end} bytes is too short")
    legacy_version = (b[0] << 8) | b[1]
    if b[0] != 3:
        raise _Malformed(f"legacy_version 0x{legacy_version:04x}")
    pos = 34  # after version and random
    sid_len = b[pos]
    if sid_len > 32:
        raise _Malformed(f"session_id length {sid_len} > 32")
    pos += 1 + sid_len
    suites_len = _u16(b, pos, end)
    if suites_len == 0 or suites_len & 1:
        raise _Malformed(f"cipher_suites length {suites_len}")
    pos += 2 + suites_len
    if pos >= end:
        raise _Malformed("truncated before compression_methods")
    comp_len = b[pos]
    if comp_len == 0:
        raise _Malformed("no compression method")
    pos += 1 + comp_len
    if pos > end:
        raise _Malformed("compression_methods overrun the ClientHello")
    found = _Extensions()
    if pos < end:  # extensions are optional (SSL 3.0 / old TLS 1.0 clients)
        _walk_extensions(b, pos, end, found)
    raw_sni = found.raw_sni
    if raw_sni is None:
        return Rejection(RejectReason.NO_SNI, "no server_name host_name")
    sni = normalize_host_name(raw_sni.decode("ascii")) if raw_sni.isascii() else None
    if sni is None:
        return Rejection(RejectReason.INVALID_SERVER_NAME, f"server_name {_preview(raw_sni)}")
    return Hello(sni, found.alpn, legacy_version, found.versions, found.has_ech, length)


class _Extensions:
    """What the extension walk found."""

    __slots__ = ("alpn", "has_ech", "raw_sni", "versions")

    def __init__(self) -> None:
        self.raw_sni: bytes | None = None
        self.alpn: tuple[str, ...] = ()
        self.versions: tuple[int, ...] = ()
        self.has_ech = False


def _walk_extensions(b: bytes, pos: int, end: int, found: _Extensions) -> None:
    """The extensions must fill the body exactly, each type at most once."""
    ext_total = _u16(b, pos, end)
    pos += 2
    if pos + ext_total != end:
        raise _Malformed("extensions length does not match the ClientHello length")
    seen: set[int] = set()
    while pos < end:  # each turn consumes ≥ 4 bytes
        if pos + 4 > end:
            raise _Malformed("truncated extension header")
        ext_type, ext_len = _unpack_ext_header(b, pos)
        pos += 4
        ext_end = pos + ext_len
        if ext_end > end:
            raise _Malformed(f"extension {ext_type} overruns the ClientHello")
        if ext_type in seen:
            raise _Malformed(f"duplicate extension {ext_type}")
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            found.raw_sni = _server_name(b, pos, ext_end)
        elif ext_type == _EXT_ALPN:
            found.alpn = _alpn(b, pos, ext_end)
        elif ext_type == _EXT_SUPPORTED_VERSIONS:
            found.versions = _supported_versions(b, pos, ext_end)
        elif ext_type == _EXT_ECH:
            found.has_ech = True
        pos = ext_end


def _u16(b: bytes, pos: int, end: int) -> int:
    if pos + 2 > end:
        raise _Malformed("truncated length field")
    value: int = _unpack_u16(b, pos)[0]
    return value


def _server_name(b: bytes, pos: int, end: int) -> bytes | None:
    """RFC 6066 §3 ServerNameList; returns the host_name, or None if there is none."""
    list_len = _u16(b, pos, end)
    pos += 2
    if list_len == 0 or pos + list_len != end:
        raise _Malformed("server_name list length")
    host: bytes | None = None
    while pos < end:  # each turn consumes ≥ 3 bytes
        if pos + 3 > end:
            raise _Malformed("truncated server_name entry")
        name_type = b[pos]
        name_len = (b[pos + 1] << 8) | b[pos + 2]
        pos += 3
        if pos + name_len > end:
            raise _Malformed("server_name entry overruns its list")
        if name_type == _SNI_HOST_NAME:
            if host is not None:
                raise _Malformed("two host_name entries in server_name")
            host = b[pos : pos + name_len]
        pos += name_len
    return host


def _alpn(b: bytes, pos: int, end: int) -> tuple[str, ...]:
    """RFC 7301 §3.1 ProtocolNameList."""
    list_len = _u16(b, pos, end)
    pos += 2
    if list_len == 0 or pos + list_len != end:
        raise _Malformed("ALPN list length")
    names: list[str] = []
    while pos < end:  # each turn consumes ≥ 2 bytes
        name_len = b[pos]
        pos += 1
        if name_len == 0 or pos + name_len > end:
            raise _Malformed("ALPN protocol name length")
        raw = b[pos : pos + name_len]
        pos += name_len
        if not raw.translate(None, _ALPN_PRINTABLE):
            names.append(raw.decode("ascii"))
    return tuple(names)


def _supported_versions(b: bytes, pos: int, end: int) -> tuple[int, ...]:
    """RFC 8446 §4.2.1, ClientHello form: a 1-byte length, then 2-byte versions."""
    if pos >= end:
        raise _Malformed("empty supported_versions")
    list_len = b[pos]
    pos += 1
    if list_len == 0 or list_len & 1 or pos + list_len != end:
        raise _Malformed("supported_versions length")
    versions: tuple[int, ...] = struct.unpack_from(f">{list_len >> 1}H", b, pos)
    return versions


def parse_client_hello(
    data: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_HELLO_BYTES
) -> Result | None:
    """One-shot :meth:`ClientHelloReader.feed` on a fresh reader."""
    return ClientHelloReader(max_bytes).feed(data)
