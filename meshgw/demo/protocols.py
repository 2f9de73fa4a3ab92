"""What the demo's simulated Consul servers say on each ALPN protocol, sans I/O.

Bytes in, values out; no sockets, no asyncio (as meshgw/wire is). The protocols are
small stand-ins for Consul's, with the parts that matter to a gateway kept exact:

- `consul/wan-gossip/packet`: memberlist packets framed as in `wanfed.go` — a 4-byte big-endian
  length, then the payload, many packets per connection; packets over 4 MiB are refused. The
  payload is a message-type byte (memberlist's pingMsg 0, ackRespMsg 2) and a JSON body.
- `consul/wan-gossip/stream`: one push/pull exchange: each side sends one JSON line naming the
  members it knows, then the connection closes.
- `consul/rpc-multi`: Consul runs yamux here; the demo answers one text line per request line
  (`Status.Ping`, ...) so that a person can try it with `openssl s_client`.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass

ALPN_RPC = "consul/rpc-multi"
ALPN_PACKET = "consul/wan-gossip/packet"
ALPN_STREAM = "consul/wan-gossip/stream"
ALPN_PROTOCOLS = (ALPN_RPC, ALPN_PACKET, ALPN_STREAM)

MAX_PACKET = 4 * 1024 * 1024  # wanfed refuses packets above 4 MiB
_LENGTH = struct.Struct(">I")


class PacketTooLarge(ValueError):
    """A length prefix announced more than the receiver accepts."""


# --- packet framing ----------------------------------------------------------------------------


def frame(payload: bytes, max_size: int = MAX_PACKET) -> bytes:
    """One packet on the wire: its length, then the payload."""
    if len(payload) > max_size:
        raise PacketTooLarge(f"packet of {len(payload)} bytes exceeds {max_size}")
    return _LENGTH.pack(len(payload)) + payload


class PacketReader:
    """Feed the bytes of a packet connection in any pieces; take back whole packets.

    Bounded by construction: a length above `max_size` is refused as soon as its 4 bytes are in,
    before any of the announced payload is buffered.
    """

    __slots__ = ("_buffer", "max_size")

    def __init__(self, max_size: int = MAX_PACKET) -> None:
        self.max_size = max_size
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held that do not make a whole packet yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer
        buffer += data
        packets: list[bytes] = []
        offset = 0
        while len(buffer) - offset >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer, offset)
            if size > self.max_size:
                raise PacketTooLarge(f"packet length {size} exceeds {self.max_size}")
            end = offset + _LENGTH.size + size
            if len(buffer) < end:
                break
            packets.append(bytes(buffer[offset + _LENGTH.size : end]))
            offset = end
        del buffer[:offset]
        return packets


# --- gossip messages ---------------------------------------------------------------------------


class MessageType(enum.IntEnum):
    PING = 0  # memberlist pingMsg
    ACK = 2  # memberlist ackRespMsg


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    target: str  # member name <node>.<dc> the ping is for (memberlist RequireNodeNames)
    source: str


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    source: str  # the member that answered


def encode_message(message: Ping | Ack) -> bytes:
    if isinstance(message, Ping):
        body = {"seq": message.seq, "node": message.target, "source": message.source}
        return bytes([MessageType.PING]) + json.dumps(body).encode()
    body = {"seq": message.seq, "source": message.source}
    return bytes([MessageType.ACK]) + json.dumps(body).encode()


def decode_message(payload: bytes) -> Ping | Ack:
    """A packet's message; ValueError when it is not one the demo speaks."""
    if not payload:
        raise ValueError("empty packet")
    try:
        kind = MessageType(payload[0])
        body = json.loads(payload[1:])
        if kind is MessageType.PING:
            return Ping(int(body["seq"]), str(body["node"]), str(body["source"]))
        return Ack(int(body["seq"]), str(body["source"]))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"not a gossip message: {error}") from None


# --- stream: push/pull -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberState:
    name: str  # <node>.<dc>
    address: str  # the member's own (LAN) address, as `consul members -wan` shows it
    status: str = "alive"


@dataclass(frozen=True, slots=True)
class PushPull:
    source: str
    members: tuple[MemberState, ...]


def encode_push_pull(message: PushPull) -> bytes:
    body = {
        "type": "push-pull",
        "source": message.source,
        "members": [
            {"name": m.name, "address": m.address, "status": m.status} for m in message.members
        ],
    }
    return json.dumps(body).encode() + b"\n"


def decode_push_pull(line: bytes) -> PushPull:
    try:
        body = json.loads(line)
        if body.get("type") != "push-pull":
            raise ValueError(f"type {body.get('type')!r} is not push-pull")
        members = tuple(
            MemberState(str(m["name"]), str(m["address"]), str(m["status"]))
            for m in body["members"]
        )
        return PushPull(str(body["source"]), members)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"not a push/pull message: {error}") from None


# --- rpc: one line per request -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RpcFacts:
    """What a simulated server can tell about itself over RPC."""

    member: str
    leader: str
    datacenters: tuple[str, ...]


RPC_METHODS = ("Status.Ping", "Status.Leader", "Catalog.ListDatacenters")


def rpc_answer(facts: RpcFacts, line: str) -> str:
    """The reply line (without newline) to one request line."""
    method = line.strip()
    if method == "Status.Ping":
        return f"pong {facts.member}"
    if method == "Status.Leader":
        return facts.leader
    if method == "Catalog.ListDatacenters":
        return " ".join(facts.datacenters)
    return f"error: unknown method {method!r}; try {', '.join(RPC_METHODS)}"
