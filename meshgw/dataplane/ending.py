"""How a connection ends, whichever phase or kind it is in: a reset, the access-log line."""

from __future__ import annotations

import logging
import struct
import time

from meshgw.routing import Route, Target
from meshgw.wire.clienthello import Hello

access_log = logging.getLogger("meshgw.access")

LINGER_RESET = struct.pack("ii", 1, 0)  # close() then sends RST instead of FIN


def log_connection(
    peer: tuple | None,
    hello: Hello | None,
    route: Route | None,
    target: Target | None,
    bytes_up: int,
    bytes_down: int,
    started: float,
    outcome: str,
    detail: str = "",
    tried: str = "",
) -> None:
    """The access-log line of one connection, whichever phase it ended in. `tried`: the
    upstreams that failed before, and their errors."""
    fields = {
        "client": f"{peer[0]}:{peer[1]}" if peer else "",
        "sni": hello.sni if hello else None,
        "alpn": ",".join(hello.alpn) if hello and hello.alpn else None,
        "route": route.kind.value if route else None,
        "dc": route.datacenter if route else None,
        "upstream": str(target.endpoint) if target else None,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "duration_ms": round((time.monotonic() - started) * 1000, 3),
        "outcome": outcome,
    }
    if tried:
        fields["tried"] = tried
    if detail:
        fields["detail"] = detail
    access_log.info("connection", extra={"fields": fields})
