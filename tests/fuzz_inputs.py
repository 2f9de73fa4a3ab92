"""Fuzzed connection openings for the hello campaign (tests/fuzz_hellos.py), from a seeded
random.Random: fast (no shrinking, no database), and the same seed gives the same inputs on the
same OpenSSL.

Kinds of input: real hellos (tests/hellos.py) mutated byte-wise; the same re-framed into records
of random sizes, down to 1 byte; random bytes; plausible record headers with random lengths; and
PROXY protocol headers (v1 and v2) in front of a hello. Mutations lean towards the bytes that
steer a parser: the record and handshake headers and the server name.
"""

from __future__ import annotations

import hashlib
import ipaddress
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from random import Random

from meshgw.bench import hellos as H
from meshgw.wire.proxyproto import MAX_V2_HEADER, MIN_MAX_HEADER_BYTES, V2_SIGNATURE
from tests.hellos import TRUST_DOMAIN as TD

# The socket campaign's gateway routes these (see fuzz_sockets.ROUTES); the in-process one
# only needs a spread of names.
KNOWN_NAMES = (
    "a.server.dc1.consul",
    "b.server.dc1.consul",
    "server.dc1.consul",
    "consul-server-0.server.dc2.consul",
    f"web.default.dc2.internal.{TD}",
    "A.Server.DC1.consul.",  # routed too: case and a trailing dot are normalised away
)
UNKNOWN_NAMES = (
    "c.server.dc1.consul",
    "server.dc3.consul",
    "x.example.org",
    "a.server.dc1.consul.example.org",
    "server.dc2.consulx",
    f"web.default.dc2.internal.{TD}.example.org",
)
# Length values that sit on the parsers' boundaries, written over 2- and 3-byte fields.
_EDGE_LENGTHS = (0, 1, 2, 3, 4, 5, 0x7F, 0x80, 0xFF, 0x100, 0x3FFF, 0x4000, 0x4001, 0xFFFF)
_CCS = H.record(0x14, b"\x01", b"\x03\x03")  # a pipelined ChangeCipherSpec


@dataclass(frozen=True, slots=True)
class Seed:
    """A real opening to mutate; ``name_at`` is where its server name sits (-1: none)."""

    data: bytes
    name_at: int = -1
    name_len: int = 0


@dataclass(frozen=True, slots=True)
class Input:
    kind: str
    data: bytes
    proxy: bool = False  # starts with a PROXY header: the PROXY reader goes first


def stable(hello: bytes, tag: str) -> bytes:
    """The hello with its random parts (client random, session id, key shares) made from
    ``tag``: CPython's client draws them afresh, and a seed must replay the same inputs."""
    parts = H.decode(hello)
    prefix = bytearray(parts.prefix)
    fill = hashlib.shake_256(tag.encode()).digest(64)
    prefix[2:34] = fill[:32]
    prefix[35 : 35 + prefix[34]] = fill[32 : 32 + prefix[34]]
    exts = tuple(
        (t, _stable_shares(d, tag) if t == H.EXT_KEY_SHARE else d)
        for t, d in parts.extensions or ()
    )
    return H.encode(replace(parts, prefix=bytes(prefix), extensions=exts))


def _stable_shares(data: bytes, tag: str) -> bytes:
    out = bytearray(data[:2])
    pos = 2
    while pos + 4 <= len(data):  # each turn consumes ≥ 4 bytes
        group, size = struct.unpack_from(">HH", data, pos)
        key = hashlib.shake_256(f"{tag}/{group}".encode()).digest(size)
        out += data[pos : pos + 4] + key
        pos += 4 + size
    return bytes(out)


def _seed(hello: bytes, name: str | None) -> Seed:
    if name is None:
        return Seed(hello)
    raw = name.encode()
    return Seed(hello, hello.find(raw), len(raw))


def seed_pool() -> list[Seed]:
    """Real hellos of known and unknown names in the shapes clients send, plus oddities."""
    tls12, tls13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
    seeds: list[Seed] = []
    for i, name in enumerate(KNOWN_NAMES + UNKNOWN_NAMES):
        alpn = (("consul/rpc-multi",), ("h2", "http/1.1"), ())[i % 3]
        seeds.append(_seed(stable(H.python_hello(name, alpn), name), name))
        if i % 4 == 0:
            hello = H.python_hello(name, alpn, maximum_version=tls12)
            seeds.append(_seed(stable(hello, name + "/1.2"), name))
        if i % 4 == 1:
            hello = H.python_hello(name, alpn, minimum_version=tls13)
            seeds.append(_seed(stable(hello, name + "/1.3"), name))
        if i % 3 == 2:  # post-quantum size, as Chrome's hybrid hello
            hello = H.with_mlkem_key_share(H.python_hello(name, alpn))
            seeds.append(_seed(stable(hello, name + "/pq"), name))
    big = H.padded_to(H.python_hello(KNOWN_NAMES[0], ("consul/rpc-multi",)), 2500)
    seeds.append(_seed(stable(big, "padded"), KNOWN_NAMES[0]))
    grease = H.with_extension(H.python_hello(KNOWN_NAMES[1]), H.EXT_ALPN, H.alpn_ext(b"\x0a\x0a"))
    seeds.append(_seed(stable(grease, "grease"), KNOWN_NAMES[1]))
    seeds.append(_seed(stable(H.python_hello(None), "no-sni"), None))
    seeds.append(Seed(H.sslv2_hello()))
    return seeds


# --- byte-wise changes -------------------------------------------------------------------------


def _position(rng: Random, size: int, seed: Seed | None) -> int:
    """Mostly anywhere; often in the headers or the server name, where parsers branch."""
    roll = rng.random()
    if roll < 0.25:
        return rng.randrange(min(size, 48))
    if roll < 0.45 and seed is not None and 0 <= seed.name_at < size:
        return min(seed.name_at - 9 + rng.randrange(seed.name_len + 10), size - 1)
    return rng.randrange(size)


def mutate(rng: Random, data: bytes, rounds: int, seed: Seed | None = None) -> bytes:
    """``rounds`` random set/flip/insert/delete/length/truncate changes."""
    buf = bytearray(data)
    for _ in range(rounds):
        op = rng.randrange(12)
        if not buf:
            buf += rng.randbytes(rng.randint(1, 8))
            continue
        pos = max(_position(rng, len(buf), seed), 0)
        if op < 3:
            buf[pos] = rng.randrange(256)
        elif op < 6:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op < 8:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op < 10:
            del buf[pos : pos + rng.randint(1, 8)]
        elif op < 11:
            width = rng.choice((2, 3))
            value = rng.choice(_EDGE_LENGTHS) + rng.choice((-1, 0, 0, 1))
            buf[pos : pos + width] = (value % (1 << (8 * width))).to_bytes(width, "big")
        else:
            del buf[pos:]
    return bytes(buf)


def record_sizes(rng: Random) -> list[int]:
    roll = rng.random()
    if roll < 0.05:  # the costliest shape to parse: kept rare so the campaign stays fast
        return [1]
    if roll < 0.15:
        return [rng.randint(2, 8)]
    if roll < 0.25:
        return [16384]
    return [rng.randint(1, 600) for _ in range(rng.randint(1, 6))]


def trailer(rng: Random) -> bytes:
    """What may follow a hello in the same read: nothing, a CCS, early data, another hello."""
    roll = rng.random()
    if roll < 0.6:
        return b""
    if roll < 0.75:
        return _CCS
    if roll < 0.9:
        return rng.randbytes(rng.randint(1, 64))
    return H.record(0x16, b"\x01\x00\x00\x00")


# --- PROXY protocol headers --------------------------------------------------------------------


def _ipv4(rng: Random) -> str:
    return str(ipaddress.IPv4Address(rng.getrandbits(32)))


def _ipv6(rng: Random) -> str:
    roll = rng.random()
    if roll < 0.2:
        return "::ffff:" + _ipv4(rng)
    address = ipaddress.IPv6Address(rng.getrandbits(128) >> rng.choice((0, 64, 112)))
    return address.exploded if roll < 0.4 else str(address)


def _v1(rng: Random) -> bytes:
    roll = rng.random()
    if roll < 0.15:
        junk = rng.choice(("", " ", " TCP4 1.2.3.4 5.6.7.8 1 2", " whatever"))
        return f"PROXY UNKNOWN{junk}\r\n".encode()
    ports = f"{rng.randrange(65536)} {rng.randrange(65536)}"
    if roll < 0.6:
        return f"PROXY TCP4 {_ipv4(rng)} {_ipv4(rng)} {ports}\r\n".encode()
    return f"PROXY TCP6 {_ipv6(rng)} {_ipv6(rng)} {ports}\r\n".encode()


def _tlvs(rng: Random) -> bytes:
    out = bytearray()
    for _ in range(rng.choice((0, 0, 1, 2, 5))):
        kind = rng.choice((0x01, 0x02, 0x04, 0x05, 0x20, 0xEA, rng.randrange(256)))
        value = rng.randbytes(rng.choice((0, 1, 3, 16, 40)))
        out += bytes((kind,)) + struct.pack(">H", len(value)) + value
    return bytes(out)


def _v2(rng: Random) -> bytes:
    ver_cmd = rng.choice((0x21, 0x21, 0x21, 0x20, 0x22, 0x11))
    family = rng.choice((0x11, 0x11, 0x21, 0x31, 0x00, 0x12, rng.randrange(256)))
    addresses = {0x11: 12, 0x21: 36, 0x31: 216}.get(family, 0)
    block = rng.randbytes(addresses) + _tlvs(rng)
    return V2_SIGNATURE + bytes((ver_cmd, family)) + struct.pack(">H", len(block)) + block


def proxy_header(rng: Random) -> bytes:
    return _v1(rng) if rng.random() < 0.4 else _v2(rng)


def hello_cap(rng: Random, size: int) -> int:
    """A ClientHelloReader cap: anything from its least (9) to the default, often near the
    input's own size, where an off-by-one would show."""
    roll = rng.random()
    if roll < 0.35:
        return 65536
    if roll < 0.6:
        return rng.randint(9, 64)
    if roll < 0.8:
        return rng.randint(65, 4096)
    return max(9, size + rng.randint(-8, 8))


def proxy_cap(rng: Random, size: int) -> int:
    roll = rng.random()
    if roll < 0.4:
        return 4096
    if roll < 0.6:
        return rng.randint(MIN_MAX_HEADER_BYTES, 300)
    if roll < 0.8:
        return max(MIN_MAX_HEADER_BYTES, size + rng.randint(-8, 8))
    return MAX_V2_HEADER


def cuts(rng: Random, size: int) -> list[int]:
    """Where to split a feed: a few places, many, every n bytes, or every byte."""
    roll = rng.random()
    if size == 0 or roll < 0.1:
        return []
    if roll < 0.6:
        return sorted(rng.randrange(size + 1) for _ in range(rng.randint(1, 3)))
    if roll < 0.95:
        return sorted(rng.randrange(size + 1) for _ in range(rng.randint(4, 16)))
    if roll < 0.998 or size > 4000:
        step = rng.randint(1, 32)
        return list(range(step, size, step))
    return list(range(1, size))


# --- the mix -----------------------------------------------------------------------------------


class InputMaker:
    """Draws inputs of every kind, in fixed proportions, from one seeded generator."""

    def __init__(self, rng: Random, pool: list[Seed]) -> None:
        self.rng = rng
        self.pool = pool
        hellos = [s for s in pool if s.data[:1] == b"\x16"]
        self.hellos = hellos
        self.kinds: list[tuple[float, str, Callable[[], Input]]] = [
            (0.35, "mutated", self.mutated),
            (0.55, "reframed", self.reframed),
            (0.65, "random", self.random_bytes),
            (0.80, "plausible", self.plausible),
            (1.00, "proxy", self.proxied),
        ]

    def next(self) -> Input:
        roll = self.rng.random()
        for upper, _, make in self.kinds:
            if roll < upper:
                return make()
        raise AssertionError("unreachable: the last weight is 1.0")

    def mutated(self) -> Input:
        seed = self.rng.choice(self.pool)
        data = mutate(self.rng, seed.data + trailer(self.rng), self.rng.randint(1, 6), seed)
        return Input("mutated", data)

    def reframed(self) -> Input:
        rng = self.rng
        seed = rng.choice(self.hellos)
        data = H.reframe(seed.data, record_sizes(rng)) + trailer(rng)
        if rng.random() < 0.5:
            data = mutate(rng, data, rng.randint(1, 3))
        return Input("reframed", data)

    def random_bytes(self) -> Input:
        rng = self.rng
        head = rng.choice((b"", b"", b"\x16", b"\x16\x03", b"\x80", b"P", b"\r\n"))
        return Input("random", head + rng.randbytes(rng.choice((0, 1, 5, 9, 40, 300, 600))))

    def plausible(self) -> Input:
        """Record headers that pass the first checks, with lengths drawn near the limits."""
        rng = self.rng
        out = bytearray()
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.1:  # SSLv2-style: 2-byte length with the high bit set
                out += struct.pack(">H", 0x8000 | rng.randrange(0x8000)) + bytes((1, 3, 1))
                continue
            length = rng.choice((*_EDGE_LENGTHS, rng.randrange(0x10000)))
            out += bytes((0x16, 3, rng.choice((0, 1, 3, 4)))) + struct.pack(">H", length)
            body = rng.randbytes(rng.choice((0, 1, 4, 40, 300)))
            if body and rng.random() < 0.6:  # a handshake header that claims a ClientHello
                body = b"\x01" + rng.randrange(1 << 24).to_bytes(3, "big") + body[4:]
            out += body
        return Input("plausible", bytes(out))

    def proxied(self) -> Input:
        rng = self.rng
        seed = rng.choice(self.hellos)
        header = proxy_header(rng)
        data = header + seed.data
        roll = rng.random()
        if roll < 0.4:  # break the header
            data = mutate(rng, header, rng.randint(1, 4)) + seed.data
        elif roll < 0.6:  # or the hello behind it
            data = header + mutate(rng, seed.data, rng.randint(1, 3), seed)
        return Input("proxy", data, proxy=True)
