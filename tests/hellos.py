"""Test-only hello material: the trust domain, and ClientHellos captured from `openssl s_client`.

Every hello the tests build (CPython's, re-framed, re-encoded, post-quantum sized) comes from the
one factory, `meshgw.bench.hellos`, which the bench uses too. What lives here serves the tests
only: :func:`openssl_hello` dials a throw-away listener with the `openssl` CLI and keeps the
bytes up to the end of its hello (found with meshgw's own reader); :func:`feed_in_pieces` hands
a hello to the reader cut at given offsets.
"""

from __future__ import annotations

import functools
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable

from meshgw.wire.clienthello import ClientHelloReader, Hello, Rejection, RejectReason

TRUST_DOMAIN = "7f42f496-fbc7-8692-05ed-334aa5340c1e.consul"

CAPTURE_TIMEOUT = 10.0  # seconds for one openssl capture, connect to hello
_WHOLE_HELLO_REASONS = frozenset({RejectReason.NO_SNI, RejectReason.INVALID_SERVER_NAME})


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


@functools.cache
def openssl_hello(
    servername: str | None, alpn: tuple[str, ...] = (), args: tuple[str, ...] = ()
) -> bytes:
    """Capture the ClientHello ``openssl s_client`` sends to a local listener.

    The listener reads until meshgw's reader answers (or the deadline passes), then the client
    process is killed by its PID and reaped, whatever happened.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(CAPTURE_TIMEOUT)
        port = listener.getsockname()[1]
        cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-ign_eof"]
        cmd += ["-servername", servername] if servername else ["-noservername"]
        if alpn:
            cmd += ["-alpn", ",".join(alpn)]
        cmd += list(args)
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            conn, _ = listener.accept()
            with conn:
                return _capture(conn)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=CAPTURE_TIMEOUT)


def _capture(conn: socket.socket) -> bytes:
    reader = ClientHelloReader()
    data = bytearray()
    deadline = time.monotonic() + CAPTURE_TIMEOUT
    while len(data) <= reader.max_bytes:  # bounded by size and by the deadline
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("openssl sent no complete ClientHello in time")
        conn.settimeout(remaining)
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("openssl closed before the ClientHello was complete")
        data += chunk
        result = reader.feed(chunk)
        if isinstance(result, Hello):
            return bytes(data[: result.length])
        if isinstance(result, Rejection) and result.reason in _WHOLE_HELLO_REASONS:
            return bytes(data[: reader.buffered])  # a whole hello, just not a routable one
        if result is not None:
            raise AssertionError(f"openssl sent something the reader rejects: {result}")
    raise AssertionError("ClientHello larger than the reader's cap")


def feed_in_pieces(reader: ClientHelloReader, data: bytes, cuts: Iterable[int]) -> object:
    """Feed ``data`` cut at the sorted offsets ``cuts``; return the last answer."""
    result = None
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if start <= cut:
            result = reader.feed(data[start:cut])
            start = cut
    return result
