"""The PROXY protocol reader against valid and broken v1/v2 headers, every split, and fuzz."""

from __future__ import annotations

import array
import ipaddress
import socket
import struct
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshgw.bench import hellos as H
from meshgw.wire.clienthello import Hello, parse_client_hello
from meshgw.wire.proxyproto import (
    DEFAULT_MAX_HEADER_BYTES,
    MAX_V1_LINE,
    MAX_V2_HEADER,
    MIN_MAX_HEADER_BYTES,
    V2_SIGNATURE,
    Command,
    ProxyHeader,
    ProxyHeaderReader,
    ProxyRejection,
    ProxyRejectReason,
    Tlv,
    TlvType,
    Transport,
    parse_proxy_header,
)
from tests.hellos import feed_in_pieces

LOCAL, PROXY = Command.LOCAL, Command.PROXY
TCP4, TCP6, UNIX, UNSPEC = Transport.TCP4, Transport.TCP6, Transport.UNIX, Transport.UNSPEC
NOT_PROXY, MALFORMED = ProxyRejectReason.NOT_PROXY, ProxyRejectReason.MALFORMED
UNSUPPORTED, TOO_LARGE = ProxyRejectReason.UNSUPPORTED, ProxyRejectReason.TOO_LARGE

HELLO = H.python_hello("consul-server-0.server.dc2.consul", ("consul/rpc-multi",))


# ---------------------------------------------------------------------------------------------
# Building headers


def v2(ver_cmd: int, family: int, block: bytes = b"", length: int | None = None) -> bytes:
    size = len(block) if length is None else length
    return V2_SIGNATURE + bytes((ver_cmd, family)) + struct.pack(">H", size) + block


def tlv(tlv_type: int, value: bytes, length: int | None = None) -> bytes:
    return bytes((tlv_type,)) + struct.pack(">H", len(value) if length is None else length) + value


def inet4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack(">HH", sport, dport)


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    pack = ipaddress.IPv6Address
    return pack(src).packed + pack(dst).packed + struct.pack(">HH", sport, dport)


def unix(src: bytes, dst: bytes) -> bytes:
    return src.ljust(108, b"\x00") + dst.ljust(108, b"\x00")


def expect(
    version: int,
    command: Command,
    transport: Transport,
    source: tuple[str, int] | None = None,
    destination: tuple[str, int] | None = None,
    tlvs: tuple[Tlv, ...] = (),
) -> ProxyHeader:
    return ProxyHeader(version, command, transport, source, destination, tlvs, length=0)


FFFF6 = ":".join(["ffff"] * 8)  # the longest IPv6 text without a dotted tail: 39 characters
IPV4_AS_HAPROXY_SENDS = inet4("172.19.0.1", "172.19.0.3", 42578, 80)
AWS_VPCE = tlv(0xEA, b"\x01vpce-08d2bf15fac5001c9")  # subtype 1 + the VPC endpoint id
SSL_TLV = tlv(
    TlvType.SSL,
    b"\x01" + b"\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3") + tlv(0x22, b"client.example"),
)
NOOP_PAD = tlv(TlvType.NOOP, bytes(DEFAULT_MAX_HEADER_BYTES - 16 - 12 - 3))  # total = the cap

VALID: list[tuple[str, bytes, ProxyHeader]] = [
    (
        "v1-spec-example",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        expect(1, PROXY, TCP4, ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    ),
    (
        "v1-tcp4-longest-56",
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        expect(1, PROXY, TCP4, ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
    ),
    (
        "v1-tcp4-zeros",
        b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
        expect(1, PROXY, TCP4, ("0.0.0.0", 0), ("0.0.0.0", 0)),
    ),
    (
        "v1-tcp6",
        b"PROXY TCP6 2001:db8::1 2001:db8::2 51234 8443\r\n",
        expect(1, PROXY, TCP6, ("2001:db8::1", 51234), ("2001:db8::2", 8443)),
    ),
    (
        "v1-tcp6-longest-104",
        f"PROXY TCP6 {FFFF6} {FFFF6} 65535 65535\r\n".encode(),
        expect(1, PROXY, TCP6, (FFFF6, 65535), (FFFF6, 65535)),
    ),
    (
        "v1-tcp6-normalised",
        b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 0:0:0:0:0:0:0:1 1 2\r\n",
        expect(1, PROXY, TCP6, ("2001:db8::1", 1), ("::1", 2)),
    ),
    (
        "v1-tcp6-mapped-ipv4",
        b"PROXY TCP6 ::ffff:192.0.2.1 ::FFFF:C000:0202 40000 443\r\n",
        expect(1, PROXY, TCP6, ("::ffff:192.0.2.1", 40000), ("::ffff:192.0.2.2", 443)),
    ),
    (
        "v1-tcp6-unspecified",
        b"PROXY TCP6 :: :: 0 0\r\n",
        expect(1, PROXY, TCP6, ("::", 0), ("::", 0)),
    ),
    ("v1-unknown-short-15", b"PROXY UNKNOWN\r\n", expect(1, PROXY, UNSPEC)),
    (
        "v1-unknown-worst-case-107",
        f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 65535\r\n".encode(),
        expect(1, PROXY, UNSPEC),
    ),
    (
        "v1-unknown-rest-ignored",
        b"PROXY UNKNOWN whatever\tthe  sender\x00says\xff\r\n",
        expect(1, PROXY, UNSPEC),
    ),
    ("v1-unknown-trailing-space", b"PROXY UNKNOWN \r\n", expect(1, PROXY, UNSPEC)),
    (
        "v2-tcp4-as-haproxy-sends",
        v2(0x21, 0x11, IPV4_AS_HAPROXY_SENDS),
        expect(2, PROXY, TCP4, ("172.19.0.1", 42578), ("172.19.0.3", 80)),
    ),
    (
        "v2-tcp4-aws-nlb-vpce-tlv",
        v2(0x21, 0x11, inet4("10.0.1.7", "10.0.2.9", 33000, 8443) + AWS_VPCE),
        expect(
            2,
            PROXY,
            TCP4,
            ("10.0.1.7", 33000),
            ("10.0.2.9", 8443),
            (Tlv(0xEA, b"\x01vpce-08d2bf15fac5001c9"),),
        ),
    ),
    (
        "v2-tcp6",
        v2(0x21, 0x21, inet6("2001:db8::1", "2001:db8::2", 51234, 8443)),
        expect(2, PROXY, TCP6, ("2001:db8::1", 51234), ("2001:db8::2", 8443)),
    ),
    (
        "v2-tcp6-mapped-ipv4",
        v2(0x21, 0x21, inet6("::ffff:10.1.2.3", "::ffff:10.1.2.4", 1, 2)),
        expect(2, PROXY, TCP6, ("::ffff:10.1.2.3", 1), ("::ffff:10.1.2.4", 2)),
    ),
    (
        "v2-tcp6-with-tlvs",
        v2(
            0x21,
            0x21,
            inet6("fe80::1", "fe80::2", 5, 6) + tlv(TlvType.ALPN, b"h2") + tlv(0xE0, b"psc"),
        ),
        expect(
            2,
            PROXY,
            TCP6,
            ("fe80::1", 5),
            ("fe80::2", 6),
            (Tlv(TlvType.ALPN, b"h2"), Tlv(0xE0, b"psc")),
        ),
    ),
    (
        "v2-tlvs-every-registered-kind",
        v2(
            0x21,
            0x11,
            inet4("192.0.2.1", "192.0.2.2", 1000, 443)
            + tlv(TlvType.ALPN, b"\x02h2")
            + tlv(TlvType.AUTHORITY, b"web.default.dc2.consul")
            + tlv(TlvType.CRC32C, b"\x12\x34\x56\x78")  # not verified: see the module doc
            + tlv(TlvType.UNIQUE_ID, bytes(range(128)))
            + SSL_TLV
            + tlv(TlvType.NETNS, b"blue")
            + tlv(TlvType.NOOP, b""),  # a zero-length TLV, last
        ),
        expect(
            2,
            PROXY,
            TCP4,
            ("192.0.2.1", 1000),
            ("192.0.2.2", 443),
            (
                Tlv(TlvType.ALPN, b"\x02h2"),
                Tlv(TlvType.AUTHORITY, b"web.default.dc2.consul"),
                Tlv(TlvType.CRC32C, b"\x12\x34\x56\x78"),
                Tlv(TlvType.UNIQUE_ID, bytes(range(128))),
                Tlv(TlvType.SSL, SSL_TLV[3:]),
                Tlv(TlvType.NETNS, b"blue"),
                Tlv(TlvType.NOOP, b""),
            ),
        ),
    ),
    (
        "v2-fills-the-default-cap",
        v2(0x21, 0x11, inet4("10.0.0.1", "10.0.0.2", 1, 2) + NOOP_PAD),
        expect(
            2,
            PROXY,
            TCP4,
            ("10.0.0.1", 1),
            ("10.0.0.2", 2),
            (Tlv(TlvType.NOOP, NOOP_PAD[3:]),),
        ),
    ),
    (
        "v2-unix",
        v2(0x21, 0x31, unix(b"/run/lb/client.sock", b"/run/meshgw.sock")),
        expect(2, PROXY, UNIX, ("/run/lb/client.sock", 0), ("/run/meshgw.sock", 0)),
    ),
    (
        "v2-unix-abstract-and-unprintable",
        v2(0x21, 0x31, unix(b"\x00lb\x00x", b"/tmp/\xff\n\\") + tlv(TlvType.NOOP, b"x")),
        expect(
            2,
            PROXY,
            UNIX,
            ("@lb\\x00x", 0),
            ("/tmp/\\xff\\x0a\\x5c", 0),
            (Tlv(TlvType.NOOP, b"x"),),
        ),
    ),
    (
        "v2-unix-108-byte-path",
        v2(0x21, 0x31, b"a" * 108 + b"b" * 108),
        expect(2, PROXY, UNIX, ("a" * 108, 0), ("b" * 108, 0)),
    ),
    (
        "v2-unix-unnamed-client",  # a client socket that was never bound: all zeros
        v2(0x21, 0x31, unix(b"", b"/run/meshgw.sock")),
        expect(2, PROXY, UNIX, ("", 0), ("/run/meshgw.sock", 0)),
    ),
    ("v2-local-health-check", v2(0x20, 0x00), expect(2, LOCAL, UNSPEC)),
    (
        "v2-local-with-addresses-ignored",
        v2(0x20, 0x11, inet4("10.0.0.1", "10.0.0.2", 1, 2)),
        expect(2, LOCAL, UNSPEC),
    ),
    (
        # LOCAL ignores the family byte and skips the block unread, even if it is no TLV list.
        "v2-local-any-family-any-block",
        v2(0x20, 0xFF, b"\x01\xff\xff\x00\x00"),
        expect(2, LOCAL, UNSPEC),
    ),
    ("v2-local-datagram-family", v2(0x20, 0x12), expect(2, LOCAL, UNSPEC)),
    ("v2-proxy-unspec", v2(0x21, 0x00), expect(2, PROXY, UNSPEC)),
    (
        "v2-proxy-unspec-block-ignored",
        v2(0x21, 0x00, b"\x01\xff\xff" + bytes(9)),
        expect(2, PROXY, UNSPEC),
    ),
]

VALID_IDS = [case[0] for case in VALID]


def _expected(header: ProxyHeader, data: bytes) -> ProxyHeader:
    return replace(header, length=len(data))


@pytest.mark.parametrize(("data", "header"), [c[1:] for c in VALID], ids=VALID_IDS)
def test_valid_header(data: bytes, header: ProxyHeader) -> None:
    assert parse_proxy_header(data) == _expected(header, data)


def test_boundary_lengths() -> None:
    by_id = {case[0]: case[1] for case in VALID}
    assert len(by_id["v1-unknown-short-15"]) == 15
    assert len(by_id["v1-tcp4-longest-56"]) == 56
    assert len(by_id["v1-tcp6-longest-104"]) == 104
    assert len(by_id["v1-unknown-worst-case-107"]) == MAX_V1_LINE == 107
    assert len(by_id["v2-fills-the-default-cap"]) == DEFAULT_MAX_HEADER_BYTES
    assert len(by_id["v2-unix"]) == MIN_MAX_HEADER_BYTES == 232


@pytest.mark.parametrize(("data", "header"), [c[1:] for c in VALID], ids=VALID_IDS)
def test_the_client_hello_after_the_header_is_untouched(data: bytes, header: ProxyHeader) -> None:
    stream = data + HELLO
    result = parse_proxy_header(stream)
    assert result == _expected(header, data)
    assert isinstance(result, ProxyHeader)
    rest = stream[result.length :]
    assert rest == HELLO
    hello = parse_client_hello(rest)
    assert isinstance(hello, Hello) and hello.length == len(HELLO)


@pytest.mark.parametrize(("data", "header"), [c[1:] for c in VALID], ids=VALID_IDS)
def test_every_one_byte_split(data: bytes, header: ProxyHeader) -> None:
    stream = data + HELLO[:40]
    reader = ProxyHeaderReader()
    answers = [reader.feed(stream[i : i + 1]) for i in range(len(stream))]
    expected = _expected(header, data)
    assert answers[: len(data) - 1] == [None] * (len(data) - 1)
    assert answers[len(data) - 1] == expected
    assert all(a is answers[len(data) - 1] for a in answers[len(data) :])  # final means final
    assert reader.buffered == len(data)


@pytest.mark.parametrize(("data", "header"), [c[1:] for c in VALID], ids=VALID_IDS)
def test_every_two_piece_split(data: bytes, header: ProxyHeader) -> None:
    stream = data + HELLO
    expected = _expected(header, data)
    for cut in range(len(data) + 2):
        reader = ProxyHeaderReader()
        first = reader.feed(stream[:cut])
        second = reader.feed(stream[cut:])
        assert second == expected, cut
        if cut >= len(data):
            assert first is second, cut
        else:
            assert first is None, cut
        assert reader.buffered == len(data)


@pytest.mark.parametrize(("data", "header"), [c[1:] for c in VALID], ids=VALID_IDS)
def test_every_prefix_needs_more(data: bytes, header: ProxyHeader) -> None:
    for cut in range(len(data)):
        assert parse_proxy_header(data[:cut]) is None, cut


def test_tlv_lookup() -> None:
    data = v2(
        0x21,
        0x11,
        inet4("10.0.0.1", "10.0.0.2", 1, 2)
        + tlv(TlvType.AUTHORITY, b"a.consul")
        + tlv(TlvType.AUTHORITY, b"b.consul")
        + tlv(TlvType.ALPN, b""),
    )
    header = parse_proxy_header(data)
    assert isinstance(header, ProxyHeader)
    assert header.tlv(TlvType.AUTHORITY) == b"a.consul"  # the first of its type
    assert header.tlv(TlvType.ALPN) == b""
    assert header.tlv(TlvType.UNIQUE_ID) is None
    assert header.tlv(0xEA) is None


def test_feed_accepts_bytearray_and_views() -> None:
    data = v2(0x21, 0x11, IPV4_AS_HAPROXY_SENDS) + HELLO
    expected = parse_proxy_header(data)
    assert isinstance(expected, ProxyHeader)
    assert parse_proxy_header(bytearray(data)) == expected
    reader = ProxyHeaderReader()
    view = memoryview(data)
    assert reader.feed(view[:10]) is None
    assert reader.feed(view[10:]) == expected
    signed = memoryview(array.array("b", data))  # items read as -128..127: flattened to bytes
    assert parse_proxy_header(signed) == expected
    words = memoryview(bytearray(data + b"\x00")).cast("H")
    assert parse_proxy_header(words) == expected
    strided = memoryview(bytes(x for byte in data for x in (byte, 0)))[::2]
    assert parse_proxy_header(strided) == expected
    line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    assert parse_proxy_header(memoryview(array.array("b", line))) == parse_proxy_header(line)


def test_result_is_final() -> None:
    reader = ProxyHeaderReader()
    header = reader.feed(b"PROXY UNKNOWN\r\n")
    assert isinstance(header, ProxyHeader)
    assert reader.feed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n") is header
    assert reader.feed(b"") is header
    assert reader.result is header
    rejecting = ProxyHeaderReader()
    no = rejecting.feed(b"\x16")
    assert isinstance(no, ProxyRejection)
    assert rejecting.feed(b"PROXY UNKNOWN\r\n") is no
    assert rejecting.result is no
    assert ProxyHeaderReader().feed(b"") is None


def test_cap() -> None:
    assert ProxyHeaderReader().max_bytes == DEFAULT_MAX_HEADER_BYTES == 4096
    with pytest.raises(ValueError):
        ProxyHeaderReader(max_bytes=MIN_MAX_HEADER_BYTES - 1)
    unix_header = v2(0x21, 0x31, unix(b"/a", b"/b"))
    assert isinstance(parse_proxy_header(unix_header, MIN_MAX_HEADER_BYTES), ProxyHeader)
    # The protocol's own ceiling, when asked for.
    biggest = v2(0x21, 0x11, inet4("1.1.1.1", "2.2.2.2", 1, 2) + tlv(0xE1, bytes(0xFFFF - 15)))
    assert len(biggest) == MAX_V2_HEADER
    header = parse_proxy_header(biggest, MAX_V2_HEADER)
    assert isinstance(header, ProxyHeader) and header.length == MAX_V2_HEADER


@pytest.mark.parametrize("cap", [MIN_MAX_HEADER_BYTES, 1000, DEFAULT_MAX_HEADER_BYTES])
def test_cap_decided_from_the_declared_length(cap: int) -> None:
    block = inet4("10.0.0.1", "10.0.0.2", 1, 2) + tlv(TlvType.NOOP, bytes(cap - 16 - 12 - 3))
    fits = v2(0x21, 0x11, block)
    assert len(fits) == cap
    assert isinstance(parse_proxy_header(fits, cap), ProxyHeader)
    over = v2(0x21, 0x11, block + b"\x00")
    reader = ProxyHeaderReader(cap)
    answers = [reader.feed(over[i : i + 1]) for i in range(16)]
    assert answers[:15] == [None] * 15
    assert answers[15] == ProxyRejection(TOO_LARGE, f"v2 header of {cap + 1} > {cap} bytes")
    assert reader.buffered == 16  # not a byte of the block read
    assert parse_proxy_header(over, cap) == answers[15]


# ---------------------------------------------------------------------------------------------
# Rejections: (id, bytes, reason or None for "needs more", bytes after which it is decided)

T4 = b"PROXY TCP4 1.2.3.4 5.6.7.8 "  # 27 bytes: everything before the ports
SIG = V2_SIGNATURE
A4 = inet4("10.0.0.1", "10.0.0.2", 1, 2)

INVALID: list[tuple[str, bytes, ProxyRejectReason | None, int]] = [
    ("empty", b"", None, 0),
    ("tls-record", b"\x16\x03\x01\x02\x00\x01", NOT_PROXY, 1),
    ("http-get", b"GET / HTTP/1.1\r\n", NOT_PROXY, 1),
    ("http-post", b"POST / HTTP/1.1\r\n", NOT_PROXY, 2),
    ("consul-rpc-byte", b"\x04", NOT_PROXY, 1),
    ("lower-case-proxy", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", NOT_PROXY, 1),
    ("v1-no-space-after-PROXY", b"PROXY\r\n", NOT_PROXY, 6),
    ("v1-tab-after-PROXY", b"PROXY\tTCP4", NOT_PROXY, 6),
    ("v1-protocol-TCP5", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", MALFORMED, 10),
    ("v1-protocol-lower-case", b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", MALFORMED, 7),
    ("v1-protocol-UDP4", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", MALFORMED, 8),
    ("v1-protocol-TCP4X", b"PROXY TCP4X 1.2.3.4 5.6.7.8 1 2\r\n", MALFORMED, 11),
    ("v1-protocol-missing", b"PROXY \r\n", MALFORMED, 7),
    ("v1-two-spaces-after-PROXY", b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", MALFORMED, 7),
    ("v1-two-spaces-before-source", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", MALFORMED, 12),
    ("v1-tab-separator", b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n", MALFORMED, 11),
    ("v1-ipv4-leading-zero", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", MALFORMED, 13),
    ("v1-ipv4-octet-256", b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n", MALFORMED, 14),
    ("v1-ipv4-sign", b"PROXY TCP4 +1.2.3.4 5.6.7.8 1 2\r\n", MALFORMED, 12),
    ("v1-ipv4-three-parts", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", MALFORMED, 17),
    ("v1-ipv4-five-parts", b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", MALFORMED, 19),
    ("v1-ipv4-empty-part", b"PROXY TCP4 1..3.4 5.6.7.8 1 2\r\n", MALFORMED, 14),
    ("v1-ipv4-non-ascii-digit", "PROXY TCP4 \u0661.2.3.4".encode(), MALFORMED, 12),
    ("v1-ipv6-in-TCP4", b"PROXY TCP4 ::1 ::1 1 2\r\n", MALFORMED, 12),
    ("v1-ipv4-in-TCP6", b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", MALFORMED, 19),
    ("v1-ipv6-zone", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", MALFORMED, 19),
    ("v1-ipv6-brackets", b"PROXY TCP6 [::1] ::1 1 2\r\n", MALFORMED, 12),
    ("v1-ipv6-two-double-colons", b"PROXY TCP6 1::2::3 ::1 1 2\r\n", MALFORMED, 19),
    ("v1-ipv6-nine-groups", b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", MALFORMED, 29),
    ("v1-ipv6-46-characters", b"PROXY TCP6 " + b"0" * 46, MALFORMED, 57),
    ("v1-ipv6-bad-destination", b"PROXY TCP6 ::1 ::g 1 2\r\n", MALFORMED, 18),
    ("v1-port-65536", T4 + b"65536 80\r\n", MALFORMED, 32),
    ("v1-port-leading-zero", T4 + b"080 80\r\n", MALFORMED, 29),
    ("v1-port-plus", T4 + b"+80 80\r\n", MALFORMED, 28),
    ("v1-port-minus", T4 + b"-1 80\r\n", MALFORMED, 28),
    ("v1-port-six-digits", T4 + b"100000 80\r\n", MALFORMED, 33),
    ("v1-destination-port-65536", T4 + b"80 65536\r\n", MALFORMED, 35),
    ("v1-destination-port-empty", T4 + b"80 \r\n", MALFORMED, 31),
    ("v1-fields-missing", T4 + b"80\r\n", MALFORMED, 30),
    ("v1-addresses-only", b"PROXY TCP4 1.2.3.4 5.6.7.8\r\n", MALFORMED, 27),
    ("v1-field-extra", T4 + b"80 443 x\r\n", MALFORMED, 34),
    ("v1-trailing-space", T4 + b"80 443 \r\n", MALFORMED, 34),
    ("v1-lf-without-cr", T4 + b"80 443\n", MALFORMED, 34),
    ("v1-cr-then-data", T4 + b"80 443\rGET / HTTP/1.1\r\n", MALFORMED, 35),
    ("v1-cr-cr-lf", T4 + b"80 443\r\r\n", MALFORMED, 35),
    ("v1-nul-in-address", b"PROXY TCP4 1.2.3.4\x00 5.6.7.8 1 2\r\n", MALFORMED, 19),
    ("v1-unknown-lf-only", b"PROXY UNKNOWN\n", MALFORMED, 14),
    ("v1-unknown-glued", b"PROXY UNKNOWNX\r\n", MALFORMED, 14),
    ("v1-unknown-lone-cr", b"PROXY UNKNOWN a\rb\r\n", MALFORMED, 17),
    ("v1-no-crlf-in-107", b"PROXY UNKNOWN " + b"a" * 200, MALFORMED, 107),
    ("v1-crlf-at-108", b"PROXY UNKNOWN " + b"a" * 92 + b"\r\n", MALFORMED, 107),
    (
        # Two 45-character IPv6 texts are valid addresses but no longer fit in 107 bytes.
        "v1-tcp6-dotted-tails-too-long",
        b"PROXY TCP6 " + b"0000:0000:0000:0000:0000:ffff:255.255.255.255 " * 2 + b"65535 65535\r\n",
        MALFORMED,
        107,
    ),
    ("v1-partial", T4 + b"80 443\r", None, 0),
    ("v1-just-P", b"P", None, 0),
    ("v1-unknown-partial", b"PROXY UNKNOWN anything", None, 0),
    ("v2-sig-byte-5", SIG[:4] + b"\x01" + SIG[5:] + b"\x21\x11", NOT_PROXY, 5),
    ("v2-sig-byte-12", SIG[:11] + b"\x0b\x21\x11", NOT_PROXY, 12),
    ("v2-crlf-crlf-http", b"\r\n\r\nGET / HTTP/1.1\r\n", NOT_PROXY, 5),
    ("v2-version-0", SIG + b"\x01\x11\x00\x0c" + A4, UNSUPPORTED, 13),
    ("v2-version-1", SIG + b"\x11\x11\x00\x0c" + A4, UNSUPPORTED, 13),
    ("v2-version-3", SIG + b"\x31\x11\x00\x0c" + A4, UNSUPPORTED, 13),
    ("v2-command-2", SIG + b"\x22\x11\x00\x0c" + A4, MALFORMED, 13),
    ("v2-command-15", SIG + b"\x2f\x11\x00\x0c" + A4, MALFORMED, 13),
    ("v2-udp4", v2(0x21, 0x12, A4), UNSUPPORTED, 14),
    ("v2-udp6", v2(0x21, 0x22, bytes(36)), UNSUPPORTED, 14),
    ("v2-unix-datagram", v2(0x21, 0x32, bytes(216)), UNSUPPORTED, 14),
    ("v2-family-4", v2(0x21, 0x41, A4), MALFORMED, 14),
    ("v2-inet-transport-3", v2(0x21, 0x13, A4), MALFORMED, 14),
    ("v2-inet-transport-unspec", v2(0x21, 0x10, A4), MALFORMED, 14),
    ("v2-unspec-family-stream", v2(0x21, 0x01, A4), MALFORMED, 14),
    ("v2-family-ff", v2(0x21, 0xFF), MALFORMED, 14),
    ("v2-tcp4-block-0", v2(0x21, 0x11), MALFORMED, 16),
    ("v2-tcp4-block-11", v2(0x21, 0x11, A4[:11]), MALFORMED, 16),
    ("v2-tcp6-block-35", v2(0x21, 0x21, bytes(35)), MALFORMED, 16),
    ("v2-unix-block-215", v2(0x21, 0x31, bytes(215)), MALFORMED, 16),
    ("v2-over-default-cap", v2(0x21, 0x11, A4, length=4096 - 16 + 1), TOO_LARGE, 16),
    ("v2-largest-length", v2(0x21, 0x11, A4, length=0xFFFF), TOO_LARGE, 16),
    ("v2-local-over-cap", v2(0x20, 0x00, length=0xFFFF), TOO_LARGE, 16),
    ("v2-one-stray-byte", v2(0x21, 0x11, A4 + b"\x01"), MALFORMED, 16),
    ("v2-two-stray-bytes", v2(0x21, 0x11, A4 + b"\x01\x00"), MALFORMED, 16),
    ("v2-tlv-overruns", v2(0x21, 0x11, A4 + tlv(1, b"h2", length=3)), MALFORMED, 31),
    ("v2-tlv-length-ffff", v2(0x21, 0x11, A4 + tlv(2, b"x", length=0xFFFF)), MALFORMED, 31),
    (
        "v2-second-tlv-overruns",
        v2(0x21, 0x11, A4 + tlv(1, b"h2") + tlv(2, b"abc", length=4)),
        MALFORMED,
        36,
    ),
    ("v2-stray-after-tlv", v2(0x21, 0x11, A4 + tlv(1, b"h2") + b"\x04\x00"), MALFORMED, 31),
    ("v2-tcp6-tlv-overruns", v2(0x21, 0x21, bytes(36) + tlv(4, b"", length=1)), MALFORMED, 55),
    ("v2-signature-only", SIG, None, 0),
    ("v2-fixed-part-only", SIG + b"\x21\x11\x00\x0c", None, 0),
    ("v2-tlv-value-pending", v2(0x21, 0x11, A4 + tlv(2, b"web.consul"))[:-3], None, 0),
    ("v2-local-block-pending", v2(0x20, 0x00, length=100) + bytes(99), None, 0),
]


@pytest.mark.parametrize(
    ("data", "reason", "decided_at"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_rejection(data: bytes, reason: ProxyRejectReason | None, decided_at: int) -> None:
    result = parse_proxy_header(data)
    if reason is None:
        assert result is None
        return
    assert isinstance(result, ProxyRejection), result
    assert result.reason is reason
    assert 0 < len(result.detail) < 100 and result.detail.isascii()
    assert result.detail.isprintable()
    # Byte by byte: the same answer, on exactly the byte that first makes it certain.
    reader = ProxyHeaderReader()
    answers = [reader.feed(data[i : i + 1]) for i in range(len(data))]
    assert answers[: decided_at - 1] == [None] * (decided_at - 1)
    assert answers[decided_at - 1] == result
    assert reader.buffered == decided_at
    # And the same with more bytes behind it.
    assert parse_proxy_header(data + HELLO) == result


def test_first_byte_decides_whether_a_header_can_follow() -> None:
    # Only "P" (v1) and "\r" (v2) can start a header; the answer for any other byte is
    # immediate, so a caller never waits on a client that sent no header.
    for byte in range(256):
        result = parse_proxy_header(bytes((byte,)))
        if byte in (0x50, 0x0D):
            assert result is None
        else:
            assert isinstance(result, ProxyRejection) and result.reason is NOT_PROXY, byte


# ---------------------------------------------------------------------------------------------
# Addresses: v1 and v2 give one string per address, RFC 5952 for IPv6.


@settings(max_examples=300, deadline=None)
@given(
    packed=st.one_of(
        st.binary(min_size=16, max_size=16),
        st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF, 0xDB8]), min_size=8, max_size=8).map(
            lambda words: struct.pack(">8H", *words)
        ),
        st.binary(min_size=4, max_size=4).map(lambda v4: bytes(10) + b"\xff\xff" + v4),
    ),
    port=st.integers(0, 65535),
)
def test_ipv6_text_is_rfc5952_and_the_same_in_v1_and_v2(packed: bytes, port: int) -> None:
    address = ipaddress.IPv6Address(packed)
    if address.ipv4_mapped is not None:
        text = f"::ffff:{address.ipv4_mapped}"
    else:
        text = address.compressed  # lower case, first longest zero run of ≥ 2 as "::"
        if packed[:12] != bytes(12):  # glibc writes ::/96 with a dotted tail
            assert text == socket.inet_ntop(socket.AF_INET6, packed)
    from_v2 = parse_proxy_header(v2(0x21, 0x21, packed + bytes(16) + struct.pack(">HH", port, 0)))
    assert isinstance(from_v2, ProxyHeader)
    assert from_v2.source == (text, port)
    for written in (address.exploded, address.compressed.upper(), text):
        line = f"PROXY TCP6 {written} ::1 {port} 0\r\n".encode()
        from_v1 = parse_proxy_header(line)
        assert isinstance(from_v1, ProxyHeader), line
        assert from_v1.source == (text, port)


@settings(max_examples=300, deadline=None)
@given(packed=st.binary(min_size=4, max_size=4), port=st.integers(0, 65535))
def test_ipv4_text_is_the_same_in_v1_and_v2(packed: bytes, port: int) -> None:
    text = socket.inet_ntoa(packed)
    from_v2 = parse_proxy_header(v2(0x21, 0x11, packed + bytes(4) + struct.pack(">HH", port, 1)))
    from_v1 = parse_proxy_header(f"PROXY TCP4 {text} 0.0.0.0 {port} 1\r\n".encode())
    assert isinstance(from_v1, ProxyHeader) and isinstance(from_v2, ProxyHeader)
    assert from_v1.source == from_v2.source == (text, port)
    assert from_v1.destination == from_v2.destination == ("0.0.0.0", 1)


# ---------------------------------------------------------------------------------------------
# Fuzz: never raises, never over the cap, the same answer for every split.

_POOL = [case[1] for case in VALID if len(case[1]) < 600]


def _check(data: bytes, cuts: list[int], max_bytes: int) -> None:
    one_shot = parse_proxy_header(data, max_bytes)
    reader = ProxyHeaderReader(max_bytes)
    result = None
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if cut < start:
            continue
        answer = reader.feed(data[start:cut])
        start = cut
        assert answer is None or isinstance(answer, ProxyHeader | ProxyRejection)
        assert reader.buffered <= max_bytes
        assert len(reader._buf) <= max_bytes
        if result is not None:
            assert answer is result  # final means final
        result = answer
    assert result == one_shot
    if isinstance(result, ProxyHeader):
        assert 0 < result.length <= min(len(data), max_bytes)
        assert parse_proxy_header(data[: result.length], max_bytes) == result
        assert parse_proxy_header(data[: result.length - 1], max_bytes) is None
    elif isinstance(result, ProxyRejection):
        assert isinstance(result.reason, ProxyRejectReason)
        assert 0 < len(result.detail) < 100 and result.detail.isascii()
        assert result.detail.isprintable()
    else:
        assert reader.buffered == len(data)  # nothing decided: everything was taken


FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CAPS = st.sampled_from([MIN_MAX_HEADER_BYTES, 300, DEFAULT_MAX_HEADER_BYTES])


@FUZZ
@given(
    head=st.sampled_from([b"", b"P", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", SIG, SIG + b"!"]),
    data=st.binary(max_size=300),
    cuts=st.lists(st.integers(0, 320), max_size=8),
    max_bytes=CAPS,
)
def test_fuzz_random_bytes(head: bytes, data: bytes, cuts: list[int], max_bytes: int) -> None:
    _check(head + data, cuts, max_bytes)


V1_ALPHABET = b"PROXYTCP46UNKOW0123456789abcdefABCDEF.: \r\n"


@FUZZ
@given(
    body=st.lists(st.sampled_from(list(V1_ALPHABET)), max_size=120).map(bytes),
    cuts=st.lists(st.integers(0, 130), max_size=8),
)
def test_fuzz_v1_alphabet(body: bytes, cuts: list[int]) -> None:
    # Lines of plausible characters reach deep into the grammar, where random bytes don't.
    _check(b"PROXY " + body, cuts, DEFAULT_MAX_HEADER_BYTES)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_POOL)) + draw(st.sampled_from([b"", HELLO[:20]])))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 4))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


@FUZZ
@given(data=_mutated(), cuts=st.lists(st.integers(0, 700), max_size=8), max_bytes=CAPS)
def test_fuzz_mutated_valid_headers(data: bytes, cuts: list[int], max_bytes: int) -> None:
    _check(data, cuts, max_bytes)


@FUZZ
@given(
    ver_cmd=st.sampled_from([0x20, 0x21, 0x21, 0x11, 0x22]),
    family=st.sampled_from([0x00, 0x11, 0x21, 0x31, 0x12, 0x41]),
    length=st.integers(0, 400),
    block=st.binary(max_size=400),
    cuts=st.lists(st.integers(0, 420), max_size=8),
    max_bytes=CAPS,
)
def test_fuzz_plausible_v2(
    ver_cmd: int, family: int, length: int, block: bytes, cuts: list[int], max_bytes: int
) -> None:
    _check(v2(ver_cmd, family, block, length=length), cuts, max_bytes)


@settings(max_examples=200, deadline=None)
@given(
    tlvs=st.lists(
        st.tuples(st.integers(0, 255), st.binary(max_size=40)).map(lambda t: tlv(t[0], t[1])),
        max_size=8,
    ),
    cuts=st.lists(st.integers(0, 400), max_size=10),
)
def test_fuzz_well_formed_tlvs_always_read(tlvs: list[bytes], cuts: list[int]) -> None:
    data = v2(0x21, 0x11, A4 + b"".join(tlvs))
    reader = ProxyHeaderReader()
    header = feed_in_pieces(reader, data + HELLO, cuts)  # type: ignore[arg-type]
    assert isinstance(header, ProxyHeader) and header.length == len(data)
    assert [bytes((t.type,)) + struct.pack(">H", len(t.value)) + t.value for t in header.tlvs] == (
        tlvs
    )
