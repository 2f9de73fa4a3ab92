"""What the supervisor and its worker processes say to each other, one frozen value each.

Every request gets exactly one reply except `NewTable`, which is only told; a worker tells the
supervisor, unasked, of a `Demand`. They travel as
length-prefixed pickles on a private socketpair: both ends are this program and nobody else
holds the pair, so unpickling is safe here and nowhere else.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass

from meshgw.dataplane.context import DataPlaneConfig
from meshgw.topology import Topology

_HEADER = struct.Struct("!I")

# --- supervisor → worker ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """Listen (joining the port with SO_REUSEPORT) and route by `topology`. → Listening | Failed"""

    index: int
    config: DataPlaneConfig
    topology: Topology
    host: str
    port: int
    log_format: str
    log_level: str


@dataclass(frozen=True, slots=True)
class NewTable:
    """Route new connections by this topology from now on (no reply)."""

    topology: Topology


@dataclass(frozen=True, slots=True)
class CountOpen:
    """→ OpenCount"""


@dataclass(frozen=True, slots=True)
class Scrape:
    """→ Scraped"""


@dataclass(frozen=True, slots=True)
class DownNow:
    """→ DownEndpoints: the upstream addresses this worker saw failing."""


@dataclass(frozen=True, slots=True)
class StopAccepting:
    """Close the listening socket; connections go on. → Stopped"""


@dataclass(frozen=True, slots=True)
class Drain:
    """Stop accepting, finish connections for up to `timeout` seconds, exit. → Drained"""

    timeout: float


# --- worker → supervisor ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listening:
    port: int


@dataclass(frozen=True, slots=True)
class Failed:
    """The worker could not listen: the OSError it met, for the supervisor to raise."""

    errno: int
    strerror: str


@dataclass(frozen=True, slots=True)
class OpenCount:
    count: int


@dataclass(frozen=True, slots=True)
class Scraped:
    text: bytes


@dataclass(frozen=True, slots=True)
class Stopped:
    pass


@dataclass(frozen=True, slots=True)
class Drained:
    closed: int  # connections still open at the deadline


@dataclass(frozen=True, slots=True)
class DownEndpoints:
    down: dict[str, str]  # address → the last error


# --- worker → supervisor, unasked ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Demand:
    """A connection wants a local service nobody asked for yet: watch it (no reply)."""

    service: str


Request = Start | NewTable | CountOpen | Scrape | DownNow | StopAccepting | Drain
Reply = Listening | Failed | OpenCount | Scraped | DownEndpoints | Stopped | Drained


Message = Request | Reply | Demand


async def send(writer: asyncio.StreamWriter, message: Message) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_HEADER.pack(len(body)) + body)  # one write: frames never interleave
    await writer.drain()


async def receive(reader: asyncio.StreamReader) -> Message:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    message: Message = pickle.loads(await reader.readexactly(size))  # our own pair
    return message
