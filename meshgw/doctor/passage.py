"""Does a gateway forward a name? One ClientHello with that SNI, and what comes back.

The peering check cannot complete a handshake: the certificates at the far end are the peer's,
signed by a CA the doctor does not have, and a client certificate would be the peer's too. It
needs less: whether the gateway connected somewhere with the name. A gateway that refuses a name
closes the connection without a byte (meshgw at once; Consul's Envoy does the same for a name no
filter chain matches). A gateway that forwards it connects upstream and replays the hello, and
what comes back is the upstream's: a ServerHello, an alert, or for a while nothing at all.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass

from meshgw.addresses import hostport
from meshgw.bench.hellos import python_hello
from meshgw.doctor.tls import Unreachable, connected

__all__ = ["Passage", "PassageProbe", "passage_probe"]

# TLS record content types (RFC 8446 5.1): what the first byte back says the upstream did.
HANDSHAKE_RECORD = 0x16
ALERT_RECORD = 0x15
AT_ONCE = 0.5  # seconds: a close sooner than this after the hello is the gateway's refusal


class Passage(enum.Enum):
    FORWARDED = "forwarded"  # bytes came back: the gateway connected somewhere
    HELD = "held"  # neither bytes nor a close within the timeout: not refused at once
    REFUSED = "refused"  # closed without a byte
    UNREACHABLE = "unreachable"  # the gateway's port does not accept


@dataclass(frozen=True, slots=True)
class PassageProbe:
    gateway: str  # host:port
    name: str
    passage: Passage
    detail: str


def describe_answer(first: bytes) -> str:
    if first[0] == HANDSHAKE_RECORD:
        return "the TLS handshake proceeds: the far end answered with a handshake record"
    if first[0] == ALERT_RECORD:
        return "the far end answered with a TLS alert: the gateway passed the hello on"
    return "the far end answered, though not with TLS: the gateway passed the hello on"


async def passage_probe(
    host: str, port: int, name: str, timeout: float, alpn: Sequence[str] = ()
) -> PassageProbe:
    """Send a ClientHello for `name` to the gateway at host:port; wait (at most `timeout`) for
    the first bytes back or the close."""
    gateway = hostport(host, port)
    try:
        async with connected(host, port, timeout) as (reader, writer):
            writer.write(python_hello(name, tuple(alpn)))
            started = time.monotonic()
            try:
                async with asyncio.timeout(timeout):
                    await writer.drain()
                    first = await reader.read(5)
            except TimeoutError:
                detail = (
                    f"the connection stayed open {timeout:g}s after the hello: the gateway "
                    "connected somewhere, and nothing answered yet"
                )
                return PassageProbe(gateway, name, Passage.HELD, detail)
            except ConnectionError:
                first = b""  # reset: a refusal too
            waited = time.monotonic() - started
    except Unreachable as error:
        return PassageProbe(gateway, name, Passage.UNREACHABLE, str(error))
    if first:
        return PassageProbe(gateway, name, Passage.FORWARDED, describe_answer(first))
    if waited < AT_ONCE:
        detail = "closed at once without a byte: the gateway has no route for the name"
    else:
        detail = (
            f"closed without a byte after {waited:.1f}s: the gateway found no endpoint for the "
            "name that accepts (or has no route for it)"
        )
    return PassageProbe(gateway, name, Passage.REFUSED, detail)
