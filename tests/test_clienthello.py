"""The ClientHello reader against real hellos, re-framed hellos, broken hellos and fuzz."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshgw.bench import hellos as H
from meshgw.wire.clienthello import (
    DEFAULT_MAX_HELLO_BYTES,
    MAX_RECORD_PAYLOAD,
    ClientHelloReader,
    Hello,
    Rejection,
    RejectReason,
    parse_client_hello,
)

try:  # tests/ as a package, or tests/ on sys.path (pytest's rootdir-less "prepend" mode)
    from tests import hellos as T
except ImportError:  # pragma: no cover - depends on how pytest was started
    import hellos as T  # type: ignore[no-redef]

TD = T.TRUST_DOMAIN
TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3
CCS = H.record(0x14, b"\x01", b"\x03\x03")  # a pipelined ChangeCipherSpec (middlebox compat)

needs_openssl = pytest.mark.skipif(not T.have_openssl(), reason="openssl CLI not installed")


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], bytes]
    sni: str
    alpn: tuple[str, ...] = ()
    supported_versions: tuple[int, ...] = (0x0304, 0x0303)
    has_ech: bool = False
    legacy_version: int = 0x0303
    openssl: bool = False


def _fake_ech(hello: bytes) -> bytes:
    # ECHClientHello, outer: type 0, HPKE suite, config id, 32-byte enc, 208-byte payload.
    payload = bytes(208)
    ech = b"\x00" + b"\x00\x01\x00\x01" + b"\x2a" + H.u16(32) + bytes(32)
    ech += H.u16(len(payload)) + payload
    return H.with_extension(hello, H.EXT_ECH, ech)


def _grease_alpn(hello: bytes) -> bytes:
    return H.with_extension(hello, H.EXT_ALPN, H.alpn_ext(b"\x0a\x0a", b"h2", b"caf\xc3\xa9"))


SERVER0 = "consul-server-0.server.dc2.consul"
WEB = f"web.default.dc2.internal.{TD}"

CASES = [
    Case(
        "py-default-rpc-multi",
        lambda: H.python_hello(SERVER0, ("consul/rpc-multi",)),
        SERVER0,
        ("consul/rpc-multi",),
    ),
    Case(
        "py-tls12-only",
        lambda: H.python_hello("server.dc1.consul", maximum_version=TLS12),
        "server.dc1.consul",
        supported_versions=(),
    ),
    Case(
        "py-tls13-only-h2",
        lambda: H.python_hello(WEB, ("h2", "http/1.1"), minimum_version=TLS13),
        WEB,
        ("h2", "http/1.1"),
        supported_versions=(0x0304,),
    ),
    Case(
        "py-mixed-case-trailing-dot",
        lambda: H.python_hello("Consul-Server-0.Server.DC2.consul."),
        SERVER0,
    ),
    Case(
        "py-partition-name",
        lambda: H.python_hello(f"api.team-a.finance.dc3.internal-v1.{TD}", ("consul/rpc-grpc",)),
        f"api.team-a.finance.dc3.internal-v1.{TD}",
        ("consul/rpc-grpc",),
    ),
    Case(
        "openssl-default-gossip",
        lambda: T.openssl_hello("server.dc1.consul", ("consul/wan-gossip/packet",)),
        "server.dc1.consul",
        ("consul/wan-gossip/packet",),
        supported_versions=(0x0304, 0x0303, 0x0302, 0x0301),
        openssl=True,
    ),
    Case(
        "openssl-tls12",
        lambda: T.openssl_hello(
            "consul-server-1.server.dc1.consul", ("consul/raft",), ("-tls1_2",)
        ),
        "consul-server-1.server.dc1.consul",
        ("consul/raft",),
        supported_versions=(),
        openssl=True,
    ),
    Case(
        "openssl-tls13-p521",
        lambda: T.openssl_hello(
            f"dc2.internal.{TD}", ("h2", "http/1.1"), ("-tls1_3", "-groups", "P-521:X25519")
        ),
        f"dc2.internal.{TD}",
        ("h2", "http/1.1"),
        supported_versions=(0x0304,),
        openssl=True,
    ),
    Case(
        "mlkem-1.6k",
        lambda: H.with_mlkem_key_share(H.python_hello(SERVER0, ("consul/rpc-multi",))),
        SERVER0,
        ("consul/rpc-multi",),
    ),
    Case(
        "mlkem-padded-1.7k",
        lambda: H.padded_to(
            H.with_mlkem_key_share(H.python_hello(SERVER0, ("consul/rpc-multi",))), 1700
        ),
        SERVER0,
        ("consul/rpc-multi",),
    ),
    Case(
        "mlkem-ech-1.8k",  # Chrome-like: hybrid key share plus an ECH (GREASE-style) extension
        lambda: _fake_ech(H.with_mlkem_key_share(H.python_hello(WEB, ("h2", "http/1.1")))),
        WEB,
        ("h2", "http/1.1"),
        has_ech=True,
    ),
    Case(
        "openssl-padded-2.5k",
        lambda: H.padded_to(T.openssl_hello("server.dc1.consul", ("consul/rpc-multi",)), 2500),
        "server.dc1.consul",
        ("consul/rpc-multi",),
        supported_versions=(0x0304, 0x0303, 0x0302, 0x0301),
        openssl=True,
    ),
    Case(
        "grease-alpn-skipped",
        lambda: _grease_alpn(H.python_hello(SERVER0)),
        SERVER0,
        ("h2",),
    ),
]


def _params(cases: list[Case]) -> list[object]:
    return [
        pytest.param(c, id=c.id, marks=needs_openssl) if c.openssl else pytest.param(c, id=c.id)
        for c in cases
    ]


def _expected(case: Case, length: int) -> Hello:
    return Hello(
        sni=case.sni,
        alpn=case.alpn,
        legacy_version=case.legacy_version,
        supported_versions=case.supported_versions,
        has_ech=case.has_ech,
        length=length,
    )


# ---------------------------------------------------------------------------------------------
# Real hellos


@pytest.mark.parametrize("case", _params(CASES))
def test_real_hello(case: Case) -> None:
    data = case.make()
    assert parse_client_hello(data) == _expected(case, len(data))


def test_sizes_of_post_quantum_stand_ins() -> None:
    by_id = {c.id: c for c in CASES}
    assert 1500 < len(by_id["mlkem-1.6k"].make()) < 1700
    assert len(by_id["mlkem-padded-1.7k"].make()) == 1700
    assert 1700 < len(by_id["mlkem-ech-1.8k"].make()) < 1900
    assert len(H.padded_to(H.python_hello(WEB), 2500)) == 2500


SPLITS = {
    "2-records": [300],
    "3-records": [100, 150],
    "5-byte-records": [5],
    "1-byte-records": [1],
    "uneven": [1, 2, 3, 4, 200, 7],
}


@pytest.mark.parametrize("sizes", list(SPLITS.values()), ids=list(SPLITS))
@pytest.mark.parametrize("case", _params(CASES))
def test_reframed_hello(case: Case, sizes: list[int]) -> None:
    data = H.reframe(case.make(), sizes)
    expected = _expected(case, len(data))
    assert parse_client_hello(data) == expected
    # And with pipelined bytes behind it, in the same feed.
    assert parse_client_hello(data + CCS) == expected


@pytest.mark.parametrize("sizes", [[16384], [300], [1]], ids=["1-record", "2-records", "tiny"])
@pytest.mark.parametrize("case", _params(CASES))
def test_byte_by_byte(case: Case, sizes: list[int]) -> None:
    data = H.reframe(case.make(), sizes) + CCS
    reader = ClientHelloReader()
    answers = [reader.feed(data[i : i + 1]) for i in range(len(data))]
    length = len(data) - len(CCS)
    expected = _expected(case, length)
    assert answers[: length - 1] == [None] * (length - 1)
    assert answers[length - 1] == expected
    assert all(a is answers[length - 1] for a in answers[length:])  # final means final
    assert reader.buffered == length


def test_feed_accepts_bytearray_and_memoryview() -> None:
    data = H.python_hello(SERVER0)
    assert isinstance(parse_client_hello(bytearray(data)), Hello)
    reader = ClientHelloReader()
    view = memoryview(data)
    assert reader.feed(view[:100]) is None
    assert isinstance(reader.feed(view[100:]), Hello)
    words = memoryview(bytearray(data + b"\x00")).cast("H")  # not a byte view: cast back
    assert isinstance(ClientHelloReader().feed(words), Hello)
    interleaved = bytes(x for byte in data for x in (byte, 0))
    strided = memoryview(interleaved)[::2]  # not contiguous
    assert ClientHelloReader().feed(strided) == parse_client_hello(data)


@pytest.mark.parametrize(
    "case", _params([c for c in CASES if c.id in ("py-default-rpc-multi", "openssl-padded-2.5k")])
)
def test_every_prefix_needs_more(case: Case) -> None:
    for data in (case.make(), H.reframe(case.make(), [3, 200])):
        for cut in range(len(data)):
            assert parse_client_hello(data[:cut]) is None, cut


def test_result_is_final() -> None:
    data = H.python_hello(SERVER0)
    reader = ClientHelloReader()
    hello = reader.feed(data)
    assert isinstance(hello, Hello)
    assert reader.feed(b"GET / HTTP/1.1\r\n") is hello
    assert reader.feed(b"") is hello
    assert reader.result is hello
    rejecting = ClientHelloReader()
    no = rejecting.feed(b"G")
    assert isinstance(no, Rejection) and no.reason is RejectReason.NOT_TLS
    assert rejecting.feed(data) is no


# ---------------------------------------------------------------------------------------------
# Rejections

BASE = H.python_hello(SERVER0, ("consul/rpc-multi",))


def _body_with(**changes: object) -> bytes:
    return H.rebuild(BASE, **changes)


def _prefix_with(sid: bytes | None = None, suites: bytes | None = None, comp: bytes | None = None):
    parts = H.decode(BASE)
    p = parts.prefix
    sid_len = p[34]
    cur_sid = p[35 : 35 + sid_len]
    pos = 35 + sid_len
    suites_len = int.from_bytes(p[pos : pos + 2], "big")
    cur_suites = p[pos + 2 : pos + 2 + suites_len]
    cur_comp = p[pos + 2 + suites_len + 1 :]
    sid = cur_sid if sid is None else sid
    suites = cur_suites if suites is None else suites
    comp = cur_comp if comp is None else comp
    prefix = p[:34] + H.u8(len(sid)) + sid + H.u16(len(suites)) + suites + H.u8(len(comp)) + comp
    return H.encode(replace(parts, prefix=prefix))


def _hs_len_off_by(delta: int) -> bytes:
    # The handshake length claims more (or fewer) bytes than the body; record matches.
    _, payload = H.handshake_payload(BASE)
    hs_len = int.from_bytes(payload[1:4], "big") + delta
    message = b"\x01" + H.u24(hs_len) + payload[4 : 4 + hs_len]
    return H.record(0x16, message)


def _ext_raw(block: bytes) -> bytes:
    """BASE with its extensions block replaced by raw bytes (lengths as given)."""
    parts = H.decode(BASE)
    body = parts.prefix + block
    return H.record(0x16, b"\x01" + H.u24(len(body)) + body)


def _ext(ext_type: int, data: bytes) -> bytes:
    return H.u16(ext_type) + H.u16(len(data)) + data


SNI_EXT = _ext(0, H.server_name_ext((0, SERVER0.encode())))

NOT_TLS, SSLV2, NOT_CH = RejectReason.NOT_TLS, RejectReason.SSLV2, RejectReason.NOT_CLIENT_HELLO
MALFORMED, TOO_LARGE = RejectReason.MALFORMED, RejectReason.TOO_LARGE
INVALID, NO_SNI = RejectReason.INVALID_SERVER_NAME, RejectReason.NO_SNI

REJECTIONS: list[tuple[str, Callable[[], bytes], RejectReason | None]] = [
    ("empty", lambda: b"", None),
    ("http-get", lambda: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", NOT_TLS),
    ("ssh-banner", lambda: b"SSH-2.0-OpenSSH_9.6\r\n", NOT_TLS),
    ("consul-rpc-byte", lambda: b"\x04", NOT_TLS),  # RPCMultiplexV2 without TLS
    ("sslv2-hello", H.sslv2_hello, SSLV2),
    ("sslv2-first-two-bytes", lambda: H.sslv2_hello()[:2], None),
    ("high-bit-not-hello", lambda: b"\x80\x2e\x02\x00", NOT_TLS),
    ("record-version-2", lambda: b"\x16\x02\x00\x00\x05", NOT_TLS),
    ("application-data", lambda: H.record(0x17, b"xx"), NOT_TLS),
    ("server-hello", lambda: H.record(0x16, b"\x02\x00\x00\x26" + bytes(38)), NOT_CH),
    ("server-hello-type-byte", lambda: b"\x16\x03\x03\x00\x2a\x02", NOT_CH),
    ("zero-length-record", lambda: b"\x16\x03\x01\x00\x00", MALFORMED),
    ("record-over-2^14", lambda: b"\x16\x03\x01" + H.u16(MAX_RECORD_PAYLOAD + 1), MALFORMED),
    (
        "alert-inside-hello",
        lambda: H.reframe(BASE, [100])[:105] + H.record(0x15, b"\x02\x28"),
        MALFORMED,
    ),
    (
        "record-version-mismatch-inside-hello",
        lambda: H.reframe(BASE, [100])[:105] + b"\x16\x02\x00\x00\x01",
        MALFORMED,
    ),
    (
        "record-longer-than-hello",
        lambda: H.record(0x16, H.handshake_payload(BASE)[1] + CCS),
        MALFORMED,
    ),
    ("hs-len-one-short", lambda: _hs_len_off_by(-1), MALFORMED),
    ("hs-len-beyond-record", lambda: _hs_len_off_by(+1), None),  # waits for another record
    ("body-too-short", lambda: H.record(0x16, b"\x01\x00\x00\x04\x03\x03\x00\x00"), MALFORMED),
    (
        "legacy-version-2.0",
        lambda: _body_with(prefix=b"\x02\x00" + H.decode(BASE).prefix[2:]),
        MALFORMED,
    ),
    ("session-id-33", lambda: _prefix_with(sid=bytes(33)), MALFORMED),
    ("cipher-suites-odd", lambda: _prefix_with(suites=b"\x13\x01\x13"), MALFORMED),
    ("cipher-suites-empty", lambda: _prefix_with(suites=b""), MALFORMED),
    ("compression-empty", lambda: _prefix_with(comp=b""), MALFORMED),
    ("extensions-len-short", lambda: _ext_raw(H.u16(len(SNI_EXT) - 1) + SNI_EXT), MALFORMED),
    ("extensions-len-long", lambda: _ext_raw(H.u16(len(SNI_EXT) + 1) + SNI_EXT), MALFORMED),
    ("extension-overrun", lambda: _ext_raw(H.u16(5) + b"\x00\x0a\x00\x09\x00"), MALFORMED),
    ("extension-header-cut", lambda: _ext_raw(H.u16(3) + b"\x00\x0a\x00"), MALFORMED),
    ("extensions-len-cut", lambda: _ext_raw(b"\x00"), MALFORMED),
    ("trailing-after-extensions", lambda: _body_with(trailer=b"\x00"), MALFORMED),
    (
        "duplicate-extension",
        lambda: _ext_raw(H.u16(2 * len(SNI_EXT)) + SNI_EXT + SNI_EXT),
        MALFORMED,
    ),
    ("sni-list-empty", lambda: H.with_extension(BASE, 0, H.u16(0)), MALFORMED),
    ("sni-ext-empty", lambda: H.with_extension(BASE, 0, b""), MALFORMED),
    (
        "sni-list-len-wrong",
        lambda: H.with_extension(BASE, 0, H.u16(99) + b"\x00\x00\x01a"),
        MALFORMED,
    ),
    (
        "sni-entry-overrun",
        lambda: H.with_extension(BASE, 0, H.u16(4) + b"\x00\x00\x09a"),
        MALFORMED,
    ),
    ("sni-entry-cut", lambda: H.with_extension(BASE, 0, H.u16(2) + b"\x00\x00"), MALFORMED),
    (
        "sni-two-host-names",
        lambda: H.with_extension(BASE, 0, H.server_name_ext((0, b"a.consul"), (0, b"b.consul"))),
        MALFORMED,
    ),
    ("alpn-list-empty", lambda: H.with_extension(BASE, 16, H.u16(0)), MALFORMED),
    ("alpn-empty-name", lambda: H.with_extension(BASE, 16, H.alpn_ext(b"h2", b"")), MALFORMED),
    ("alpn-name-overrun", lambda: H.with_extension(BASE, 16, H.u16(3) + b"\x05h2"), MALFORMED),
    ("supported-versions-odd", lambda: H.with_extension(BASE, 43, b"\x03\x03\x04\x03"), MALFORMED),
    ("supported-versions-empty", lambda: H.with_extension(BASE, 43, b""), MALFORMED),
    ("supported-versions-zero", lambda: H.with_extension(BASE, 43, b"\x00"), MALFORMED),
    ("no-sni-python", lambda: H.python_hello(None), NO_SNI),
    ("no-sni-tls12", lambda: H.python_hello(None, maximum_version=TLS12), NO_SNI),
    (
        "sni-only-other-type",
        lambda: H.with_extension(BASE, 0, H.server_name_ext((1, b"x"))),
        NO_SNI,
    ),
    ("no-extensions-block", lambda: _body_with(extensions=None), NO_SNI),
    ("empty-extensions-block", lambda: _body_with(extensions=()), NO_SNI),
]


@pytest.mark.parametrize(
    ("make", "reason"), [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS]
)
def test_rejection(make: Callable[[], bytes], reason: RejectReason | None) -> None:
    data = make()
    result = parse_client_hello(data)
    if reason is None:
        assert result is None
        return
    assert isinstance(result, Rejection), result
    assert result.reason is reason
    assert 0 < len(result.detail) < 200
    # The same answer byte by byte, reached no later than the last byte.
    reader = ClientHelloReader()
    answers = [reader.feed(data[i : i + 1]) for i in range(len(data))]
    assert answers[-1] == result


@pytest.mark.parametrize(
    ("data", "after"),
    [
        (b"GET / HTTP/1.1\r\n", 1),
        (b"\x16\x02", 2),
        (H.sslv2_hello(), 3),
        (b"\x16\x03\x01\x02\x00\x02", 6),  # ServerHello type, 6th byte
        (b"\x16\x03\x01\x00\x00", 5),
    ],
)
def test_rejected_as_early_as_possible(data: bytes, after: int) -> None:
    reader = ClientHelloReader()
    answers = [reader.feed(data[i : i + 1]) for i in range(after)]
    assert answers[:-1] == [None] * (after - 1)
    assert isinstance(answers[-1], Rejection)


INVALID_NAMES = [
    b"10.0.0.1",
    b"10.0.0.1.",
    b"127.1",
    b"8",
    b"[::1]",
    b"::1",
    b"fe80::1%eth0",
    b"a..b",
    b".a.b",
    b"..",
    b".",
    b"",
    b"x" * 64 + b".consul",
    (b"a" * 60 + b".") * 5,  # 305 characters of valid labels
    b"a" * 254,
    "caf\u00e9.consul".encode(),
    "\u212a.consul".encode(),  # KELVIN SIGN lower-cases to ASCII "k": still not ASCII
    b"caf\xe9.consul",
    b"foo bar.consul",
    b"foo\x00.consul",
    b"*.server.dc1.consul",
    b"web/1.consul",
    b"a.b..",
]


@pytest.mark.parametrize("name", INVALID_NAMES, ids=[repr(n[:24]) for n in INVALID_NAMES])
def test_invalid_server_name(name: bytes) -> None:
    result = parse_client_hello(H.with_server_name(BASE, name))
    assert isinstance(result, Rejection)
    assert result.reason is RejectReason.INVALID_SERVER_NAME
    assert len(result.detail) < 120  # bounded even for a 300-byte name


@pytest.mark.parametrize(
    ("name", "sni"),
    [
        (b"a" * 63 + b".consul", "a" * 63 + ".consul"),
        ((b"a" * 62 + b".") * 4 + b"b", ("a" * 62 + ".") * 4 + "b"),  # 253 characters
        ((b"a" * 62 + b".") * 4 + b"b.", ("a" * 62 + ".") * 4 + "b"),  # 253 + trailing dot
        (b"WEB.Default.DC2.consul", "web.default.dc2.consul"),
        (b"node_1.server.dc_2.consul", "node_1.server.dc_2.consul"),
        (b"localhost", "localhost"),
        (b"1.2.3.consul", "1.2.3.consul"),
        (b"xn--caf-dma.consul", "xn--caf-dma.consul"),
    ],
)
def test_valid_server_name_edge(name: bytes, sni: str) -> None:
    result = parse_client_hello(H.with_server_name(BASE, name))
    assert isinstance(result, Hello), result
    assert result.sni == sni


def test_too_large_decided_from_declared_lengths() -> None:
    big = H.padded_to(BASE, 2500)
    assert isinstance(parse_client_hello(big, max_bytes=2500), Hello)
    assert parse_client_hello(big, max_bytes=2499) == Rejection(
        TOO_LARGE, "ClientHello needs at least 2500 > 2499 bytes"
    )
    # The record header alone tells: 5 bytes in, no payload read.
    reader = ClientHelloReader(max_bytes=1024)
    result = reader.feed(big[:5])
    assert isinstance(result, Rejection) and result.reason is TOO_LARGE
    assert reader.buffered == 5
    # A handshake length of 16 MiB in a small first record: known after 9 bytes.
    huge = b"\x16\x03\x01\x00\x10\x01\xff\xff\xff"
    result = parse_client_hello(huge)
    assert isinstance(result, Rejection) and result.reason is TOO_LARGE


@pytest.mark.parametrize("sizes", [[1], [2], [700], [16384]])
def test_too_large_many_records_never_reads_past_cap(sizes: list[int]) -> None:
    data = H.reframe(H.padded_to(BASE, 2500), sizes)
    cap = 2048
    reader = ClientHelloReader(max_bytes=cap)
    result = None
    for i in range(len(data)):
        result = reader.feed(data[i : i + 1])
        assert reader.buffered <= cap
        if result is not None:
            break
    assert isinstance(result, Rejection) and result.reason is TOO_LARGE


def test_too_large_decided_at_the_record_boundary() -> None:
    # The message fits the cap, but its second record header would not: refuse as soon as the
    # first record ends, before reading a byte of that header.
    payload_len = len(H.handshake_payload(BASE)[1])
    data = H.reframe(BASE, [payload_len - 1])  # records of P-1 and 1 bytes: P + 10 in all
    cap = payload_len + 8
    reader = ClientHelloReader(max_bytes=cap)
    answers = [reader.feed(data[i : i + 1]) for i in range(payload_len + 4)]
    assert answers[:-1] == [None] * (payload_len + 3)
    assert isinstance(answers[-1], Rejection) and answers[-1].reason is TOO_LARGE
    assert reader.buffered == payload_len + 4
    assert isinstance(parse_client_hello(data, max_bytes=cap + 2), Hello)


def test_cap_holds_when_tiny_records_split_the_handshake_header() -> None:
    # One-byte records: the next record header was read before the handshake length was
    # known, so caps of 9-22 bytes could be passed by up to 4 bytes.
    data = b"\x16\x03\x01\x00\x01\x01" * 2 + b"\x16\x03\x01\x00\x01\x00"
    reader = ClientHelloReader(16)
    result = reader.feed(data)
    assert isinstance(result, Rejection) and result.reason is TOO_LARGE
    assert reader.buffered <= 16


@pytest.mark.parametrize("cap", range(9, 64))
@pytest.mark.parametrize("size", [1, 2, 3])
def test_cap_is_a_promise_at_every_size(cap: int, size: int) -> None:
    data = H.reframe(BASE, [size] * 40)
    for pieces in (1, len(data)):  # whole, then byte by byte
        reader = ClientHelloReader(cap)
        step = max(1, len(data) // pieces)
        result = None
        for start in range(0, len(data), step):
            result = reader.feed(data[start : start + step])
            assert reader.buffered <= cap
            if result is not None:
                break
        assert isinstance(result, Rejection) and result.reason is TOO_LARGE


def test_default_cap_and_bad_cap() -> None:
    assert ClientHelloReader().max_bytes == DEFAULT_MAX_HELLO_BYTES == 65536
    with pytest.raises(ValueError):
        ClientHelloReader(max_bytes=4)


def test_multi_record_up_to_default_cap() -> None:
    # A 40 KB hello (Envoy-as-client sized hellos exceed one 16 KB record) in 3 records.
    parts = H.decode(H.without_extension(BASE, H.EXT_PADDING))
    exts = (*(parts.extensions or ()), (H.EXT_PADDING, bytes(40_000)))
    body = H.encode_body(replace(parts, extensions=exts))
    payload = b"\x01" + H.u24(len(body)) + body
    data = b"".join(H.record(0x16, payload[i : i + 16384]) for i in range(0, len(payload), 16384))
    result = parse_client_hello(data)
    assert isinstance(result, Hello) and result.length == len(data)
    assert isinstance(parse_client_hello(data, max_bytes=len(data) - 1), Rejection)


# ---------------------------------------------------------------------------------------------
# Fuzz: never raises, never over the cap, same answer for every split.

_POOL: list[bytes] = [
    BASE,
    H.python_hello(None),
    H.python_hello("server.dc1.consul", maximum_version=TLS12),
    H.reframe(H.python_hello(WEB, ("h2", "http/1.1")), [64, 200]),
    H.with_mlkem_key_share(BASE),
    H.sslv2_hello(),
]


def _check(data: bytes, cuts: list[int], max_bytes: int) -> None:
    one_shot = parse_client_hello(data, max_bytes)
    reader = ClientHelloReader(max_bytes)
    result = None
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if cut < start:
            continue
        answer = reader.feed(data[start:cut])
        start = cut
        assert answer is None or isinstance(answer, Hello | Rejection)
        assert reader.buffered <= max_bytes
        assert len(reader._payload) + len(reader._hdr) <= max_bytes
        if result is not None:
            assert answer is result  # final means final
        result = answer
    assert result == one_shot
    if isinstance(result, Hello):
        assert result.length <= min(len(data), max_bytes)
        assert parse_client_hello(data[: result.length], max_bytes) == result
        assert parse_client_hello(data[: result.length - 1], max_bytes) is None


FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 600), max_size=8),
    max_bytes=st.sampled_from([9, 64, 512, DEFAULT_MAX_HELLO_BYTES]),
)
def test_fuzz_random_bytes(data: bytes, cuts: list[int], max_bytes: int) -> None:
    _check(data, cuts, max_bytes)


@FUZZ
@given(
    head=st.sampled_from([b"\x16\x03\x01", b"\x16\x03\x03", b"\x80"]),
    rec_len=st.integers(0, 0x4100),
    body=st.binary(max_size=300),
    cuts=st.lists(st.integers(0, 310), max_size=6),
)
def test_fuzz_plausible_headers(head: bytes, rec_len: int, body: bytes, cuts: list[int]) -> None:
    _check(head + H.u16(rec_len) + body, cuts, DEFAULT_MAX_HELLO_BYTES)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_POOL)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["set", "flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


@FUZZ
@given(
    data=_mutated(),
    cuts=st.lists(st.integers(0, 2000), max_size=8),
    max_bytes=st.sampled_from([600, DEFAULT_MAX_HELLO_BYTES]),
)
def test_fuzz_mutated_real_hellos(data: bytes, cuts: list[int], max_bytes: int) -> None:
    _check(data, cuts, max_bytes)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 600), min_size=1, max_size=6),
    trailer=st.binary(max_size=40),
    cuts=st.lists(st.integers(0, 3000), max_size=10),
)
def test_fuzz_reframed_always_same_hello(sizes: list[int], trailer: bytes, cuts: list[int]) -> None:
    data = H.reframe(_POOL[4], sizes)
    expected = replace(parse_client_hello(_POOL[4]), length=len(data))  # type: ignore[type-var]
    reader = ClientHelloReader()
    assert T.feed_in_pieces(reader, data + trailer, cuts) == expected
