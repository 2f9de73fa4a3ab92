"""Incremental, sans-I/O reader of a PROXY protocol header (haproxy's v1 text and v2 binary).

An L4 load balancer in front of the gateway (AWS NLB, GCP, haproxy) may prepend one header to
the client's bytes, telling who the client really is. With ``--proxy-protocol accept`` the data
plane feeds a connection's first bytes to a :class:`ProxyHeaderReader` before the ClientHello
reader, in any split; it answers ``None`` (need more), a :class:`ProxyHeader` or a
:class:`ProxyRejection`. Which sources may send a header is the data plane's policy, not ours.

Handing on the rest: the reader never consumes a byte past the header. The bytes that follow
it (the ClientHello) start at stream offset :attr:`ProxyHeader.length`: a caller that keeps
every byte it fed (the data plane keeps the client's first bytes anyway) passes
``received[header.length:]`` to the ClientHello reader and replays only those upstream, never
the header. ``reader.buffered`` equals ``header.length`` once the header is read.

Required, never guessed: the spec forbids guessing whether a header is present, so a stream
that starts with neither signature is :attr:`ProxyRejectReason.NOT_PROXY`, decided on its first
byte (anything but ``P`` or ``\\r``). Were an "optional" mode ever wanted, a caller could treat
a ``NOT_PROXY`` answer as "no header" and feed the same bytes (it keeps them) to the
ClientHello reader: a TLS record starts with ``0x16``, so for TLS that answer comes on the
first byte and costs no wait. The spec forbids such guessing because it lets peers that are
not balancers pass as clients; behind the CIDR policy it would mostly hide a balancer that
stopped sending headers, hence not planned.

Decisions, in stream order, each as early as the bytes allow (a rejection is a function of the
shortest rejected prefix, so every split of a stream gets the same answer):

* v2 (binary): the 12-byte signature, byte by byte (``NOT_PROXY`` at the first mismatch).
  Byte 13: version 2 only (others :attr:`~ProxyRejectReason.UNSUPPORTED`, perhaps a later
  protocol); command LOCAL or PROXY (others ``MALFORMED``). Byte 14, PROXY only: ``0x11`` TCP
  over IPv4, ``0x21`` TCP over IPv6, ``0x31`` UNIX stream, ``0x00`` UNSPEC; the datagram
  variants ``0x12/0x22/0x32`` are ``UNSUPPORTED`` (a UDP client on a TCP listener is a
  misconfigured balancer; the spec lets a receiver refuse them), anything else ``MALFORMED``.
  Bytes 15-16, the block length: it must hold the family's addresses (12, 36, 216 bytes) and
  ``16 + length`` must fit ``max_bytes`` (:attr:`~ProxyRejectReason.TOO_LARGE`, before any of
  the block is read). After the addresses come TLVs (type, 2-byte length, value), walked as
  their headers arrive: one that runs past the block, or 1-2 stray bytes after the last one,
  is ``MALFORMED``. LOCAL (health checks) means "use the connection's own address": its
  family byte and block are skipped unread, as the spec says (the cap still holds). So is the
  block of PROXY with UNSPEC, whose addresses the spec says to ignore.
* v1 (text): ``PROXY TCP4|TCP6|UNKNOWN src dst sport dport\\r\\n`` in at most 107 bytes.
  ``PROXY `` is the signature (``NOT_PROXY`` at the first mismatch); then a field is judged
  as soon as it ends, and a field still arriving as soon as it can no longer become valid.
  Exactly one space between fields; IPv4 as four decimal numbers 0-255 without leading zeros;
  IPv6 as RFC 4291 text (hex groups, one ``::``, a dotted IPv4 tail as inet_ntop writes
  mapped addresses; no zone); ports 0-65535, digits only, no leading zero; the family of both
  addresses is the protocol's. ``UNKNOWN`` may be followed by a space and anything but CR or
  LF, which is ignored. The line ends with CRLF: a lone LF or a CR followed by anything else
  is ``MALFORMED``, and so is a line with no CRLF within 107 bytes.

What the header carries: :class:`ProxyHeader` gives the command, transport, and the source and
destination as ``(host, port)`` ready for logs; ``source`` is ``None`` whenever the spec says to
use the connection's own addresses (LOCAL, UNSPEC, v1 UNKNOWN). Hosts are normalised so that v1
and v2 give one string per address: IPv4 dotted decimal, IPv6 in RFC 5952 form (lower case,
longest zero run as ``::``, mapped IPv4 as ``::ffff:a.b.c.d``), unbracketed; a UNIX socket is
``(path, 0)``, with an abstract name shown as ``@name`` and unprintable bytes as ``\\xNN``.
v2 TLVs are kept raw, in order (:attr:`ProxyHeader.tlvs`, :meth:`ProxyHeader.tlv`): a few small
copies, and they give AUTHORITY, ALPN, UNIQUE_ID and the cloud vendors' own types (AWS's VPC
endpoint id, 0xEA) without this module knowing them. Their contents are not judged.
PP2_TYPE_CRC32C is not verified: the spec makes that optional for the receiver, TCP already
checksums the bytes, and the sources are trusted by address.

Size: ``max_bytes`` (default 4096) caps the whole header; the protocol's own ceiling is
16 + 65535. Headers from real senders stay under 1 KiB: AWS NLB's is addresses plus a VPC
endpoint TLV (under 100 bytes), haproxy's with every SSL sub-TLV, a 128-byte unique id and a
255-byte authority under 700. A page leaves room for that and bounds what a half-sent header
can pin per connection. It must be at least 232 bytes, the largest header without TLVs
(UNIX addresses), which also holds any v1 line.

Cost: a whole header at the start of one feed (the common case) is judged in place without
accumulating. Otherwise header bytes are accumulated (never more than ``max_bytes``); a v2
header costs O(bytes + feeds), and a v1 line is re-judged on each feed, at most 107 bytes.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "MAX_V1_LINE",
    "MAX_V2_HEADER",
    "MIN_MAX_HEADER_BYTES",
    "V1_SIGNATURE",
    "V2_SIGNATURE",
    "Address",
    "Command",
    "ProxyHeader",
    "ProxyHeaderReader",
    "ProxyRejectReason",
    "ProxyRejection",
    "ProxyResult",
    "Tlv",
    "TlvType",
    "Transport",
    "parse_proxy_header",
]

V1_SIGNATURE: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V1_LINE: Final = 107  # "PROXY UNKNOWN" + two full IPv6 addresses and ports + CRLF
MAX_V2_HEADER: Final = 16 + 0xFFFF
MIN_MAX_HEADER_BYTES: Final = 16 + 216  # a v2 header with UNIX addresses and no TLV
DEFAULT_MAX_HEADER_BYTES: Final = 4096

_V2_FIXED: Final = 16  # signature, version/command, family/transport, block length
_TLV_HEADER: Final = 3
_CR: Final = 0x0D
_LF: Final = 0x0A
_P: Final = 0x50
_CMD_LOCAL: Final = 0
_CMD_PROXY: Final = 1
_FAM_UNSPEC: Final = 0x00
_FAM_DGRAM: Final = frozenset((0x12, 0x22, 0x32))

_unpack_words: Final = struct.Struct(">8H").unpack
_PRINTABLE: Final = bytes(c for c in range(0x20, 0x7F) if c != 0x5C)  # "\" is escaped too
_IPV6_CHARS: Final = b"0123456789abcdefABCDEF:."
_MAX_IPV6_TEXT: Final = 45  # eight groups with a dotted IPv4 tail, the longest valid form


class Command(enum.Enum):
    LOCAL = "local"  # v2 only: the balancer's own connection (a health check)
    PROXY = "proxy"


class Transport(enum.Enum):
    TCP4 = "tcp4"
    TCP6 = "tcp6"
    UNIX = "unix"  # v2 AF_UNIX stream
    UNSPEC = "unspec"  # v1 UNKNOWN, v2 UNSPEC, and any LOCAL: no addresses


class TlvType(enum.IntEnum):
    """The v2 TLV types the spec registers (vendors use 0xE0-0xEF, e.g. AWS 0xEA)."""

    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    NOOP = 0x04
    UNIQUE_ID = 0x05
    SSL = 0x20
    NETNS = 0x30


class ProxyRejectReason(enum.Enum):
    """Why a connection's first bytes are not a usable PROXY header (a metric label value)."""

    NOT_PROXY = "not_proxy"  # neither signature: the sender sent no header
    MALFORMED = "malformed"  # a signature, then bytes the spec forbids
    UNSUPPORTED = "unsupported"  # well-formed, but not taken here (v2 version, datagrams)
    TOO_LARGE = "too_large"  # the v2 header would exceed max_bytes


_FAMILIES: Final[dict[int, tuple[Transport, int]]] = {
    0x11: (Transport.TCP4, 12),
    0x21: (Transport.TCP6, 36),
    0x31: (Transport.UNIX, 216),
}


@dataclass(frozen=True, slots=True)
class Tlv:
    type: int  # see TlvType
    value: bytes


Address = tuple[str, int]  # (host, port), ready for logs


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a PROXY header says about the connection."""

    version: int  # 1 (text) or 2 (binary)
    command: Command
    transport: Transport
    source: Address | None  # the client; None: use the connection's own peer address
    destination: Address | None  # the address the client dialled; None like source
    tlvs: tuple[Tlv, ...]  # v2 TLVs in order, raw; () for v1, LOCAL and UNSPEC
    length: int  # stream bytes the header occupied: the ClientHello starts here

    def tlv(self, tlv_type: int) -> bytes | None:
        """The value of the first TLV of this type, or None."""
        for tlv in self.tlvs:
            if tlv.type == tlv_type:
                return tlv.value
        return None


@dataclass(frozen=True, slots=True)
class ProxyRejection:
    reason: ProxyRejectReason
    detail: str  # short, bounded, safe to log: quotes no sender bytes, only numbers


ProxyResult = ProxyHeader | ProxyRejection
_Buffer = bytes | bytearray | memoryview


class ProxyHeaderReader:
    """Feed bytes, get ``None`` (need more), a :class:`ProxyHeader` or a :class:`ProxyRejection`.

    Bounded: it never holds more than ``max_bytes``. Once it has answered, the answer is final:
    later ``feed`` calls return the same object and ignore their data. Bytes after the header in
    the feed that completed it are not consumed: ``ProxyHeader.length`` says where the header
    ended. Not thread-safe; one reader per connection.
    """

    __slots__ = ("_buf", "_max", "_result", "_tlv_at", "_v2_total", "buffered")

    def __init__(self, max_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> None:
        if max_bytes < MIN_MAX_HEADER_BYTES:
            raise ValueError(
                f"max_bytes={max_bytes} < {MIN_MAX_HEADER_BYTES}: too small for a v2 header"
                " with UNIX addresses"
            )
        self._max = max_bytes
        self._buf = bytearray()  # header bytes accumulated across feeds
        self._v2_total = 0  # whole v2 header length, once its 16 fixed bytes are in
        self._tlv_at = -1  # stream offset of the next v2 TLV header; -1: no TLVs to walk
        self._result: ProxyResult | None = None
        #: Stream bytes consumed so far (never more than ``max_bytes``; equals
        #: ``ProxyHeader.length`` once a header is answered).
        self.buffered = 0

    @property
    def max_bytes(self) -> int:
        return self._max

    @property
    def result(self) -> ProxyResult | None:
        """The final answer, or ``None`` while more bytes are needed."""
        return self._result

    def feed(self, data: bytes | bytearray | memoryview) -> ProxyResult | None:
        if self._result is not None:
            return self._result
        mv = memoryview(data)
        if mv.ndim != 1 or mv.format != "B" or not mv.c_contiguous:
            mv = memoryview(mv.tobytes())  # rare: a typed or strided view, flatten to bytes
        n = len(mv)
        if self.buffered == 0 and n:
            fast = self._fast_path(mv)
            if fast is not None:
                return fast
        buf = self._buf
        pos = 0
        while pos < n:  # each turn consumes ≥ 1 byte or returns
            take = self._room(mv, pos)
            buf += mv[pos : pos + take]
            pos += take
            self.buffered += take
            verdict = self._judge(buf)
            if verdict is not None:
                return self._finish(verdict)
        return None

    def _room(self, mv: memoryview, pos: int) -> int:
        """How many bytes of ``mv[pos:]`` may still belong to the header (at least 1)."""
        have = self.buffered
        avail = len(mv) - pos
        first = self._buf[0] if have else mv[pos]
        if first == _P:  # v1: up to the LF, within the line limit
            window = mv[pos : pos + min(MAX_V1_LINE - have, avail)].tobytes()
            lf = window.find(b"\n")
            return lf + 1 if lf >= 0 else len(window)
        if first == _CR:  # v2: the fixed part, then the rest once its length is known
            return min((self._v2_total or _V2_FIXED) - have, avail)
        return 1  # rejected at once

    def _judge(self, buf: bytearray) -> ProxyResult | None:
        first = buf[0]
        if first == _CR:
            return self._judge_v2(buf)
        if first == _P:
            return _v1_judge(bytes(buf))
        return ProxyRejection(
            ProxyRejectReason.NOT_PROXY, f"first byte 0x{first:02x} starts no PROXY signature"
        )

    def _judge_v2(self, buf: bytearray) -> ProxyResult | None:
        have = len(buf)
        if not self._v2_total:
            rejected = _v2_check_fixed(buf, self._max)
            if rejected is not None or have < _V2_FIXED:
                return rejected
            self._v2_total, self._tlv_at = _v2_layout(buf)
        if self._tlv_at >= 0:
            self._tlv_at, error = _walk_tlvs(buf, self._tlv_at, have, self._v2_total)
            if error is not None:
                return _malformed(error)
        if have < self._v2_total:
            return None
        return _v2_header(buf, self._v2_total)

    def _fast_path(self, mv: memoryview) -> ProxyResult | None:
        """A whole header at the start of one feed: judged in place, nothing accumulated.

        Takes only input that the general path would answer the same way from the same bytes
        (a whole valid v2 header, or a v1 line up to its LF); anything else returns None.
        """
        n = len(mv)
        first = mv[0]
        if first == _CR and n >= _V2_FIXED:
            if _v2_check_fixed(mv[:_V2_FIXED], self._max) is not None:
                return None
            total, tlv_at = _v2_layout(mv)
            if n < total or (tlv_at >= 0 and _walk_tlvs(mv, tlv_at, total, total)[1]):
                return None
            self.buffered = total
            return self._finish(_v2_header(mv, total))
        if first == _P:
            window = mv[:MAX_V1_LINE].tobytes()
            lf = window.find(b"\n")
            if lf < 0:
                return None
            # The general path would take exactly these bytes in one turn and judge them;
            # a line that holds its LF is always decided.
            verdict = _v1_judge(window[: lf + 1])
            if verdict is not None:
                self.buffered = lf + 1
                return self._finish(verdict)
        return None

    def _finish(self, result: ProxyResult) -> ProxyResult:
        self._result = result
        self._buf = bytearray()  # release it: the answer is final
        return result


def _malformed(detail: str) -> ProxyRejection:
    return ProxyRejection(ProxyRejectReason.MALFORMED, detail)


# -- v2 ----------------------------------------------------------------------------------------


def _v2_check_fixed(head: _Buffer, max_bytes: int) -> ProxyRejection | None:
    """Judge the first (up to) 16 bytes of a v2 header, in stream order."""
    have = len(head)
    sig = min(have, len(V2_SIGNATURE))
    if head[:sig] != V2_SIGNATURE[:sig]:
        return ProxyRejection(ProxyRejectReason.NOT_PROXY, "bytes do not match the v2 signature")
    if have <= 12:
        return None
    version, command = head[12] >> 4, head[12] & 0x0F
    if version != 2:
        return ProxyRejection(ProxyRejectReason.UNSUPPORTED, f"v2 signature, version {version}")
    if command > _CMD_PROXY:
        return _malformed(f"v2 command {command} is unassigned")
    if have <= 13:
        return None
    family = head[13]
    if command == _CMD_PROXY:  # LOCAL ignores the family byte
        if family in _FAM_DGRAM:
            return ProxyRejection(
                ProxyRejectReason.UNSUPPORTED, f"v2 datagram family 0x{family:02x}"
            )
        if family != _FAM_UNSPEC and family not in _FAMILIES:
            return _malformed(f"v2 family 0x{family:02x} is unassigned")
    if have < _V2_FIXED:
        return None
    block = (head[14] << 8) | head[15]
    if command == _CMD_PROXY and family in _FAMILIES:
        transport, need = _FAMILIES[family]
        if block < need:
            return _malformed(f"v2 block of {block} bytes < {need} for {transport.value}")
    if _V2_FIXED + block > max_bytes:
        return ProxyRejection(
            ProxyRejectReason.TOO_LARGE, f"v2 header of {_V2_FIXED + block} > {max_bytes} bytes"
        )
    return None


def _v2_layout(head: _Buffer) -> tuple[int, int]:
    """Header length and where its TLVs start (-1: the block is skipped unread)."""
    total = _V2_FIXED + ((head[14] << 8) | head[15])
    if head[12] & 0x0F == _CMD_PROXY and head[13] in _FAMILIES:
        return total, _V2_FIXED + _FAMILIES[head[13]][1]
    return total, -1


def _walk_tlvs(buf: _Buffer, at: int, have: int, end: int) -> tuple[int, str | None]:
    """Step over the TLV headers among the first ``have`` bytes; returns the next offset.

    Each TLV must end within the header (``end``); the gap after the last must be 0 or at
    least a TLV header, which is known as soon as the previous TLV's length is.
    """
    while at + _TLV_HEADER <= have:
        size = (buf[at + 1] << 8) | buf[at + 2]
        after = at + _TLV_HEADER + size
        if after > end:
            return at, f"v2 TLV 0x{buf[at]:02x} of {size} bytes overruns the header"
        at = after
    if 0 < end - at < _TLV_HEADER:
        return at, f"v2 header ends {end - at} bytes into a TLV header"
    return at, None


def _v2_header(buf: _Buffer, total: int) -> ProxyHeader:
    """Build the header from a whole v2 header that passed every check."""
    if buf[12] & 0x0F == _CMD_LOCAL:
        return ProxyHeader(2, Command.LOCAL, Transport.UNSPEC, None, None, (), total)
    family = buf[13]
    if family not in _FAMILIES:
        return ProxyHeader(2, Command.PROXY, Transport.UNSPEC, None, None, (), total)
    transport, size = _FAMILIES[family]
    source: Address
    destination: Address
    if transport is Transport.TCP4:
        source = (_ipv4_text(buf, 16), (buf[24] << 8) | buf[25])
        destination = (_ipv4_text(buf, 20), (buf[26] << 8) | buf[27])
    elif transport is Transport.TCP6:
        source = (_ipv6_text(bytes(buf[16:32])), (buf[48] << 8) | buf[49])
        destination = (_ipv6_text(bytes(buf[32:48])), (buf[50] << 8) | buf[51])
    else:
        source = (_unix_path(bytes(buf[16:124])), 0)
        destination = (_unix_path(bytes(buf[124:232])), 0)
    at = _V2_FIXED + size
    tlvs: list[Tlv] = []
    while at < total:  # bounds already checked by _walk_tlvs
        end = at + _TLV_HEADER + ((buf[at + 1] << 8) | buf[at + 2])
        tlvs.append(Tlv(buf[at], bytes(buf[at + _TLV_HEADER : end])))
        at = end
    return ProxyHeader(2, Command.PROXY, transport, source, destination, tuple(tlvs), total)


def _ipv4_text(b: _Buffer, at: int) -> str:
    return f"{b[at]}.{b[at + 1]}.{b[at + 2]}.{b[at + 3]}"


def _ipv6_text(packed: bytes) -> str:
    """RFC 5952 text: lower case, no leading zeros, the first longest run of ≥ 2 zero
    groups as "::", an IPv4-mapped address as ::ffff:a.b.c.d. The same on every Python."""
    words = _unpack_words(packed)
    if words[:6] == (0, 0, 0, 0, 0, 0xFFFF):
        return "::ffff:" + _ipv4_text(packed, 12)
    best_at, best_len, run_at, run_len = -1, 1, 0, 0
    for i, word in enumerate(words):
        if word:
            run_len = 0
            continue
        if not run_len:
            run_at = i
        run_len += 1
        if run_len > best_len:
            best_at, best_len = run_at, run_len
    groups = [f"{word:x}" for word in words]
    if best_at < 0:
        return ":".join(groups)
    return ":".join(groups[:best_at]) + "::" + ":".join(groups[best_at + best_len :])


def _unix_path(raw: bytes) -> str:
    """A 108-byte AF_UNIX address: the path up to its NUL; an abstract name as "@name"."""
    name = raw.split(b"\x00", 1)[0]
    if not name and raw[1:].strip(b"\x00"):  # Linux abstract name: no terminator, padding cut
        name = b"@" + raw[1:].rstrip(b"\x00")
    if not name.translate(None, _PRINTABLE):
        return name.decode("ascii")
    return "".join(chr(c) if c in _PRINTABLE else f"\\x{c:02x}" for c in name)


# -- v1 ----------------------------------------------------------------------------------------

_V1_PROTOCOLS: Final = {b"TCP4": Transport.TCP4, b"TCP6": Transport.TCP6, b"UNKNOWN": None}
_V1_FIELDS: Final = ("source address", "destination address", "source port", "destination port")


def _v1_judge(line: bytes) -> ProxyResult | None:
    """Judge a v1 line, whole or in part, reporting the first fault in stream order.

    ``line`` holds at most ``MAX_V1_LINE`` bytes and nothing after its first LF.
    """
    sig = min(len(line), len(V1_SIGNATURE))
    if line[:sig] != V1_SIGNATURE[:sig]:
        return ProxyRejection(ProxyRejectReason.NOT_PROXY, "bytes do not match the v1 signature")
    if len(line) <= len(V1_SIGNATURE):
        return None
    ends = [i for i in (line.find(b"\r", 6), line.find(b"\n", 6)) if i >= 0]
    end = min(ends) if ends else len(line)
    ended_by_cr = end < len(line) and line[end] == _CR
    values: list[str | int] = []
    fields = line[6:end].split(b" ")
    error = _v1_fields(fields, ended_by_cr, values)
    if error is not None:
        return _malformed(f"v1 {error}")
    if end < len(line):
        if not ended_by_cr:
            return _malformed("v1 line ends with LF without CR")
        if end + 1 < len(line):  # only an LF can follow: the line holds nothing after one
            if line[end + 1] != _LF:
                return _malformed("v1 CR not followed by LF")
            return _v1_header(fields[0], values, len(line))
    if len(line) >= MAX_V1_LINE:
        return _malformed(f"v1 line has no CRLF within {MAX_V1_LINE} bytes")
    return None


def _v1_fields(fields: list[bytes], ended: bool, values: list[str | int]) -> str | None:
    """Judge the fields after the signature; the last is whole only if ``ended``.

    A whole field must be valid; the last, while it may still grow, must be the start of a
    valid one. Appends the whole fields' values (hosts normalised, ports as int).
    """
    last = len(fields) - 1
    protocol = fields[0]
    if last or ended:
        if protocol not in _V1_PROTOCOLS:
            return "protocol is not TCP4, TCP6 or UNKNOWN"
    elif not any(name.startswith(protocol) for name in _V1_PROTOCOLS):
        return "protocol is not TCP4, TCP6 or UNKNOWN"
    transport = _V1_PROTOCOLS.get(protocol)
    if transport is None:  # UNKNOWN, whose rest is ignored, or a protocol still arriving
        return None
    for i, field in enumerate(fields[1:5], start=1):
        is_address = i <= 2
        if i < last or ended:
            value = _v1_address(field, transport) if is_address else _v1_port(field)
            if value is None:
                return f"{_V1_FIELDS[i - 1]} is not valid"
            values.append(value)
        elif not (_v1_address_start(field, transport) if is_address else _v1_port_start(field)):
            return f"{_V1_FIELDS[i - 1]} is not valid"
    if last > 4:
        return "line has more than 5 fields"
    if ended and last < 4:
        return "line has fewer than 5 fields"
    return None


def _v1_header(protocol: bytes, values: list[str | int], length: int) -> ProxyHeader:
    transport = _V1_PROTOCOLS[protocol]
    if transport is None:
        return ProxyHeader(1, Command.PROXY, Transport.UNSPEC, None, None, (), length)
    src, dst, sport, dport = values
    assert isinstance(src, str) and isinstance(dst, str)
    assert isinstance(sport, int) and isinstance(dport, int)
    return ProxyHeader(1, Command.PROXY, transport, (src, sport), (dst, dport), (), length)


def _v1_address(field: bytes, transport: Transport) -> str | None:
    if transport is Transport.TCP4:
        parts = field.split(b".")
        if len(parts) == 4 and all(_decimal(p, 255) for p in parts):
            return field.decode("ascii")
        return None
    if not 2 <= len(field) <= _MAX_IPV6_TEXT or field.translate(None, _IPV6_CHARS):
        return None  # the character check also keeps out a zone ("%eth0")
    try:
        packed = ipaddress.IPv6Address(field.decode("ascii")).packed
    except ValueError:
        return None
    return _ipv6_text(packed)


def _v1_address_start(field: bytes, transport: Transport) -> bool:
    """Whether some valid address of the family starts with ``field``."""
    if transport is Transport.TCP4:
        parts = field.split(b".")
        *whole, tail = parts
        return (
            len(parts) <= 4
            and all(_decimal(p, 255) for p in whole)
            and (not tail or _decimal(tail, 255))
        )
    return len(field) <= _MAX_IPV6_TEXT and not field.translate(None, _IPV6_CHARS)


def _v1_port(field: bytes) -> int | None:
    return int(field) if _decimal(field, 0xFFFF) else None


def _v1_port_start(field: bytes) -> bool:
    return not field or _decimal(field, 0xFFFF)


def _decimal(digits: bytes, limit: int) -> bool:
    """ASCII decimal digits, no sign, no leading zero, at most ``limit``."""
    return (
        digits.isdigit()  # bytes.isdigit is ASCII-only, and false when empty
        and len(digits) <= 5
        and (digits[0] != 0x30 or len(digits) == 1)
        and int(digits) <= limit
    )


def parse_proxy_header(
    data: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> ProxyResult | None:
    """One-shot :meth:`ProxyHeaderReader.feed` on a fresh reader."""
    return ProxyHeaderReader(max_bytes).feed(data)
